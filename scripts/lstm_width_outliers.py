#!/usr/bin/env python
"""Which benchmark runs fell far below the rest, and the compacted LSTM shapes they share.

    python scripts/lstm_width_outliers.py --paths results/raw/*imdb*.json

Reads benchmark.py results files and prints every LSTM run sorted by test accuracy, with the compacted widths, the
compacted model's reward-split accuracy and, where `--select_best_epoch` recorded it, the masked model's reward-split
accuracy at its last epoch before compaction (both under the Trainer's bf16 autocast on a GPU). Then counts the runs
per shape: whether the hidden size is one that cuDNN's half-precision LSTM computed wrongly on the H100 (a multiple of
8 but not of 32, from 40 to 184: results/raw/cudnn-lstm-check.json, from scripts/cudnn_lstm_check.py), and whether the embedding is a multiple of 8.
Runs made since the model file's fix (the recurrence in float32 under autocast) are not affected by that fault.
"""

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class OutlierArguments:
    paths: list[str] = field(metadata={"help": "benchmark.py results JSON files (runs of LSTM models)."})
    below: float = field(default=0.84, metadata={"help": "Test accuracy under which a run counts as an outlier."})


def cudnn_half_fault_width(hidden: int) -> bool:
    """A hidden size for which cuDNN's half-precision LSTM was wrong on the H100 (torch 2.11, cuDNN 9.19): of the sizes
    swept (8-256), the multiples of 8 but not of 32 from 40 to 184."""
    return hidden % 8 == 0 and hidden % 32 != 0 and 40 <= hidden <= 184


def lstm_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        with open(path) as handle:
            results = json.load(handle)
        for run in results["runs"]:
            report = run["report"]
            widths = {layer["name"]: layer["width"] for layer in report.get("layers", [])}
            if "lstm_layers.0" not in widths:
                continue
            by_epoch = report.get("fine_tuning", {}).get("reward_split_by_epoch")
            last = by_epoch[-1] if by_epoch else None
            runs.append({
                "file": path.rsplit("/", 1)[-1], "method": run["method"], "budget": run["budget"], "seed": run["seed"],
                "embedding": widths["embeddings"], "hidden": widths["lstm_layers.0"], "test": run["test_accuracy"],
                "reward_split_compacted": report["accuracy"]["reward_split_pruned"],
                "reward_split_masked_last_epoch": last[-1] if isinstance(last, list) else last,
            })
    return runs


def main(argv=None) -> list[dict]:
    (args,) = HfArgumentParser(OutlierArguments).parse_args_into_dataclasses(args=argv)
    runs = sorted(lstm_runs(args.paths), key=lambda run: run["test"])
    print("| file | method | budget | seed | embedding | LSTM hidden | test | reward split, compacted | reward split, masked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        masked = f"{run['reward_split_masked_last_epoch']:.4f}" if run["reward_split_masked_last_epoch"] is not None else "–"
        print(f"| {run['file']} | {run['method']} | {run['budget']} | {run['seed']} | {run['embedding']} | {run['hidden']} | "
              f"{run['test']:.4f} | {run['reward_split_compacted']:.4f} | {masked} |")
    print()
    shapes = {}
    for run in runs:
        shape = (cudnn_half_fault_width(run["hidden"]), run["embedding"] % 8 == 0)
        total, low = shapes.get(shape, (0, 0))
        shapes[shape] = (total + 1, low + (run["test"] < args.below))
    for (faulty_hidden, input_aligned), (total, low) in sorted(shapes.items()):
        print(f"hidden size a multiple of 8, not of 32 (40-184): {faulty_hidden!s:5}  input size multiple of 8: {input_aligned!s:5}  "
              f"runs: {total:3d}  below {args.below:.2f} test: {low}")
    return runs


if __name__ == "__main__":
    main()
