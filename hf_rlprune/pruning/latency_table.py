"""A latency model of our models on one runtime and device: per-layer lookup tables, summed.

Each layer is timed as a small standalone module on grid points of (input width, output width): conv (+ batch norm)
+ ReLU (+ pool) at its feature-map size, flatten + dense + ReLU, embedding lookup + LSTM over the sequence, the
classifier. A conv after the first is timed behind a cheap copy of its predecessor, whose own time is subtracted, so
the table holds what the layer adds inside the graph (no layout change between convs, as in the whole model).
Every module is timed in two passes (more where they disagree) and the lowest median counts: interference from
other processes only ever adds time.

Between grid points the table interpolates bilinearly, which is exact where the time follows the MACs (in x out);
along an LSTM's hidden width H it interpolates in H x (E + H), the LSTM's MACs. Below the first grid point it takes
that point's time (hardware pads small widths anyway). A constant, the median difference between five whole
compacted models (smallest to dense allocation) and their layers' sum, covers what no layer term does (session
overhead, the LSTM's last-token gather and head).

The estimate is made monotone in every width (running maximum over each grid axis), so timing noise can never make
a wider layer look faster: the environment's budget wall bisects on that monotonicity.

On torch CPU, glibc's malloc hands large activations back to the OS and page-faults them in again depending on the
process's allocation history (up to 1.5x on the reference CNN), so the table and deployment can disagree: fix the
allocator (MALLOC_MMAP_THRESHOLD_=1073741824, or jemalloc/tcmalloc as PyTorch's CPU tuning guide recommends).
ONNX Runtime uses its own memory arena and is not affected.

Tables are cached as small JSON files keyed by everything the timings depend on: runtime and its version, device
name, threads, batch size, sequence length (LSTM), the model's fixed structure and the grid. A cache file whose key
differs from the current one is never used; the table is re-measured and the file rewritten.
"""

import bisect
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomic
from ..models import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from .groups import check_supported, config_with_widths, get_prunable_groups, unsupported
from .latency import RUNTIMES, _LogitsOnly, example_inputs, time_forward

logger = logging.getLogger(__name__)

TABLE_FORMAT = "hf_rlprune.latency_table.v1"
GRID_MULTIPLE = 8  # grid widths are multiples of 8: what SIMD units and the env's latency snapping use
# Every multiple of 8 up to 64 wide: conv kernels' time steps between multiples of 8 (blocked layouts), which
# interpolation cannot see. About 20-25 s for the reference CNN on 2 CPU cores (ONNX Runtime, batch 128).
DEFAULT_GRID_POINTS = 8
CALIBRATION_POSITIONS = (0, 0.25, 0.5, 0.75, 1)  # whole models at these positions along every grid axis

Timer = Callable[[nn.Module, dict[str, torch.Tensor]], float]  # (module, named inputs) -> milliseconds


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_rlprune" / "latency"


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve", "sve2")  # what kernels use


def device_name(device: str = "cpu") -> str:
    """What the timings depend on: the GPU's name, or the CPU's model name and vector extensions (a VM may report
    only "AMD EPYC" for several generations; ARM machines may report no model name at all)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                field, _, value = line.partition(":")
                field = field.strip().lower()
                if field == "model name" and model is None:
                    model = value.strip()
                elif field in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    present = [flag for flag in VECTOR_FLAGS if flag in flags]
    return f"cpu: {model}" + (f" [{' '.join(present)}]" if present else "")


def latency_hardware(latency_ms: dict) -> dict:
    """Where figures keyed as `compare_latency` keys them ("<runtime>_<device>_batch<B>") were measured: the CPU and
    its thread count for CPU keys, the GPU for CUDA keys. Call it on the machine that measured them."""
    hardware = {}
    if any("_cpu_" in key for key in latency_ms):
        hardware.update(cpu=device_name("cpu").removeprefix("cpu: "), cpu_threads=torch.get_num_threads())
    if any("_cuda_" in key for key in latency_ms):
        hardware["gpu"] = device_name("cuda")
    return hardware


def runtime_version(runtime: str) -> str:
    """The versions the timings depend on: ONNX Runtime times the graph that torch's exporter wrote."""
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    return f"torch {torch.__version__}"


def grid_widths(width: int, points: int, multiple: int = GRID_MULTIPLE) -> list[int]:
    """`points` widths from `multiple` to `width`, evenly spread, rounded to multiples of `multiple`, `width` last."""
    if width <= multiple:
        return sorted({1, width})
    spread = (multiple + (width - multiple) * k / (points - 1) for k in range(points))
    return sorted({min(width, max(multiple, multiple * round(w / multiple))) for w in spread} | {width})


# ---- layers as standalone modules ----------------------------------------------------------------------------------


class _Pooling(nn.Module):
    """(B, T, H) -> (B, H): what the LSTM model's dense layers read (one position, or the mean over time)."""

    def __init__(self, pooling: str):
        super().__init__()
        self.pooling = pooling

    def forward(self, hidden_states):
        return hidden_states.mean(dim=1) if self.pooling == "mean" else hidden_states[:, -1]


class _LSTMOutput(nn.Module):
    """Embedding lookup (first layer only) + one LSTM layer, returning the output sequence only (ONNX: one tensor)."""

    def __init__(self, in_width: int, hidden: int, vocab_size: int | None):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, in_width) if vocab_size else nn.Identity()
        self.lstm = nn.LSTM(in_width, hidden, batch_first=True)

    def forward(self, inputs):
        return self.lstm(self.embeddings(inputs))[0]


@dataclass
class _LayerSpec:
    """One timed layer: which groups set its input and output widths (None: fixed), and how to build it."""

    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    fixed_in: int
    fixed_out: int
    build: Callable[[int, int, int], tuple[nn.Module, dict[str, torch.Tensor]]]  # (in, out, batch) -> module, inputs
    # (in, batch) -> what `build` runs before the layer, alone; its time is subtracted from the layer's
    context: Callable[[int, int], tuple[nn.Module, dict[str, torch.Tensor]]] | None = None


def _randn(*shape):
    return {"inputs": torch.randn(*shape, generator=torch.Generator().manual_seed(0))}


def _cnn_specs(config: RLPruneCNNConfig) -> list[_LayerSpec]:
    groups = [g.name for g in get_prunable_groups(config)]
    convs, dense = groups[: len(config.conv_channels)], groups[len(config.conv_channels) :]
    input_sizes = [config.image_size] + config.feature_map_sizes()[:-1]
    final = config.feature_map_sizes()[-1]
    specs = []

    def block(idx, c_in, c_out):
        layers = [nn.Conv2d(c_in, c_out, config.kernel_size, padding=config.padding)]
        layers += [nn.BatchNorm2d(c_out)] if config.use_batch_norm else []
        return nn.Sequential(*layers, nn.ReLU(), *([nn.MaxPool2d(2)] if idx in config.pool_after else []))

    def context(idx, c_in, batch):
        """Conv `idx - 1` producing c_in channels from few inputs (cheap): what conv `idx` reads inside the graph."""
        few = config.num_channels if idx == 1 else min(GRID_MULTIPLE, config.conv_channels[idx - 2])
        return block(idx - 1, few, c_in), _randn(batch, few, input_sizes[idx - 1], input_sizes[idx - 1])

    def build(idx, c_in, c_out, batch):
        if idx == 0:
            return block(0, c_in, c_out), _randn(batch, c_in, input_sizes[0], input_sizes[0])
        predecessor, inputs = context(idx, c_in, batch)
        return nn.Sequential(predecessor, block(idx, c_in, c_out)), inputs

    for idx, name in enumerate(convs):
        # A conv after the first is timed behind its predecessor, whose own time is subtracted: what the layer adds
        # inside the graph. Standalone it would pay layout changes the graph does not (ONNX Runtime keeps
        # consecutive convs in its blocked NCHWc layout and reorders only at the ends).
        specs.append(_LayerSpec(
            name, "conv", convs[idx - 1] if idx else None, name, config.num_channels, 0,
            build=functools.partial(build, idx), context=functools.partial(context, idx) if idx else None,
        ))

    def dense_build(relu, reads_conv):
        def build(d_in, d_out, batch):
            layers = ([nn.Flatten()] if reads_conv else []) + [nn.Linear(d_in * (final**2 if reads_conv else 1), d_out)]
            inputs = _randn(batch, d_in, final, final) if reads_conv else _randn(batch, d_in)
            return nn.Sequential(*layers, *([nn.ReLU()] if relu else [])), inputs

        return build

    readers = [convs[-1]] + dense
    for idx, name in enumerate(dense):
        specs.append(_LayerSpec(name, "dense", readers[idx], name, 0, 0, dense_build(True, idx == 0)))
    specs.append(_LayerSpec("classifier", "classifier", readers[-1], None, 0, config.num_labels, dense_build(False, not dense)))
    return specs


def _lstm_specs(config: RLPruneLSTMConfig, seq_len: int) -> list[_LayerSpec]:
    groups = [g.name for g in get_prunable_groups(config)]
    lstms = groups[1 : 1 + len(config.lstm_hidden_sizes)]
    dense = groups[1 + len(config.lstm_hidden_sizes) :]
    specs = []
    for idx, name in enumerate(lstms):

        def build(d_in, hidden, batch, first=idx == 0):
            if first:  # token ids in: the embedding lookup's cost grows with the embedding width
                ids = torch.randint(min(1, config.vocab_size - 1), config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
                return _LSTMOutput(d_in, hidden, config.vocab_size), {"inputs": ids}
            return _LSTMOutput(d_in, hidden, None), _randn(batch, seq_len, d_in)

        specs.append(_LayerSpec(name, "lstm", groups[idx], name, 0, 0, build))

    def dense_build(relu, reads_lstm):
        def build(d_in, d_out, batch):
            layers = ([_Pooling(config.pooling)] if reads_lstm else []) + [nn.Linear(d_in, d_out)] + ([nn.ReLU()] if relu else [])
            return nn.Sequential(*layers), (_randn(batch, seq_len, d_in) if reads_lstm else _randn(batch, d_in))

        return build

    readers = [lstms[-1]] + dense
    for idx, name in enumerate(dense):
        specs.append(_LayerSpec(name, "dense", readers[idx], name, 0, 0, dense_build(True, idx == 0)))
    specs.append(_LayerSpec("classifier", "classifier", readers[-1], None, 0, 1, dense_build(False, not dense)))
    return specs


def _structure(config) -> dict:
    """The fixed structure the timings depend on (widths are the table's axes; the dense widths bound them)."""
    if isinstance(config, RLPruneCNNConfig):
        names = ("num_channels", "image_size", "kernel_size", "padding", "use_batch_norm", "pool_after", "conv_channels", "hidden_sizes", "num_labels")
    else:
        names = ("vocab_size", "embedding_dim", "lstm_hidden_sizes", "hidden_sizes", "pooling")
    return {"model_type": config.model_type, **{name: getattr(config, name) for name in names}}


# ---- the table -----------------------------------------------------------------------------------------------------


@dataclass
class LayerLatency:
    """Milliseconds of one layer on a grid: `ms[i][j]` at input width `in_widths[i]`, output width `out_widths[j]`."""

    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]

    def __call__(self, in_width: int, out_width: int) -> float:
        i, a = _cell(self.in_widths, in_width)
        j, b = _cell(self.out_widths, out_width)
        if self.kind == "lstm" and b > 0:
            # an LSTM's time grows like its MACs, H x (E + H): quadratic in the hidden width H, so interpolate
            # along H in that coordinate (exact for time = a + b x MACs; still monotone in E and in H)
            e = min(max(in_width, self.in_widths[0]), self.in_widths[-1])
            h0, h1 = self.out_widths[j], self.out_widths[j + 1]
            b = (out_width * (e + out_width) - h0 * (e + h0)) / (h1 * (e + h1) - h0 * (e + h0))
        i2, j2 = min(i + 1, len(self.in_widths) - 1), min(j + 1, len(self.out_widths) - 1)
        ms = self.ms
        return (1 - a) * ((1 - b) * ms[i][j] + b * ms[i][j2]) + a * ((1 - b) * ms[i2][j] + b * ms[i2][j2])


def _cell(axis: list[int], width: int) -> tuple[int, float]:
    """Grid cell index and fraction within it; clamped to the axis (below the first point: the first point)."""
    if width <= axis[0]:
        return 0, 0.0
    if width >= axis[-1]:
        return len(axis) - 1, 0.0
    i = bisect.bisect_right(axis, width) - 1
    return i, (width - axis[i]) / (axis[i + 1] - axis[i])


def _monotone(ms: list[list[float]]) -> list[list[float]]:
    """Running maximum along both axes: non-decreasing in input and output width (bilinear interpolation keeps it)."""
    out = [list(row) for row in ms]
    for i, row in enumerate(out):
        for j in range(len(row)):
            row[j] = max(row[j], row[j - 1] if j else -math.inf, out[i - 1][j] if i else -math.inf)
    return out


class LatencyTable:
    """Estimated milliseconds of one forward pass of a compacted model, from its widths: `table(widths) -> ms`.

    Build with `LatencyTable.build(model_or_config, runtime, batch_size, device, threads, cache_dir=...)`; pass it
    as `latency_fn` to `PruningEnv`. `widths` maps group names to kept units; missing groups count as dense.
    """

    def __init__(self, key: dict, dense_widths: dict[str, int], layers: list[LayerLatency], overhead_ms: float = 0.0,
                 calibration: list[dict] | None = None, build_seconds: float = 0.0):
        self.key = key
        self.dense_widths = dict(dense_widths)
        self.layers = layers
        self.overhead_ms = float(overhead_ms)
        self.calibration = calibration or []
        self.build_seconds = build_seconds

    def __call__(self, widths: dict[str, int] | None = None) -> float:
        return self.layers_ms(widths) + self.overhead_ms

    def layers_ms(self, widths: dict[str, int] | None = None) -> float:
        """Sum of the per-layer estimates, without the calibrated constant."""
        widths = widths or {}
        dense = self.dense_widths
        if not widths.keys() <= dense.keys():
            unknown = sorted(set(widths) - set(dense))
            raise KeyError(f"Unknown prunable group(s) {unknown}; this table's groups are {list(dense)}.")
        total = 0.0
        for layer in self.layers:
            in_width = widths.get(layer.in_group, dense[layer.in_group]) if layer.in_group else 0
            out_width = widths.get(layer.out_group, dense[layer.out_group]) if layer.out_group else 0
            total += layer(in_width, out_width)
        return total

    @property
    def dense_ms(self) -> float:
        return self(self.dense_widths)

    # ---- persistence ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "key": self.key,
            "dense_widths": self.dense_widths,
            "overhead_ms": self.overhead_ms,
            "layers": [vars(layer) for layer in self.layers],
            "calibration": self.calibration,
            "build_seconds": self.build_seconds,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically: a concurrent reader never sees half a file)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: dict | None = None) -> "LatencyTable":
        """Read a saved table; with `expected_key`, a table measured under any other key is a ValueError."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path} is not a latency table of format {TABLE_FORMAT} (got {found!r}).")
        if expected_key is not None and data["key"] != _jsonable(expected_key):
            differs = sorted(k for k in set(data["key"]) | set(expected_key) if data["key"].get(k) != _jsonable(expected_key).get(k))
            raise ValueError(f"{path} was measured under a different {', '.join(differs)}; re-measure it for this runtime/device.")
        layers = [LayerLatency(**layer) for layer in data["layers"]]
        for layer in layers:  # a hand-edited or truncated file would fail at its first estimate, far from here
            if len(layer.ms) != len(layer.in_widths) or any(len(row) != len(layer.out_widths) for row in layer.ms):
                raise ValueError(f"{path}: layer {layer.name!r} has {len(layer.ms)} rows of timings for a "
                                 f"{len(layer.in_widths)} x {len(layer.out_widths)} grid; measure the table again.")
        return cls(data["key"], data["dense_widths"], layers, data["overhead_ms"], data.get("calibration"), data.get("build_seconds", 0.0))

    @classmethod
    def load_for(cls, path: str | os.PathLike, model_or_config, runtime: str, batch_size: int,
                 seq_len: int | None = None) -> "LatencyTable":
        """A table measured elsewhere, typically on the deployment machine, for this model.

        Train on a GPU host and prune for the CPU the model will serve on: the table keeps that machine's device,
        threads and runtime version. Its runtime, batch size, sequence length and the model's structure must match,
        or the estimates would be for another workload; a mismatch is a ValueError naming the fields.
        """
        config = _config_of(model_or_config)
        try:
            table = cls.load(path)
        except (FileNotFoundError, IsADirectoryError) as error:
            raise ValueError(f"Latency table {path} does not exist (or is a folder: name the JSON file); measure one on the deployment machine with "
                             "`python scripts/bench_latency.py --save_tables DIR` (or LatencyTable.build(...).save(path)).") from error
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a readable latency table ({type(error).__name__}: {error}); measure it again.") from error
        is_lstm = isinstance(config, RLPruneLSTMConfig)
        expected = _jsonable({"runtime": runtime, "batch_size": int(batch_size), "structure": _structure(config),
                              "seq_len": int(seq_len or config.max_seq_length) if is_lstm else None})
        differs = sorted(name for name, value in expected.items() if table.key.get(name) != value)
        if differs:
            found = {name: table.key.get(name) for name in differs}
            wanted = {name: expected[name] for name in differs}
            raise ValueError(f"Latency table {path} was measured for {found}, but this run needs {wanted}; measure a table for "
                             "this model, runtime and batch size on the deployment machine.")
        return table

    # ---- building ------------------------------------------------------------------------------------------------
    @staticmethod
    def cache_key(model_or_config, runtime: str = "onnxruntime", batch_size: int = 128, device: str = "cpu",
                  threads: int | None = None, grid: int | dict[str, list[int]] = DEFAULT_GRID_POINTS, seq_len: int | None = None,
                  timer_name: str = "wall_clock") -> dict:
        """Everything a table's timings depend on; a cached table is used only when its key equals this."""
        config = _config_of(model_or_config)
        _check_request(runtime, batch_size, device)
        is_lstm = isinstance(config, RLPruneLSTMConfig)
        return _jsonable({
            "format": TABLE_FORMAT,
            "runtime": runtime,
            "runtime_version": runtime_version(runtime),
            "device": device_name(device),
            "threads": int(threads or torch.get_num_threads()),
            "batch_size": int(batch_size),
            "seq_len": int(seq_len or config.max_seq_length) if is_lstm else None,
            "structure": _structure(config),
            "grid": _resolve_grid(config, grid),
            "timer": timer_name,
        })

    @classmethod
    def build(
        cls,
        model_or_config,
        runtime: str = "onnxruntime",
        batch_size: int = 128,
        device: str = "cpu",
        threads: int | None = None,
        grid: int | dict[str, list[int]] = DEFAULT_GRID_POINTS,
        cache_dir: str | os.PathLike | None = None,
        seq_len: int | None = None,
        warmup: int = 2,
        repeats: int = 5,
        passes: int = 2,
        timer: Timer | None = None,
        timer_name: str | None = None,
    ) -> "LatencyTable":
        """Measure (or load from `cache_dir`) the latency table of a model's structure on `runtime` and `device`.

        Args:
            model_or_config: one of our models or its config; its widths are the dense widths (the grid's ends).
            runtime: "onnxruntime" (the exported graph on CPU) or "torch" (CPU, or CUDA with device="cuda").
            batch_size: the deployment batch size the latency is measured at.
            threads: intra-op threads (default: torch's default, the core count).
            grid: grid points per width axis (multiples of 8 from 8 to the dense width; the default 8 takes every
                multiple of 8 on axes up to 64 wide), or explicit widths per group.
            cache_dir: where tables are cached as JSON (None: no cache). A file with another key is re-measured.
            seq_len: the LSTM's sequence length (default: its max_seq_length).
            warmup, repeats: per timing; the median of `repeats` counts.
            passes: every module is timed in this many separate passes over the grid (up to two more where the
                passes disagree by over 5%) and the lowest median kept: interference from other processes only
                adds time, and rarely hits one module in every pass.
            timer: `(module, named inputs) -> ms` in place of wall-clock timing (tests inject synthetic timings).
            timer_name: names `timer` in the cache key; without it a custom timer's table is not cached, since
                nothing tells one unnamed timer's timings from another's.
        """
        config = _config_of(model_or_config)
        if passes < 1 or repeats < 1 or warmup < 0:
            raise ValueError(f"passes = {passes} and repeats = {repeats} must be >= 1, warmup = {warmup} >= 0.")
        threads = int(threads or torch.get_num_threads())
        seq_len = int(seq_len or config.max_seq_length) if isinstance(config, RLPruneLSTMConfig) else None
        if timer is not None and timer_name is None:
            cache_dir = None
        key = cls.cache_key(config, runtime, batch_size, device, threads, grid, seq_len, "wall_clock" if timer is None else timer_name)
        path = Path(cache_dir) / _cache_file_name(key) if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                return cls.load(path, expected_key=key)
            except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
                logger.warning("Latency table cache %s is not usable (%s); re-measuring.", path, error)
        if timer is None:
            def timer(module, inputs):
                return statistics.median(time_forward(module, inputs, runtime, device, warmup, repeats, threads))

        start = time.perf_counter()
        table = cls._measure(config, key, batch_size, seq_len, timer, passes)
        table.build_seconds = time.perf_counter() - start
        logger.info("Latency table for %s on %s (%s) measured in %.1f s.", config.model_type, key["device"], runtime, table.build_seconds)
        if path is not None:
            try:
                table.save(path)
            except OSError as error:  # a read-only cache must not throw away the minutes just measured
                logger.warning("Could not cache the latency table at %s (%s); set latency_cache_dir to a writable folder "
                               "to reuse it next time.", path, error)
        return table

    @classmethod
    def _measure(cls, config, key: dict, batch_size: int, seq_len: int | None, timer: Timer, passes: int) -> "LatencyTable":
        specs = _lstm_specs(config, seq_len) if isinstance(config, RLPruneLSTMConfig) else _cnn_specs(config)
        grid = key["grid"]
        axes = {spec.name: (grid[spec.in_group] if spec.in_group else [spec.fixed_in],
                            grid[spec.out_group] if spec.out_group else [spec.fixed_out]) for spec in specs}
        # whole models from the smallest to the dense allocation: the calibration compares the layers' sum to them
        calibration_widths = [
            {name: axis[round(position * (len(axis) - 1))] for name, axis in grid.items()} for position in CALIBRATION_POSITIONS
        ]
        jobs = {}  # label -> builder of (module, inputs)
        for spec in specs:
            in_axis, out_axis = axes[spec.name]
            for d_in in in_axis:
                if spec.context is not None:
                    jobs[spec.name, d_in, "context"] = functools.partial(spec.context, d_in, batch_size)
                for d_out in out_axis:
                    jobs[spec.name, d_in, d_out] = functools.partial(spec.build, d_in, d_out, batch_size)
        for index, widths in enumerate(calibration_widths):
            jobs["model", index] = functools.partial(_whole_model, config, widths, batch_size, seq_len)
        ms = _time_jobs(jobs, timer, passes)
        layers = []
        for spec in specs:
            in_axis, out_axis = axes[spec.name]
            grid_ms = [
                [max(ms[spec.name, d_in, d_out] - ms.get((spec.name, d_in, "context"), 0.0), 0.0) for d_out in out_axis]  # noise: >= 0
                for d_in in in_axis
            ]
            layers.append(LayerLatency(spec.name, spec.kind, spec.in_group, spec.out_group, list(in_axis), list(out_axis), _monotone(grid_ms)))
        table = cls(key, {g.name: g.width for g in get_prunable_groups(config)}, layers)
        measured = [ms["model", index] for index in range(len(calibration_widths))]
        table.overhead_ms, table.calibration = _calibrate(table, calibration_widths, measured)
        return table


def _time_jobs(jobs: dict, timer: Timer, passes: int, tolerance: float = 0.05, extra_passes: int = 2) -> dict:
    """The lowest time of each job over `passes` passes through all jobs, plus up to `extra_passes` more for jobs
    whose two lowest times still differ by more than `tolerance`: interference only adds time, and a burst of it
    rarely hits one job in two passes that are seconds apart."""
    times = {label: [] for label in jobs}
    pending = list(jobs)
    for index in range(passes + extra_passes):
        if index >= passes:
            pending = [label for label in pending if passes > 1 and sorted(times[label])[1] > (1 + tolerance) * min(times[label])]
            if not pending:
                break
        for label in pending:
            with torch.random.fork_rng():  # weights' values do not matter for time; keep the caller's RNG
                module, inputs = jobs[label]()
            times[label].append(float(timer(module.eval(), inputs)))
    return {label: min(values) for label, values in times.items()}


def _whole_model(config, widths: dict[str, int], batch_size: int, seq_len: int | None):
    model = _model_class(config)(config_with_widths(config, widths)).eval()
    inputs = example_inputs(model, batch_size, seq_len)
    return _LogitsOnly(model, list(inputs)), inputs


def _calibrate(table: "LatencyTable", allocations: list[dict[str, int]], measured_ms: list[float]):
    """The constant for what no layer term covers (session overhead, the LSTM's last-token gather and head): the
    median of (whole model - sum of layers) over whole compacted models from the smallest to the dense allocation.
    The median shrugs off a disturbed measurement; the estimate stays positive and keeps the layers' monotonicity."""
    layers = [table.layers_ms(widths) for widths in allocations]
    overhead = max(statistics.median(y - x for x, y in zip(layers, measured_ms)), -0.5 * min(layers))
    calibration = [
        {"widths": widths, "measured_ms": y, "layers_ms": x, "estimated_ms": x + overhead}
        for widths, x, y in zip(allocations, layers, measured_ms)
    ]
    return overhead, calibration


def _model_class(config):
    return RLPruneCNNForImageClassification if isinstance(config, RLPruneCNNConfig) else RLPruneLSTMForSequenceClassification


def _config_of(model_or_config):
    if isinstance(model_or_config, nn.Module):
        check_supported(model_or_config)
        return model_or_config.config
    if not isinstance(model_or_config, (RLPruneCNNConfig, RLPruneLSTMConfig)):
        raise unsupported(model_or_config, "estimate the latency of")
    return model_or_config


def _check_request(runtime: str, batch_size: int, device: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"latency runtime = {runtime!r} is unknown; choose one of {RUNTIMES}.")
    if batch_size < 1:
        raise ValueError(f"latency batch_size = {batch_size} must be >= 1.")
    if str(device).startswith("cuda"):
        if runtime != "torch":
            raise ValueError(f"device={device!r} needs runtime='torch'; onnxruntime runs on the CPU here.")
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'.")
    elif str(device) != "cpu":
        raise ValueError(f"latency device = {device!r} is unknown; use 'cpu' or 'cuda' (or 'cuda:N').")


def _resolve_grid(config, grid) -> dict[str, list[int]]:
    groups = get_prunable_groups(config)
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"grid = {grid} points per axis must be >= 2 (the smallest width and the dense width).")
        return {g.name: grid_widths(g.width, grid) for g in groups}
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(grid) - set(by_name))
    if unknown:
        raise KeyError(f"grid names unknown group(s) {unknown}; this model's groups are {list(by_name)}.")
    resolved = {}
    for group in groups:
        axis = sorted(set(int(w) for w in grid[group.name])) if group.name in grid else grid_widths(group.width, DEFAULT_GRID_POINTS)
        if axis[0] < 1 or axis[-1] != group.width:
            raise ValueError(f"grid[{group.name!r}] = {axis} must hold widths in [1, {group.width}] and end at the dense width {group.width}.")
        resolved[group.name] = axis
    return resolved


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _cache_file_name(key: dict) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"latency-{key['structure']['model_type']}-{key['runtime']}-b{key['batch_size']}-{digest}.json"
