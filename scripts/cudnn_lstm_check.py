#!/usr/bin/env python
"""Does the GPU's LSTM agree with the CPU's in half precision, for the widths pruning produces? Needs a CUDA GPU.

    python scripts/cudnn_lstm_check.py --output results/raw/cudnn-lstm-check.json

Three measurements, printed and written to `--output`:
1. `nn.LSTM` (random weights, random inputs, batch 128, 64 steps) on the GPU under bf16 autocast, against the
   same LSTM in float32 on the CPU, for every hidden size in `--hidden_sizes` and input size in `--input_sizes`: the
   largest output difference (outputs lie in [-1, 1]; correct bf16 stays near 1e-2), with cuDNN and without.
2. The IMDB LSTM model, masked to pruned widths and compacted, both under bf16 autocast on the GPU: the largest logit
   difference and the predictions that flip, with the model's recurrence as shipped (`run_lstm`, float32 under
   autocast) and as it was before (the LSTM under autocast).
3. The cost of the float32 recurrence: one bf16-autocast training step of the dense IMDB LSTM (batch 128, 512
   tokens), both ways, in milliseconds.
4. `run_lstm` on weights cast to float16 (which it runs without cuDNN), with and without bf16 autocast, against
   float32 on the CPU, for the hidden sizes in `--float16_hidden_sizes`.
"""

import contextlib
import json
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import HfArgumentParser

from hf_rlprune import RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification, apply_masks, compact, masks_from_widths
from hf_rlprune.atomic import write_text_atomic
from hf_rlprune.models.rlprune_lstm import modeling_rlprune_lstm


@dataclass
class CheckArguments:
    output: str = field(default="results/raw/cudnn-lstm-check.json", metadata={"help": "Where to write the figures (JSON)."})
    input_sizes: list[int] = field(default_factory=lambda: [32, 34, 40, 64, 128], metadata={"help": "LSTM input sizes to sweep."})
    hidden_sizes: list[int] = field(
        default_factory=lambda: list(range(8, 257, 8)) + [63, 85, 90, 111], metadata={"help": "LSTM hidden sizes to sweep."}
    )
    pruned_widths: list[str] = field(
        default_factory=lambda: ["34/112/7", "41/72/26", "63/63/32"],
        metadata={"help": "Embedding/hidden/dense widths of compacted IMDB LSTMs to check (slash-separated)."},
    )
    float16_hidden_sizes: list[int] = field(default_factory=lambda: [72, 112, 128], metadata={"help": "Hidden sizes for check 4."})
    seed: int = field(default=0, metadata={"help": "Seed of weights and inputs."})


def lstm_error(input_size: int, hidden_size: int, dtype=torch.bfloat16, cudnn=True, batch=128, steps=64) -> float:
    """Largest |GPU under autocast - CPU float32| over an LSTM's outputs."""
    lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
    inputs = torch.randn(batch, steps, input_size)  # (B, T, D)
    with torch.no_grad():
        reference, _ = lstm(inputs)  # (B, T, H)
        lstm.cuda()
        with torch.backends.cudnn.flags(enabled=cudnn), torch.autocast("cuda", dtype=dtype):
            output, _ = lstm(inputs.cuda())
    return float((output.float().cpu() - reference).abs().max())


def layer_before_fix(lstm, inputs):
    return lstm(inputs)[0]  # the LSTM under the caller's autocast


@contextlib.contextmanager
def recurrence_as(layer_fn):
    """The LSTM model runs its layers through `layer_fn` instead of the shipped `run_lstm` inside this context."""
    shipped, modeling_rlprune_lstm.run_lstm = modeling_rlprune_lstm.run_lstm, layer_fn
    try:
        yield
    finally:
        modeling_rlprune_lstm.run_lstm = shipped


def compaction_under_autocast(config, widths: dict, ids, mask) -> dict:
    model = RLPruneLSTMForSequenceClassification(config).cuda().eval()
    apply_masks(model, masks_from_widths(model, widths, "l1", seed=0))
    small = compact(model).eval()
    row = {}
    for name, recurrence in (("before_fix", layer_before_fix), ("as_shipped", modeling_rlprune_lstm.run_lstm)):
        with recurrence_as(recurrence), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            masked = model(input_ids=ids, attention_mask=mask).logits[:, 1].float()  # (B,)
            compacted = small(input_ids=ids, attention_mask=mask).logits[:, 1].float()  # (B,)
        row[name] = {"max_logit_difference": float((masked - compacted).abs().max()),
                     "flipped_predictions": int(((masked > 0) != (compacted > 0)).sum()), "examples": int(ids.shape[0])}
    return row


def training_step_ms(config, recurrence, ids, mask, steps=20, warmup=5) -> float:
    with recurrence_as(recurrence):
        model = RLPruneLSTMForSequenceClassification(config).cuda().train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        labels = torch.randint(0, 2, (ids.shape[0],), device="cuda")
        for step in range(warmup + steps):
            if step == warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1000


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(CheckArguments).parse_args_into_dataclasses(args=argv)
    if not torch.cuda.is_available():
        raise SystemExit("This check needs a CUDA GPU: it compares the GPU's LSTM kernels with the CPU's.")
    torch.manual_seed(args.seed)
    results = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(0),
               "sweep_bf16_autocast": [], "compaction": {}, "training_step_ms": {}}
    print(f"{results['gpu']}, torch {results['torch']}, cuDNN {results['cudnn']}")

    print("\n1. nn.LSTM under bf16 autocast against float32 on the CPU: hidden sizes with an error above 0.02")
    for input_size in args.input_sizes:
        for hidden_size in args.hidden_sizes:
            row = {"input": input_size, "hidden": hidden_size, "cudnn": lstm_error(input_size, hidden_size),
                   "no_cudnn": lstm_error(input_size, hidden_size, cudnn=False)}
            results["sweep_bf16_autocast"].append(row)
        bad = [row["hidden"] for row in results["sweep_bf16_autocast"] if row["input"] == input_size and row["cudnn"] > 0.02]
        largest_ok = max(row["cudnn"] for row in results["sweep_bf16_autocast"] if row["input"] == input_size and row["cudnn"] <= 0.02)
        print(f"   input {input_size:4d}: {bad or 'none'} (largest error elsewhere {largest_ok:.4f})")
    results["fp16_autocast_34_112"] = lstm_error(34, 112, dtype=torch.float16)
    print(f"   fp16 autocast, input 34, hidden 112: {results['fp16_autocast_34_112']:.4f}")

    print("\n2. Compacted IMDB LSTM against its masked original, both under bf16 autocast")
    config = RLPruneLSTMConfig(vocab_size=20000, max_seq_length=512, pad_token_id=0)
    ids = torch.randint(1, 20000, (256, 512), device="cuda")
    mask = torch.ones_like(ids)
    mask[:, 300:] = 0
    ids = ids * mask
    for spec in args.pruned_widths:
        embedding, hidden, dense = (int(width) for width in spec.split("/"))
        torch.manual_seed(args.seed)
        row = compaction_under_autocast(config, {"embeddings": embedding, "lstm_layers.0": hidden, "hidden_layers.0": dense}, ids, mask)
        results["compaction"][spec] = row
        print(f"   {spec}: " + "; ".join(f"{name}: max logit difference {value['max_logit_difference']:.4f}, "
                                           f"{value['flipped_predictions']}/{value['examples']} predictions flip" for name, value in row.items()))

    print("\n3. bf16-autocast training step of the dense IMDB LSTM (batch 128, 512 tokens), ms")
    for repeat in range(2):  # alternated, so that warm-up effects show
        for name, recurrence in (("bf16_recurrence", layer_before_fix), ("float32_recurrence", modeling_rlprune_lstm.run_lstm)):
            torch.manual_seed(args.seed)
            results["training_step_ms"].setdefault(name, []).append(round(training_step_ms(config, recurrence, ids[:128], mask[:128]), 2))
    print("   " + ", ".join(f"{name}: {values}" for name, values in results["training_step_ms"].items()))

    print("\n4. run_lstm with float16 weights against float32 on the CPU (input 34, batch 128, 64 steps)")
    results["float16_weights"] = {}
    for hidden_size in args.float16_hidden_sizes:
        lstm = nn.LSTM(34, hidden_size, batch_first=True)
        inputs = torch.randn(128, 64, 34)  # (B, T, D)
        with torch.no_grad():
            reference, _ = lstm(inputs)  # (B, T, H)
            half, half_inputs = lstm.cuda().half(), inputs.cuda().half()
            plain = float((modeling_rlprune_lstm.run_lstm(half, half_inputs).float().cpu() - reference).abs().max())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                autocast = float((modeling_rlprune_lstm.run_lstm(half, half_inputs).float().cpu() - reference).abs().max())
        results["float16_weights"][hidden_size] = {"no_autocast": plain, "bf16_autocast": autocast}
        print(f"   hidden {hidden_size}: {plain:.4f} without autocast, {autocast:.4f} under bf16 autocast")

    write_text_atomic(args.output, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
