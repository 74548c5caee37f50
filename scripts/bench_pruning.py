#!/usr/bin/env python
"""Cost of uniformly pruned reference models: MACs, params and measured latency, dense versus pruned.

    python scripts/bench_pruning.py                       # CNN and LSTM, keep ratios 1.0/0.7/0.5/0.3, CPU
    python scripts/bench_pruning.py --models cnn --repeats 30 --output results/bench_pruning.json

Latency is the median of `--repeats` runs after warm-up, batch 1 and 128, in torch (CPU, and CUDA when present) and
ONNX Runtime (CPU, the exported compacted model). "speedup / MACs reduction" says how much of the MACs saving turns
into real speed (1.0 = all of it). Weights are random: latency does not depend on their values.
"""

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.atomic import write_text_atomic
from hf_rlprune.pruning import apply_masks, compact, compute_macs, count_parameters, masks_from_widths, measure_latency, widths_from_keep_ratios


@dataclass
class BenchArguments:
    models: list[str] = field(default_factory=lambda: ["cnn", "lstm"], metadata={"help": "Which reference models: cnn, lstm."})
    keep_ratios: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.3], metadata={"help": "Uniform keep ratios to measure."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 128], metadata={"help": "Batch sizes to time."})
    repeats: int = field(default=20, metadata={"help": "Timed runs per measurement (median reported)."})
    warmup: int = field(default=5, metadata={"help": "Untimed runs first."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: torch's default, the core count)."})
    output: str = field(default="results/bench_pruning.json", metadata={"help": "Where the JSON results go."})


def reference_model(name: str):
    torch.manual_seed(0)
    if name == "cnn":
        return RLPruneCNNForImageClassification(RLPruneCNNConfig()).eval()
    if name == "lstm":
        return RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig()).eval()
    raise ValueError(f"Unknown model {name!r}; choose cnn or lstm.")


def runtimes():
    found = [("onnxruntime", "cpu"), ("torch", "cpu")]
    if torch.cuda.is_available():
        found.append(("torch", "cuda"))
    return found


def bench_model(name: str, args: BenchArguments) -> list[dict]:
    dense = reference_model(name)
    dense_macs = compute_macs(dense)
    rows, dense_latency = [], {}
    # the dense model first (timed even when not asked for): every speedup divides its latency
    for ratio in [1.0] * (1.0 not in args.keep_ratios) + sorted(args.keep_ratios, reverse=True):
        model = reference_model(name)
        if ratio < 1.0:
            widths = widths_from_keep_ratios(model, {name: ratio for name in _group_names(model)})
            apply_masks(model, masks_from_widths(model, widths))
        small = compact(model).eval()
        row = {"model": name, "keep_ratio": ratio, "macs": compute_macs(small), "params": count_parameters(small),
               "macs_reduction": dense_macs / compute_macs(small), "latency_ms": {}, "speedup": {}}
        for runtime, device in runtimes():
            for batch in args.batch_sizes:
                key = f"{runtime}_{device}_b{batch}"
                result = measure_latency(small, batch, runtime, device=device, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
                row["latency_ms"][key] = result.median_ms
                if ratio == 1.0:
                    dense_latency[key] = result.median_ms
                row["speedup"][key] = dense_latency[key] / result.median_ms
        if ratio not in args.keep_ratios:
            continue
        rows.append(row)
        print(f"{name} keep {ratio}: MACs {row['macs']:,} params {row['params']:,} " +
              " ".join(f"{k}={v:.2f}ms" for k, v in row["latency_ms"].items()), flush=True)
    return rows


def _group_names(model):
    from hf_rlprune.pruning import get_prunable_groups

    return [group.name for group in get_prunable_groups(model)]


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0]["latency_ms"])
    header = "| model | keep | MACs | params | MACs reduction | " + " | ".join(f"{k} ms (speedup / MACs red.)" for k in keys) + " |"
    lines = [header, "|" + "---|" * (5 + len(keys))]
    for row in rows:
        cells = [f"{row['latency_ms'][k]:.2f} ({row['speedup'][k]:.2f}x / {row['speedup'][k] / row['macs_reduction']:.2f})" for k in keys]
        lines.append(f"| {row['model']} | {row['keep_ratio']} | {row['macs']:,} | {row['params']:,} | {row['macs_reduction']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in bench_model(name, args)]
    table = markdown_table(rows)
    print(table)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    write_text_atomic(args.output, json.dumps({"device": device, "cpu_threads": torch.get_num_threads(), "rows": rows, "table": table}, indent=2))
    return rows


if __name__ == "__main__":
    main()
