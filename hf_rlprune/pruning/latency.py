"""Measured latency: median of repeated forward passes after warm-up, in torch (CPU/GPU) and ONNX Runtime.

ONNX export uses `torch.onnx.export` on the compacted model. optimum's exporter is not used: its ONNX package
(optimum-onnx) pins transformers<4.58, which conflicts with transformers 5, and our two architectures need no
model-specific export logic.
"""

import copy
import functools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import RLPruneCNNConfig, RLPruneLSTMConfig
from .groups import check_supported, unsupported

RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyResult:
    runtime: str
    device: str
    batch_size: int
    median_ms: float
    p90_ms: float
    repeats: int
    threads: int


def example_inputs(model_or_config, batch_size: int, seq_len: int | None = None, device="cpu", seed: int = 0) -> dict:
    """A batch of model inputs with the right names, shapes and dtypes (full-length sequences for the LSTM)."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    generator = torch.Generator().manual_seed(seed)
    if isinstance(config, RLPruneCNNConfig):
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator).to(device)}  # (B, C, H, W)
    if isinstance(config, RLPruneLSTMConfig):
        seq_len = config.max_seq_length if seq_len is None else seq_len
        # ids >= 1 so no position counts as padding
        input_ids = torch.randint(min(1, config.vocab_size - 1), config.vocab_size, (batch_size, seq_len), generator=generator).to(device)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    raise unsupported(config, "make example inputs for")


class _LogitsOnly(nn.Module):
    """Export wrapper: positional inputs in, logits out (ONNX graphs take tensors, not dicts or ModelOutputs)."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors)), return_dict=True).logits


def export_onnx(model: nn.Module, path: str | os.PathLike, batch_size: int = 1, seq_len: int | None = None) -> Path:
    """Export a (compacted) model to ONNX in float32, with dynamic batch and sequence axes (token inputs take any
    length); returns the file path. The model itself is left as it was (mode, device, dtype)."""
    check_supported(model)
    inputs = example_inputs(model, batch_size, seq_len)
    exported = _LogitsOnly(copy.deepcopy(model).float().eval().cpu(), list(inputs))
    return export_module_onnx(exported, inputs, path, output_name="logits", dynamic_sequence=True)


def export_module_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: str | os.PathLike, output_name: str = "output",
                       dynamic_sequence: bool = False) -> Path:
    """Export any module taking `inputs` positionally (in dict order) and returning one tensor; dynamic batch axis,
    and with `dynamic_sequence` a dynamic axis 1 of the 2-D integer inputs (token ids, attention masks). Timing
    exports keep the sequence fixed, as it was measured."""
    path = Path(path)
    names = list(inputs)
    axes = {name: {0: "batch", 1: "sequence"} if dynamic_sequence and value.dim() == 2 and not value.is_floating_point()
            else {0: "batch"} for name, value in inputs.items()}
    torch.onnx.export(
        module.eval().cpu(),
        tuple(value.cpu() for value in inputs.values()),
        str(path),
        input_names=names,
        output_names=[output_name],
        dynamic_axes=axes,
        dynamo=False,  # the TorchScript exporter handles nn.LSTM directly and needs no extra packages
    )
    return path


def _timed(fn, warmup: int, repeats: int, synchronize=None) -> list[float]:
    for _ in range(warmup):
        fn()
    if synchronize:
        synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if synchronize:
            synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def time_forward(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    runtime: str = "torch",
    device: str = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> list[float]:
    """Sorted wall times (ms) of `repeats` forward passes of any module on `inputs` (passed positionally, in order).

    The module must return one tensor (ONNX export). ONNX Runtime runs on CPU with `threads` intra-op threads. A copy
    is timed, so the caller's module keeps its mode and device.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose one of {RUNTIMES}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats = {repeats} must be >= 1 and warmup = {warmup} >= 0.")
    threads = threads or torch.get_num_threads()
    module = copy.deepcopy(module)
    if runtime == "torch":
        module = module.eval().to(device)
        tensors = tuple(value.to(device) for value in inputs.values())
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        # wait for the timed GPU, which need not be the current one (cuda:1 while cuda:0 is current)
        sync = functools.partial(torch.cuda.synchronize, torch.device(device)) if str(device).startswith("cuda") else None
        try:
            with torch.inference_mode():
                times = _timed(lambda: module(*tensors), warmup, repeats, sync)
        finally:
            torch.set_num_threads(previous_threads)
    else:
        import onnxruntime as ort

        if not str(device).startswith("cpu"):
            raise ValueError(f"runtime='onnxruntime' runs on the CPU here; got device={device!r}. Use device='cpu' or runtime='torch'.")
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_module_onnx(module, {name: value[:1] for name, value in inputs.items()}, Path(tmp) / "model.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feeds = {name: value.cpu().numpy() for name, value in inputs.items()}
        times = _timed(lambda: session.run(None, feeds), warmup, repeats)
    return sorted(times)


def measure_latency(
    model: nn.Module,
    batch_size: int = 1,
    runtime: str = "torch",
    device: str = "cpu",
    seq_len: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> LatencyResult:
    """Median wall time of one forward pass of `model` (compact it first: masked units still cost time), timed in a
    float32 copy: the model itself is left as it was (mode, device, dtype)."""
    check_supported(model)
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose one of {RUNTIMES}.")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size = {batch_size} and repeats = {repeats} must both be >= 1.")
    threads = threads or torch.get_num_threads()
    inputs = example_inputs(model, batch_size, seq_len)
    wrapper = _LogitsOnly(copy.deepcopy(model).float().eval(), list(inputs))
    times = time_forward(wrapper, inputs, runtime, device, warmup, repeats, threads)
    on_cuda = runtime == "torch" and str(device).startswith("cuda")
    return LatencyResult(
        runtime=runtime,
        device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
        batch_size=batch_size,
        median_ms=statistics.median(times),
        p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        repeats=repeats,
        threads=threads,
    )


def compare_latency(dense: nn.Module, pruned: nn.Module, runs, repeats: int = 20, warmup: int = 5, seq_len: int | None = None) -> dict:
    """Median latency of a dense and a pruned model side by side, for each (runtime, device, batch size) in `runs`:
    {"<runtime>_<device>_batch<B>": {"dense": ms, "pruned": ms}}. Models are timed in float32 copies."""
    figures = {}
    for runtime, device, batch in runs:
        figures[f"{runtime}_{device}_batch{batch}"] = {
            side: measure_latency(model, batch, runtime, device=device, seq_len=seq_len,
                                  repeats=repeats, warmup=warmup).median_ms
            for side, model in (("dense", dense), ("pruned", pruned))
        }
    return figures
