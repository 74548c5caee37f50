#!/usr/bin/env python
"""Latency-aware pruning, measured: how good the latency table is, and what a latency budget buys over a MACs budget.

    python scripts/bench_latency.py                                  # ORT CPU, batch 128, reference CNN and LSTM
    python scripts/bench_latency.py --threads 2 --rounds 7 --output results/bench_latency.json

(a) The latency model's error: the table's estimate against the measured whole compacted model, for random
    allocations (widths multiples of 8, what latency budgets use) of the reference CNN and LSTM.
(b) For each budget on the reference CNN, three allocations and their measured speedup over dense:
    - macs_uniform: one keep ratio for every layer meeting the MACs budget (PruningEnv.uniform_keep_ratio, MACs);
    - macs_uniform_w8: the same with widths snapped to multiples of 8 (what snapping alone buys);
    - latency_uniform: one keep ratio meeting the latency budget (the table as the cost, widths multiples of 8);
    - latency_best_random: of N random allocations under the latency budget, the one keeping the most MACs (a
      proxy for accuracy: no training here).
    A budget of 0.5 asks for a 2x speedup, 0.25 for 4x; "of limit" is the measured speedup over that.

(c) With --policies_from, only this: the pruned widths of benchmark.py runs (made on any machine, e.g. a GPU host
    pruning under this machine's table) measured here against dense. The deployment workflow:

    python scripts/bench_latency.py --models cnn --compare_budgets false --save_tables tables   # on the deployment CPU
    python scripts/benchmark.py ... --methods ppo_latency --latency_table_path tables/cnn.json   # on the GPU host
    python scripts/bench_latency.py --policies_from results/raw/<that run>.json --policies_table tables/cnn.json  # back here

Every measurement is the median of `--repeats` runs after warm-up; models are measured round-robin for `--rounds`
rounds, so load from other processes hits all of them alike, and the least disturbed round (the lowest median)
counts: interference only ever adds time. The table's grid points are taken the same way (lowest median of two
passes). The JSON also holds every round and the errors against the median round. Weights are random: latency does
not depend on their values.
"""

import json
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, HfArgumentParser

from hf_rlprune import PruningEnv, RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.atomic import write_text_atomic
from hf_rlprune.pruning import LatencyTable, compute_macs, config_with_widths, get_prunable_groups, measure_latency
from hf_rlprune.tasks import CNN_PRESETS


@dataclass
class BenchLatencyArguments:
    models: list[str] = field(default_factory=lambda: ["cnn", "lstm"], metadata={"help": "Models for the error part (a): cnn, lstm."})
    model_config: str | None = field(
        default=None,
        metadata={"help": "A saved model (or config) folder: part (a) measures its structure instead of the reference model of "
                          "its kind (e.g. the IMDB LSTM's vocabulary, sequence length, pooling); --save_tables then writes "
                          "the table that model's runs can use."})
    runtime: str = field(default="onnxruntime", metadata={"help": "onnxruntime or torch."})
    device: str = field(default="cpu", metadata={"help": "cpu, or cuda with --runtime torch."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of every measurement."})
    threads: int | None = field(default=None, metadata={"help": "Intra-op threads (default: torch's default, the core count)."})
    grid: int = field(default=8, metadata={"help": "Latency table grid points per width axis."})
    table_repeats: int = field(default=5, metadata={"help": "Timed runs per table grid point."})
    table_passes: int = field(default=2, metadata={"help": "Passes over the table's grid; the lowest median counts (more for a noisy machine)."})
    allocations: int = field(default=10, metadata={"help": "Random allocations per model for the error part (a)."})
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25], metadata={"help": "Latency budgets for part (b), fractions of dense."})
    compare_budgets: bool = field(default=True, metadata={"help": "Run part (b), the MACs versus latency budget comparison."})
    random_allocations: int = field(default=200, metadata={"help": "N: random allocations under the latency budget (table cost only)."})
    rounds: int = field(default=5, metadata={"help": "Round-robin measurement rounds; the lowest round median counts."})
    repeats: int = field(default=10, metadata={"help": "Timed runs per measurement (median)."})
    warmup: int = field(default=3, metadata={"help": "Untimed runs first."})
    seed: int = field(default=0, metadata={"help": "Seed of the random allocations."})
    output: str = field(default="results/bench_latency.json", metadata={"help": "Where the JSON results go."})
    save_tables: str | None = field(
        default=None,
        metadata={"help": "Save each latency table measured in part (a) as DIR/<model>.json: the deployment machine's table that "
                          "RLPruneConfig.latency_table_path (benchmark.py --latency_table_path) reads on a training host."})
    policies_from: list[str] = field(
        default_factory=list,
        metadata={"help": "Part (c): benchmark.py results JSONs (CIFAR-10 CNNs); measure each run's pruned widths on this machine "
                          "against dense, e.g. policies searched on a GPU host under this machine's table. Skips (a) and (b)."})
    policies_table: str | None = field(default=None, metadata={"help": "With --policies_from: a saved table whose estimates are printed beside the measurements."})


MODELS = {
    "cnn": (RLPruneCNNConfig, RLPruneCNNForImageClassification),
    "lstm": (RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification),
}


def measure_round_robin(configs: list, args: BenchLatencyArguments) -> list[list[float]]:
    """Each compacted model's median latency in every round; models are measured in turn every round."""
    models = []
    for config in configs:
        torch.manual_seed(0)
        model_class = MODELS["cnn" if isinstance(config, RLPruneCNNConfig) else "lstm"][1]
        models.append(model_class(config).eval())
    per_round = [[] for _ in models]
    for _ in range(args.rounds):
        for index, model in enumerate(models):
            result = measure_latency(model, args.batch_size, args.runtime, args.device, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
            per_round[index].append(result.median_ms)
    return per_round


def random_snapped_widths(config, rng: random.Random, multiple: int = 8) -> dict[str, int]:
    """Keep ratios uniform in [0.1, 1], widths rounded down to multiples of `multiple` (at least one multiple)."""
    widths = {}
    for group in get_prunable_groups(config):
        width = max(1, int(rng.uniform(0.1, 1.0) * group.width))
        widths[group.name] = width if group.width <= multiple else min(group.width, max(multiple, width // multiple * multiple))
    return widths


def build_table(config, args: BenchLatencyArguments) -> tuple[LatencyTable, float]:
    """A freshly measured table (no cache: its build time is part of the result) and the seconds it took."""
    start = time.perf_counter()
    table = LatencyTable.build(config, args.runtime, args.batch_size, args.device, args.threads, grid=args.grid, repeats=args.table_repeats,
                              passes=args.table_passes)
    return table, time.perf_counter() - start


def model_config(name: str, args: BenchLatencyArguments):
    """The reference model of kind `name`, or the --model_config model when it is of that kind."""
    if args.model_config:
        config = AutoConfig.from_pretrained(args.model_config)
        if isinstance(config, MODELS[name][0]):
            return config
    return MODELS[name][0]()


def model_error(name: str, args: BenchLatencyArguments, tables: dict) -> dict:
    config = model_config(name, args)
    table, build_seconds = build_table(config, args)
    tables[name] = table
    rng = random.Random(args.seed)
    allocations = [random_snapped_widths(config, rng) for _ in range(args.allocations)]
    measured = measure_round_robin([config_with_widths(config, widths) for widths in allocations], args)
    rows = []
    for widths, rounds in zip(allocations, measured):
        estimate, lowest, median = table(widths), min(rounds), statistics.median(rounds)
        rows.append({"widths": widths, "estimated_ms": estimate, "measured_ms": lowest, "relative_error": (estimate - lowest) / lowest,
                     "median_round_ms": median, "relative_error_median_round": (estimate - median) / median, "rounds_ms": rounds})
    errors = [abs(row["relative_error"]) for row in rows]
    median_errors = [abs(row["relative_error_median_round"]) for row in rows]
    summary = {"model": name, "build_seconds": build_seconds, "table_dense_ms": table.dense_ms,
               "overhead_ms": table.overhead_ms, "mean_abs_relative_error": statistics.mean(errors),
               "max_abs_relative_error": max(errors), "mean_abs_relative_error_median_round": statistics.mean(median_errors),
               "max_abs_relative_error_median_round": max(median_errors), "allocations": rows, "latency_table": table.to_dict()}
    print(f"{name}: table built in {build_seconds:.1f} s; |error| mean {summary['mean_abs_relative_error']:.1%}, "
          f"max {summary['max_abs_relative_error']:.1%} over {len(rows)} allocations", flush=True)
    return summary


def allocations_for_budget(config, table: LatencyTable, budget: float, args: BenchLatencyArguments) -> dict[str, dict]:
    def episode(env, ratios):
        env.reset(seed=0)
        for ratio in ratios:
            *_, info = env.step(np.array([ratio], dtype=np.float32))
        return info["widths"]

    def zero_accuracy(widths):
        return 0.0

    macs_env = PruningEnv(config, zero_accuracy, target=budget, budget_kind="macs")
    macs_env_w8 = PruningEnv(config, zero_accuracy, target=budget, budget_kind="macs", width_multiple=8)
    latency_env = PruningEnv(config, zero_accuracy, target=budget, budget_kind="latency", latency_fn=table, width_multiple=8)
    chosen = {
        "macs_uniform": episode(macs_env, [macs_env.uniform_keep_ratio()] * len(macs_env.groups)),
        "macs_uniform_w8": episode(macs_env_w8, [macs_env_w8.uniform_keep_ratio()] * len(macs_env_w8.groups)),
        "latency_uniform": episode(latency_env, [latency_env.uniform_keep_ratio()] * len(latency_env.groups)),
    }
    rng = np.random.default_rng(args.seed)
    candidates = [episode(latency_env, rng.uniform(latency_env.min_keep, 1.0, len(latency_env.groups))) for _ in range(args.random_allocations)]
    chosen["latency_best_random"] = max(candidates, key=lambda widths: compute_macs(config, widths=widths))
    return chosen


def budget_comparison(args: BenchLatencyArguments, tables: dict) -> list[dict]:
    config = model_config("cnn", args)
    table = tables["cnn"] if "cnn" in tables else build_table(config, args)[0]
    dense_macs = compute_macs(config)
    plans = []
    for budget in args.budgets:
        try:
            plans += [(budget, kind, widths) for kind, widths in allocations_for_budget(config, table, budget, args).items()]
        except ValueError as error:  # e.g. a GPU whose fixed per-kernel cost no width can remove
            print(f"budget {budget}: skipped, {error}")
    if not plans:
        return []
    dense_widths = {g.name: g.width for g in get_prunable_groups(config)}
    measured = measure_round_robin([config] + [config_with_widths(config, widths) for _, _, widths in plans], args)
    dense_ms = min(measured[0])
    rows = []
    for (budget, kind, widths), rounds in zip(plans, measured[1:]):
        speedup = dense_ms / min(rounds)
        median_speedup = statistics.median(d / p for d, p in zip(measured[0], rounds))  # round by round
        rows.append({
            "budget": budget, "allocation": kind, "widths": widths, "macs_ratio": compute_macs(config, widths=widths) / dense_macs,
            "estimated_latency_ratio": table(widths) / table(dense_widths), "measured_ms": min(rounds), "dense_ms": dense_ms,
            "speedup": speedup, "limit": 1.0 / budget, "of_limit": speedup * budget, "median_round_speedup": median_speedup,
            "rounds_ms": rounds, "dense_rounds_ms": measured[0],
        })
    return rows


def policy_speedups(args: BenchLatencyArguments) -> tuple[list[dict], str]:
    """Part (c): each distinct pruned allocation of the runs in `--policies_from`, measured round-robin with dense."""
    plans, preset = {}, None
    for path in args.policies_from:
        with open(path) as handle:
            results = json.load(handle)
        if results.get("task") != "cifar10":
            raise ValueError(f"{path} holds task {results.get('task')!r}; --policies_from measures CIFAR-10 CNN results only (an LSTM's "
                             "shape depends on its tokenizer, which the results file does not record).")
        file_preset = results.get("args", {}).get("model_preset", "reference")
        if preset not in (None, file_preset):
            raise ValueError(f"{path} holds model preset {file_preset!r}, the other files {preset!r}; measure one model per call.")
        preset = file_preset
        for run in results["runs"]:
            widths = {layer["name"]: layer["width"] for layer in run["report"]["layers"]}
            key = (run["method"], run["budget"], tuple(widths.values()))
            plan = plans.setdefault(key, {"method": run["method"], "budget": run["budget"], "widths": widths, "seeds": [], "test_accuracies": [],
                                          "budget_kind": run["report"].get("budget_kind", "macs"), "file": path})
            plan["seeds"].append(run["seed"])
            plan["test_accuracies"].append(run["test_accuracy"])
    if not plans:
        raise ValueError(f"No runs in {args.policies_from}.")
    config = RLPruneCNNConfig(**CNN_PRESETS[preset])
    table = LatencyTable.load_for(args.policies_table, config, args.runtime, args.batch_size) if args.policies_table else None
    plans = sorted(plans.values(), key=lambda plan: (-plan["budget"], plan["budget_kind"], plan["method"], list(plan["widths"].values())))
    measured = measure_round_robin([config] + [config_with_widths(config, plan["widths"]) for plan in plans], args)
    dense_ms, dense_macs = min(measured[0]), compute_macs(config)
    for plan, rounds in zip(plans, measured[1:]):
        plan.update({"macs_ratio": compute_macs(config, widths=plan["widths"]) / dense_macs, "measured_ms": min(rounds), "dense_ms": dense_ms,
                     "speedup": dense_ms / min(rounds), "limit": 1.0 / plan["budget"], "rounds_ms": rounds, "dense_rounds_ms": measured[0],
                     "median_round_speedup": statistics.median(d / p for d, p in zip(measured[0], rounds)),
                     "estimated_latency_ratio": table(plan["widths"]) / table.dense_ms if table else None})
    lines = [f"Pruned allocations measured here ({args.runtime}, {args.device}, batch {args.batch_size}, "
             f"{args.threads or torch.get_num_threads()} threads; dense {dense_ms:.1f} ms):", "",
             "| budget | kind | method | widths | seeds | test accuracy | MACs ratio | est. latency ratio | speedup | limit | speedup (median round) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['budget']} | {p['budget_kind']} | {p['method']} | {'/'.join(str(w) for w in p['widths'].values())} | "
              f"{len(p['seeds'])} | {100 * statistics.mean(p['test_accuracies']):.2f} | {p['macs_ratio']:.3f} | "
              f"{'–' if p['estimated_latency_ratio'] is None else format(p['estimated_latency_ratio'], '.3f')} | {p['speedup']:.2f}x | "
              f"{p['limit']:.0f}x | {p['median_round_speedup']:.2f}x |" for p in plans]
    return plans, "\n".join(lines)


def markdown_tables(errors: list[dict], rows: list[dict], args: BenchLatencyArguments) -> str:
    lines = [f"Latency model ({args.runtime}, {args.device}, batch {args.batch_size}, {args.threads or torch.get_num_threads()} threads, grid {args.grid}):", "",
             "| model | table build (s) | allocations | mean abs. error | max abs. error | (vs median round: mean / max) |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {e['model']} | {e['build_seconds']:.1f} | {len(e['allocations'])} | {e['mean_abs_relative_error']:.1%} | {e['max_abs_relative_error']:.1%} | "
        f"{e['mean_abs_relative_error_median_round']:.1%} / {e['max_abs_relative_error_median_round']:.1%} |"
        for e in errors
    ]
    if rows:
        lines += ["", f"Reference CNN, MACs budget versus latency budget (dense {rows[0]['dense_ms']:.1f} ms):", "",
                  "| budget | allocation | widths | MACs ratio | est. latency ratio | measured ms | speedup | limit | of limit | speedup (median round) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['budget']} | {r['allocation']} | {'/'.join(str(w) for w in r['widths'].values())} | {r['macs_ratio']:.3f} | "
            f"{r['estimated_latency_ratio']:.3f} | {r['measured_ms']:.1f} | {r['speedup']:.2f}x | {r['limit']:.0f}x | {r['of_limit']:.0%} | "
            f"{r['median_round_speedup']:.2f}x |"
            for r in rows
        ]
    return "\n".join(lines)


def main(argv=None):
    (args,) = HfArgumentParser(BenchLatencyArguments).parse_args_into_dataclasses(args=argv)
    warnings.filterwarnings("ignore", module="torch.onnx")  # exporter chatter, once per exported model
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    if args.model_config:  # that model's kind only
        config = AutoConfig.from_pretrained(args.model_config)
        kinds = [name for name, (config_class, _) in MODELS.items() if isinstance(config, config_class)]
        if not kinds:
            raise ValueError(f"--model_config {args.model_config} holds a {type(config).__name__}; latency tables know "
                             "RLPruneCNNConfig and RLPruneLSTMConfig models.")
        args.models = kinds
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise ValueError(f"Unknown model(s) {unknown}; choose from {sorted(MODELS)}.")
    if args.policies_from:
        plans, table = policy_speedups(args)
        print(table)
        write_output(args, {"policies": plans, "table": table})
        return plans
    tables = {}
    errors = [model_error(name, args, tables) for name in args.models]
    if args.save_tables:
        for name, latency_table in tables.items():
            print(f"{name}: table saved to {latency_table.save(os.path.join(args.save_tables, f'{name}.json'))}")
    rows = budget_comparison(args, tables) if args.compare_budgets and args.budgets else []
    table = markdown_tables(errors, rows, args)
    print(table)
    write_output(args, {"errors": errors, "budgets": rows, "table": table})
    return errors, rows


def write_output(args: BenchLatencyArguments, results: dict) -> None:
    write_text_atomic(args.output, json.dumps({"arguments": vars(args), "threads": args.threads or torch.get_num_threads(),
                                               "load_average": os.getloadavg(), **results}, indent=2))


if __name__ == "__main__":
    main()
