#!/usr/bin/env python
"""RL pruning against the baselines on real CIFAR-10 / IMDB: every method gets the same fine-tuning recipe.

    # on a GPU (see the README's benchmark section for bringing the data to the lent machine)
    python scripts/benchmark.py --task cifar10 --dataset_dir ../shared/data/cifar10 --output_dir results
    python scripts/benchmark.py --task cifar10 --model_preset vgg6 --pretrain_epochs 20 --dataset_dir ../shared/data/cifar10
    python scripts/benchmark.py --task imdb --dataset_dir ../shared/data/imdb --pretrain_epochs 10
    # CPU-sized variant: a few thousand examples, a couple of epochs, minutes on a laptop
    python scripts/benchmark.py --task cifar10 --dataset_dir ../shared/data/cifar10 --cpu_small
    # tables, plot and model cards again from a results file (no training)
    python scripts/benchmark.py --report_only results/cifar10.json

Steps: pre-train the dense model with the plan's recipe (or load --dense_model_path); then, per budget, method and
seed, prune + fine-tune through RLPruneCallback with identical TrainingArguments (methods: the PPO agent, random
search with the same number of reward evaluations, uniform keep ratio, and uniform one-shot at step 1 as the
non-gradual reference); measure test accuracy, cost and latency; write results/<name>.json, .md and .png, and
model cards of the best pruned model per budget to model_cards/. `--prune_while_pretraining True` instead trains
each run from a fresh initialization for pre-training + fine-tuning epochs, pruning on the callback's schedule;
`--num_rounds 1 --start_fraction 0 --end_fraction 0` prunes once at the first fine-tuning step.
"""

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_rlprune import DistillationTrainer, RLPruneCallback, RLPruneConfig
from hf_rlprune.atomic import atomic_directory, write_text_atomic
from hf_rlprune.card import check_save_dir, plot_accuracy_vs_macs, render_model_card, update_trade_off
from hf_rlprune.device_data import DeviceBatchCollator, IndexDataset, task_tensors, tensor_accuracy
from hf_rlprune.pretraining import (
    PLAN_LEARNING_RATE,
    KeepBestEpoch,
    plan_optimizer,
    plan_then_finetune_optimizer,
    train_on_tensors,
)
from hf_rlprune.pruning import compare_latency, compute_macs, config_with_widths, count_parameters, latency_hardware
from hf_rlprune.tasks import (
    PRETRAIN_PATIENCE,
    build_model,
    load_checkpoint_tokenizer,
    load_model,
    prepare_task,
    resolve_max_length,
)

logger = logging.getLogger("hf_rlprune.benchmark")
MACS_METHODS = ("ppo", "random", "uniform", "oneshot")  # the MACs-budget comparison, and the default
METHODS = (*MACS_METHODS, "ppo_latency", "random_oneshot", "random_oneshot_latency")


@dataclass
class BenchmarkArguments:
    task: str = field(default="cifar10", metadata={"help": "cifar10 or imdb."})
    model_preset: str = field(default="reference", metadata={"help": "CIFAR-10 CNN: reference or vgg6."})
    dataset_dir: str | None = field(default=None, metadata={"help": "Hub id or local folder of the data."})
    output_dir: str = field(default="results", metadata={"help": "Where <name>.json/.md/.png go."})
    cards_dir: str = field(default="model_cards", metadata={"help": "Where the best pruned models' cards go."})
    dense_model_path: str | None = field(default=None, metadata={"help": "Load the dense model instead of pre-training."})
    save_dense_to: str | None = field(default=None, metadata={"help": "Save the pre-trained dense model here."})
    pretrain_epochs: int = field(default=50, metadata={"help": "Dense pre-training epochs (IMDB: the most; early-stopped on the reward split)."})
    pretrain_patience: int | None = field(default=None, metadata={"help": "Stop pre-training after this many epochs without reward-split gain."})
    finetune_epochs: float = field(default=10, metadata={"help": "Epochs of pruning + fine-tuning, the same for every method."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate (cosine decay), the same for every method."})
    prune_while_pretraining: bool = field(
        default=False,
        metadata={"help": "Each run starts from a fresh initialization (its seed) instead of the dense model and trains for "
                          "pretrain_epochs + finetune_epochs with the plan's pre-training recipe (Adam lr 1e-3, lr decay 1e-4; "
                          "finetune_lr is not used unless while_pretraining_lr says so), the "
                          "callback pruning on its schedule (start_fraction/end_fraction of that whole run): the same total "
                          "training as pre-training plus one-shot fine-tuning. The dense model is still pre-trained (or "
                          "loaded) as the reference; oneshot then trains the uniformly narrowed model from scratch. Results are named "
                          "<task>-while-pretraining."},
    )
    while_pretraining_lr: str = field(
        default="plan",
        metadata={"help": "With prune_while_pretraining: 'plan' uses the plan's pre-training schedule for all pretrain_epochs + "
                          "finetune_epochs; 'plan_then_finetune' uses it for pretrain_epochs, then the fine-tuning recipe "
                          "(finetune_lr on a cosine to 0) for the last finetune_epochs, the two schedules that pre-training "
                          "and then fine-tuning get."})
    select_best_epoch: bool = field(
        default=False,
        metadata={"help": "Keep the fine-tuning epoch with the best reward-split accuracy (among epochs after the last pruning "
                          "round), not the last one; the same for every method. The test split is never consulted."})
    distill_alpha: float = field(default=0.0, metadata={"help": "Distillation weight from the dense model while pruning and fine-tuning, "
                                                               "the same for every method (0: none)."})
    distill_temperature: float = field(default=4.0, metadata={"help": "Distillation temperature."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of pre-training and fine-tuning."})
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25], metadata={"help": "MACs budgets (fractions of dense)."})
    methods: list[str] = field(
        default_factory=lambda: list(MACS_METHODS),
        metadata={"help": f"Among {METHODS}; ppo_latency's budget is a fraction of the dense ORT CPU latency at batch 128, not of MACs; "
                          "random_oneshot fine-tunes one random allocation per seed (run many seeds: the best is the head-room); "
                          "random_oneshot_latency does so under ppo_latency's latency budget."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds per (budget, method)."})
    num_rounds: int = field(default=4, metadata={"help": "Pruning rounds of the gradual schedule."})
    width_multiple: int | None = field(
        default=None,
        metadata={"help": "RLPruneConfig.width_multiple for every method: snap kept widths to a multiple of this (unset: its "
                          "default, 8 for latency budgets and 1 for MACs budgets)."})
    start_fraction: float = field(default=0.0, metadata={"help": "Fraction of fine-tuning before the first round."})
    end_fraction: float = field(default=0.3, metadata={"help": "Fraction of fine-tuning at the last round; the rest recovers."})
    search_episodes: int = field(default=32, metadata={"help": "Reward evaluations per round (PPO and random search)."})
    recovery_steps: int = field(default=50, metadata={"help": "Recovery steps before each reward measurement."})
    refit_ridge: float | None = field(default=None, metadata={"help": "Refit the consumers before recovery at this ridge (RLPruneConfig refit=True, refit_ridge); unset: no refit, as in the main tables."})
    refit_applied: bool = field(default=False, metadata={"help": "RLPruneConfig.refit_applied: the fine-tuned model takes the chosen allocation's refit too."})
    importance: str = field(
        default="l1", metadata={"help": "RLPruneConfig.importance for every method: which units a width keeps (l1, l2, taylor, random)."})
    bn_recalibration_batches: int = field(
        default=0, metadata={"help": "RLPruneConfig.bn_recalibration_batches: recompute each candidate's batch-norm statistics on "
                                     "this many training batches before its reward (0: off, as in the main tables)."})
    reward_size: float = field(default=0.1, metadata={"help": "Fraction of training data held out for the reward."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})
    max_length: int | None = field(
        default=None, metadata={"help": "IMDB: tokens per review (default: the --dense_model_path model's max_seq_length, else 256)."})
    lstm_pooling: str = field(default="last", metadata={"help": "IMDB LSTM built here: its dense layers read the last state ('last', the plan's) or the mean over tokens ('mean')."})
    lstm_dropout: float = field(default=0.0, metadata={"help": "IMDB LSTM built here: dropout in [0, 1) on what its dense layers read and after each of them."})
    lstm_embedding_dropout: float = field(default=0.0, metadata={"help": "IMDB LSTM built here: dropout in [0, 1) on the word embeddings."})
    latency_table_path: str | None = field(
        default=None,
        metadata={"help": "ppo_latency: a latency table measured on the deployment machine (bench_latency.py --save_tables) instead "
                          "of one measured here; measure the resulting widths there with bench_latency.py --policies_from."})
    latency_runs: int = field(default=1, metadata={"help": "Measure latency for this many seeds per (budget, method)."})
    cpu_small: bool = field(default=False, metadata={"help": "CPU-sized run: 4000 examples, 2 epochs, 1 seed, small search."})
    report_only: list[str] | None = field(
        default=None, metadata={"help": "Rebuild table, plot and cards from these results JSON files (runs of one dense model merged; a later "
                                         "file's run of the same budget, method and seed replaces an earlier one)."}
    )
    card_latency: bool = field(
        default=False,
        metadata={"help": "Cards of runs measured without latency (--latency_runs 0) get ONNX Runtime CPU latency at batch 1 and "
                          "128, measured here on the pruned architecture and the dense one, rebuilt from the results; the card "
                          "names this machine's CPU and threads."})

    def __post_init__(self):
        if self.refit_applied and self.refit_ridge is None:
            raise ValueError("--refit_applied True needs --refit_ridge (e.g. 0.01): without it the benchmark does not refit.")
        if self.while_pretraining_lr not in ("plan", "plan_then_finetune"):
            raise ValueError(f"--while_pretraining_lr {self.while_pretraining_lr!r}: choose 'plan' or 'plan_then_finetune'.")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {METHODS}.")


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); numpy only, so the GPU image needs no scipy."""
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        rank = np.empty(len(values))
        rank[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):  # ties share their mean rank
            tied = values == value
            rank[tied] = rank[tied].mean()
        return rank

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def prune_config(args: BenchmarkArguments, method: str, budget: float, seed: int) -> RLPruneConfig:
    common = dict(target=budget, prune_seed=seed, search_episodes=args.search_episodes, recovery_steps=args.recovery_steps,
                  refit=args.refit_ridge is not None, refit_ridge=0.01 if args.refit_ridge is None else args.refit_ridge, refit_applied=args.refit_applied,
                  bn_recalibration_batches=args.bn_recalibration_batches, importance=args.importance,
                  num_rounds=args.num_rounds, start_fraction=args.start_fraction, end_fraction=args.end_fraction,
                  save_on_train_end=False, show_progress=False)
    if args.width_multiple is not None:
        common["width_multiple"] = args.width_multiple
    if method == "oneshot":  # one uniform cut at the first step, then plain fine-tuning
        return RLPruneConfig(**{**common, "method": "uniform", "num_rounds": 1, "start_fraction": 0.0, "end_fraction": 0.0})
    if method == "random_oneshot":  # one random allocation (the seed's), cut at the first step: best of N seeds = head-room
        return RLPruneConfig(**{**common, "method": "random", "search_episodes": 1, "num_rounds": 1, "start_fraction": 0.0,
                                "end_fraction": 0.0})
    latency_budget = dict(budget_kind="latency", latency_runtime="onnxruntime", latency_batch_size=128,
                          latency_table_path=args.latency_table_path)
    if method == "ppo_latency":  # the agent under a budget on ONNX Runtime CPU latency at batch 128 (widths snapped to 8)
        return RLPruneConfig(**{**common, "method": "ppo", **latency_budget})
    if method == "random_oneshot_latency":  # the head-room under that latency budget, as random_oneshot's under MACs
        return RLPruneConfig(**{**common, "method": "random", "search_episodes": 1, "num_rounds": 1, "start_fraction": 0.0,
                                "end_fraction": 0.0, **latency_budget})
    return RLPruneConfig(**{**common, "method": method})


class BestEpochOnRewardSplit(KeepBestEpoch):
    """Keeps the model of the epoch with the best reward-split accuracy, among epochs that end after the last pruning
    round (earlier epochs hold a wider model), and restores it at the end of training. Listed before RLPruneCallback,
    so the restored weights are what it compacts and reports."""

    def __init__(self, rlprune: RLPruneCallback, reward_tensors: dict, autocast_dtype):
        super().__init__(lambda model: tensor_accuracy(model, reward_tensors, autocast_dtype=autocast_dtype))
        self.rlprune = rlprune

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.rlprune.rounds_done >= self.rlprune.config.num_rounds:
            super().on_epoch_end(args, state, control, model=model, **kwargs)


def run_one(args, dense, data, tensors, method, budget, seed, device, autocast, measure_latency_now) -> dict:
    set_seed(seed)
    epochs, learning_rate, optimizers = args.finetune_epochs, args.finetune_lr, (None, None)
    if args.prune_while_pretraining:  # a fresh model trained with the pre-training recipe for as long as pre-training + fine-tuning
        model = type(dense)(copy.deepcopy(dense.config)).to(device)
        epochs, learning_rate = args.pretrain_epochs + args.finetune_epochs, PLAN_LEARNING_RATE
        if args.while_pretraining_lr == "plan_then_finetune":
            steps_per_epoch = len(tensors["train"]["labels"]) // args.batch_size  # the Trainer drops the last partial batch
            optimizers = plan_then_finetune_optimizer(model, round(args.pretrain_epochs * steps_per_epoch),
                                                      round(args.finetune_epochs * steps_per_epoch), args.finetune_lr)
        else:
            optimizers = plan_optimizer(model)
    else:
        model = copy.deepcopy(dense).to(device)
    callback = RLPruneCallback(prune_config(args, method, budget, seed), reward_dataset=IndexDataset(len(tensors["reward"]["labels"])),
                               data_collator=DeviceBatchCollator(tensors["reward"], train=False))
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            save_strategy="no", report_to=[], logging_steps=200, seed=seed, bf16=autocast is torch.bfloat16,
            dataloader_pin_memory=False, dataloader_drop_last=True, use_cpu=device.type == "cpu", disable_tqdm=True,
        )
        distillation = {}
        if args.distill_alpha > 0:  # the dense model teaches every method alike
            distillation = dict(teacher=copy.deepcopy(dense), alpha=args.distill_alpha, temperature=args.distill_temperature)
        best_epoch = BestEpochOnRewardSplit(callback, tensors["reward"], autocast) if args.select_best_epoch else None
        trainer = (DistillationTrainer if distillation else Trainer)(
            model=model, args=training, train_dataset=IndexDataset(len(tensors["train"]["labels"])),
            data_collator=DeviceBatchCollator(tensors["train"], train=True, seed=seed),
            callbacks=[best_epoch, callback] if best_epoch else [callback], optimizers=optimizers, **distillation)
        start = time.perf_counter()
        trainer.train()
        total_seconds = time.perf_counter() - start
    pruned = trainer.model
    report = callback.report
    accuracy = tensor_accuracy(pruned, tensors["test"], autocast_dtype=autocast)
    report["accuracy"] = {"split": "test", "dense": data["dense_accuracy"], "pruned": accuracy,
                          "reward_split_pruned": report["accuracy"]["pruned"]}
    update_trade_off(report)
    report["search"]["total_seconds"] = total_seconds
    if best_epoch is not None:  # which epoch was kept, and the reward-split accuracy of each candidate epoch
        report["fine_tuning"] = {"selected_epoch": best_epoch.best_epoch,  # [epoch, accuracy] pairs:
                                 "reward_split_by_epoch": [list(pair) for pair in zip(best_epoch.epochs, best_epoch.accuracies)]}
    report["latency_ms"] = latency_figures(dense, pruned, device) if measure_latency_now else {}
    if measure_latency_now:
        report["latency_hardware"] = latency_hardware(report["latency_ms"])
    final_reward = callback.history[-1]["reward"] if callback.history else None
    logger.info("%s budget %.2f seed %d: test %.4f (dense %.4f), MACs %.3f, %d evaluations, search %.1fs, total %.1fs",
                method, budget, seed, accuracy, data["dense_accuracy"], report["macs"]["pruned"] / report["macs"]["dense"],
                report["search"]["reward_evaluations"], report["search"]["search_seconds"], total_seconds)
    return {"method": method, "budget": budget, "seed": seed, "test_accuracy": accuracy, "final_reward": final_reward,
            "report": report}


def latency_figures(dense, pruned, device) -> dict:
    runs = [("onnxruntime", "cpu", 1), ("onnxruntime", "cpu", 128)] + ([("torch", "cuda", 128)] if device.type == "cuda" else [])
    return compare_latency(dense, pruned, runs)


def summarize(results: dict) -> dict:
    """Mean/std per (budget, method) and the reward fidelity per budget."""
    rows = {}
    for run in results["runs"]:
        rows.setdefault((run["budget"], run["method"]), []).append(run)
    summary = []
    for (budget, method), runs in sorted(rows.items(), key=lambda item: (-item[0][0], METHODS.index(item[0][1]))):
        accuracies = np.array([r["test_accuracy"] for r in runs])
        first = runs[0]["report"]
        latency = next((r["report"]["latency_ms"] for r in runs if r["report"].get("latency_ms")), {})
        summary.append({
            "budget": budget, "method": method, "seeds": len(runs),
            "accuracy_mean": float(accuracies.mean()), "accuracy_std": float(accuracies.std(ddof=1)) if len(runs) > 1 else 0.0,
            "macs": float(np.mean([r["report"]["macs"]["pruned"] for r in runs])),
            "macs_ratio": float(np.mean([r["report"]["macs"]["pruned"] / r["report"]["macs"]["dense"] for r in runs])),
            "params": float(np.mean([r["report"]["params"]["pruned"] for r in runs])),
            "pruning_ratio_units": float(np.mean([r["report"]["pruning_ratio"]["units_removed"] for r in runs])),
            "trade_off": float(np.mean([r["report"]["trade_off_score"]["pruned"] for r in runs])),
            "reward_evaluations": int(first["search"]["reward_evaluations"]),
            "search_seconds": float(np.mean([r["report"]["search"]["search_seconds"] for r in runs])),
            "total_seconds": float(np.mean([r["report"]["search"]["total_seconds"] for r in runs])),
            "latency_ms": latency,
            "keep_ratios": first["policy"],  # one seed's allocation: the seeds of a search method differ
            "keep_ratios_seed": runs[0]["seed"],
        })
    fidelity = {}
    for budget in sorted({r["budget"] for r in results["runs"]}, reverse=True):
        searched = [r for r in results["runs"] if r["budget"] == budget and r["method"] in ("ppo", "random", "uniform") and r["final_reward"] is not None]
        fidelity[str(budget)] = {"spearman": spearman([r["final_reward"] for r in searched], [r["test_accuracy"] for r in searched]),
                                 "policies": len(searched)}
    return {"rows": summary, "reward_fidelity": fidelity}


def markdown(results: dict, summary: dict) -> str:
    dense = results["dense"]
    lines = [
        f"**{results['name']}** on {results['device']}: dense test accuracy {100 * dense['accuracy']:.2f}%, "
        f"{dense['macs']:,} MACs, {dense['params']:,} params; pre-training {dense['pretrain_seconds']:.0f} s.",
        "",
        "| budget | method | test acc. (mean ± std) | Δ vs dense | MACs | params | units removed | acc./GFLOP | reward evals | search s | total s | ORT CPU b1 / b128 ms | GPU b128 ms | keep ratios (one seed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        latency = row["latency_ms"]
        ort = " / ".join(f"{latency[k]['pruned']:.2f}" for k in ("onnxruntime_cpu_batch1", "onnxruntime_cpu_batch128") if k in latency) or "–"
        gpu = f"{latency['torch_cuda_batch128']['pruned']:.2f}" if "torch_cuda_batch128" in latency else "–"
        ratios = ", ".join(f"{v:.2f}" for v in row["keep_ratios"].values())
        ratios += f" (seed {row['keep_ratios_seed']})" if "keep_ratios_seed" in row else ""
        lines.append(
            f"| {row['budget']:.2f}{' latency' if row['method'].endswith('_latency') else ''} | {row['method']} | {100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} "
            f"| {100 * (row['accuracy_mean'] - dense['accuracy']):+.2f} | {row['macs']:,.0f} ({row['macs_ratio']:.3f}) | {row['params']:,.0f} "
            f"| {100 * row['pruning_ratio_units']:.1f}% | {row['trade_off']:.3f} | {row['reward_evaluations']} | {row['search_seconds']:.1f} "
            f"| {row['total_seconds']:.1f} | {ort} | {gpu} | {ratios} |"
        )
    dense_latency = results["dense"].get("latency_ms", {})
    if dense_latency:
        lines += ["", "Dense latency (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in dense_latency.items()) + "."]
    for row in summary["rows"]:
        if row["method"] in ("random_oneshot", "random_oneshot_latency"):
            best = max((r for r in results["runs"] if r["method"] == row["method"] and r["budget"] == row["budget"]), key=lambda r: r["test_accuracy"])
            budget_kind = "latency" if row["method"].endswith("_latency") else "MACs"
            lines += ["", f"Best of {row['seeds']} random one-shot allocations, each fully fine-tuned, at {row['budget']:.2f} {budget_kind}: "
                      f"{100 * best['test_accuracy']:.2f}% (seed {best['seed']}, keep ratios "
                      f"{', '.join(f'{v:.2f}' for v in best['report']['policy'].values())})."]
    costs = search_cost(summary)
    if costs:
        lines += ["", "Search cost (mean search seconds over the mean total seconds of uniform pruning, i.e. fine-tuning alone): "
                  + ", ".join(f"{b:.2f} {method}: +{100 * c:.0f}%" for (b, method), c in costs.items()) + "."]
    lines += ["", "Reward fidelity (Spearman correlation of the final-round reward with test accuracy after fine-tuning, "
              "over the searched policies): " + ", ".join(f"{float(b):.2f} MACs: {f['spearman']:.2f} ({f['policies']} policies)"
                                                        for b, f in summary["reward_fidelity"].items()) + "."]
    return "\n".join(lines)


def search_cost(summary: dict) -> dict:
    """(budget, searching method) -> its search seconds as a fraction of the uniform run's total (fine-tuning alone)."""
    uniform = {row["budget"]: row["total_seconds"] for row in summary["rows"] if row["method"] == "uniform"}
    return {(row["budget"], row["method"]): row["search_seconds"] / uniform[row["budget"]]
            for row in summary["rows"] if row["budget"] in uniform and row["method"] in ("ppo", "random", "ppo_latency")}


def plot(results: dict, summary: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        rows = [r for r in summary["rows"] if r["method"] == method]
        if rows:
            axis.errorbar([r["macs_ratio"] for r in rows], [100 * r["accuracy_mean"] for r in rows],
                          yerr=[100 * r["accuracy_std"] for r in rows], fmt="o", capsize=3, label=method)
    axis.plot([1.0], [100 * results["dense"]["accuracy"]], "k*", markersize=12, label="dense")
    axis.set_xlabel("MACs / dense MACs")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{results['name']}: accuracy versus MACs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def portable_command(command: str, task: str) -> str:
    """The recorded command with machine paths replaced: data from ../shared/data, where the output goes left out, and a
    loaded dense model pre-trained instead (seed 0, so the same model), so the command runs on its own."""
    words, kept, index = command.split(), [], 0
    while index < len(words):
        word = words[index]
        if word in ("--output_dir", "--cards_dir", "--save_dense_to"):
            index += 2
            continue
        if word == "--dataset_dir":
            kept += [word, f"../shared/data/{task}"]
            index += 2
            continue
        if word == "--dense_model_path":
            kept += ["--save_dense_to", f"outputs/dense-{task}"]
            index += 2
            continue
        kept.append(word)
        index += 1
    return " ".join(kept)


def write_outputs(results: dict, args: BenchmarkArguments) -> dict:
    summary = summarize(results)
    results["summary"] = summary
    os.makedirs(args.output_dir, exist_ok=True)
    base = os.path.join(args.output_dir, results["name"])
    write_text_atomic(base + ".json", json.dumps(results, indent=1))
    table = markdown(results, summary)
    write_text_atomic(base + ".md", table + "\n")
    plot(results, summary, base + ".png")
    print(table)
    # cards of the best pruned model per budget (highest test accuracy among the searched runs)
    os.makedirs(args.cards_dir, exist_ok=True)
    for budget in sorted({r["budget"] for r in results["runs"]}, reverse=True):
        # MACs-budget methods only: ppo_latency's budget is a latency fraction, random_oneshot a head-room probe
        runs = [r for r in results["runs"] if r["budget"] == budget and r["method"] in MACS_METHODS]
        if not runs:
            continue
        best = max(runs, key=lambda r: r["test_accuracy"])
        name = f"{results['name']}-{int(round(100 * budget))}pct-macs"
        command = " && ".join(portable_command(part, results["task"]) for part in best.get("command", results["command"]).split(" && "))
        report = dict(best["report"], command=command)
        if args.card_latency and not report.get("latency_ms"):
            report.update(architecture_latency(results, report))
        has_plot = plot_accuracy_vs_macs(report, os.path.join(args.cards_dir, f"{name}.png"))
        card = render_model_card(report, repo_id=f"hf-rlprune/{name}", reproduce_command=command, dataset_name=results["task"],
                                 plot_file=f"{name}.png" if has_plot else None, report_file=f"{name}.json")
        write_text_atomic(os.path.join(args.cards_dir, f"{name}.json"), json.dumps(report, indent=2, sort_keys=True) + "\n")
        card.save(os.path.join(args.cards_dir, f"{name}.md"))
    return summary


def architecture_latency(results: dict, report: dict) -> dict:
    """ONNX Runtime CPU latency (batch 1 and 128) of a run's pruned architecture and of the dense one, measured here.
    Widths, not weight values, set the time, so freshly initialized models with the run's widths stand in for the
    trained ones; they are rebuilt from the results' arguments and checked against the run's MACs and params."""
    settings = results["args"]
    dense = build_model(results["task"], settings.get("model_preset", "reference"), max_length=settings.get("max_length") or 256,
                        lstm_pooling=settings.get("lstm_pooling", "last"))
    widths = {layer["name"]: layer["width"] for layer in report["layers"]}
    pruned = type(dense)(config_with_widths(dense.config, widths))
    rebuilt = {"macs": (compute_macs(dense.config), compute_macs(pruned.config)),
               "params": (count_parameters(dense.config), count_parameters(pruned.config))}
    for figure, (dense_value, pruned_value) in rebuilt.items():
        if (dense_value, pruned_value) != (report[figure]["dense"], report[figure]["pruned"]):
            raise ValueError(f"Rebuilt from {results['name']}'s arguments, the models have {figure} {dense_value} / {pruned_value}, "
                             f"but the run recorded {report[figure]['dense']} / {report[figure]['pruned']}: its architecture is not "
                             "known here. Measure latency in the run itself (--latency_runs).")
    latency_ms = compare_latency(dense.eval(), pruned.eval(), [("onnxruntime", "cpu", 1), ("onnxruntime", "cpu", 128)])
    return {"latency_ms": latency_ms, "latency_hardware": latency_hardware(latency_ms),
            "latency_note": "measured after the run, on its architecture with freshly initialized weights"}


def merge_results(paths: list[str]) -> dict:
    """One results dict from several runs of the benchmark on the same dense model (e.g. one file per budget)."""
    merged = None
    for path in paths:
        with open(path) as handle:
            results = json.load(handle)
        for run in results["runs"]:
            run.setdefault("command", results["command"])
        if merged is None:
            merged = results
            continue
        if abs(results["dense"]["accuracy"] - merged["dense"]["accuracy"]) > 1e-9 or results["name"] != merged["name"]:
            raise ValueError(f"{path} holds runs of another dense model ({results['name']}, accuracy {results['dense']['accuracy']}).")
        # a later file's run of the same (budget, method, seed) replaces the earlier one
        replaced = {(r["budget"], r["method"], r["seed"]) for r in results["runs"]}
        merged["runs"] = [r for r in merged["runs"] if (r["budget"], r["method"], r["seed"]) not in replaced] + results["runs"]
        merged["command"] += " && " + results["command"]
    return merged


@dataclass
class TaskSetup:
    """What every run of a benchmark shares: the device, the data on it, and the dense reference model."""

    device: torch.device
    autocast: torch.dtype | None
    tensors: dict  # split -> tensors on the device
    dense: torch.nn.Module
    name: str
    history: list  # reward-split accuracy per pre-training epoch (empty when loaded)
    pretrain_seconds: float
    dense_accuracy: float


def setup_task(args: BenchmarkArguments) -> TaskSetup:
    """Load the data onto the device once, then pre-train the dense model with the plan's recipe (seed 0, so every
    script rebuilds the same one) or load it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    set_seed(0)
    # a loaded LSTM reads its tokens through the tokenizer saved with it, never one trained anew on other data
    tokenizer = load_checkpoint_tokenizer(args.dense_model_path) if args.dense_model_path and args.task == "imdb" else None
    args.max_length = resolve_max_length(args.max_length, args.dense_model_path)
    data = prepare_task(args.task, args.dataset_dir, reward_size=args.reward_size, seed=0,
                        max_train_samples=args.max_train_samples, max_length=args.max_length, tokenizer=tokenizer)
    pad_token_id = getattr(data.processing_class, "pad_token_id", None) or 0
    tensors = {split: task_tensors(getattr(data, split), device, pad_token_id) for split in ("train", "reward", "test")}
    name = args.task if args.task == "imdb" or args.model_preset == "reference" else f"{args.task}-{args.model_preset}"
    start = time.perf_counter()
    if args.dense_model_path:
        dense = load_model(args.task, args.dense_model_path).to(device)
        history = []
    else:
        dense = build_model(args.task, args.model_preset, data, max_length=args.max_length, lstm_pooling=args.lstm_pooling,
                            lstm_dropout=args.lstm_dropout, lstm_embedding_dropout=args.lstm_embedding_dropout).to(device)
        patience = args.pretrain_patience if args.pretrain_patience is not None else PRETRAIN_PATIENCE.get(args.task)
        history = train_on_tensors(dense, tensors["train"], args.pretrain_epochs, batch_size=args.batch_size, seed=0,
                                   autocast_dtype=autocast, eval_tensors=tensors["reward"], patience=patience, log=logger.info)
        if args.save_dense_to:  # atomically: a run cut off mid-save must not leave a model --dense_model_path would load
            with atomic_directory(args.save_dense_to) as staging:
                dense.save_pretrained(staging)
                data.processing_class.save_pretrained(staging)
    pretrain_seconds = time.perf_counter() - start
    dense_accuracy = tensor_accuracy(dense, tensors["test"], autocast_dtype=autocast)
    logger.info("dense %s: test accuracy %.4f after %.1fs", name, dense_accuracy, pretrain_seconds)
    return TaskSetup(device, autocast, tensors, dense, name, history, pretrain_seconds, dense_accuracy)


def main(argv=None):
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.report_only:
        return write_outputs(merge_results(args.report_only), args)
    if args.save_dense_to:  # saving the dense model replaces the whole folder
        check_save_dir(args.save_dense_to, output_dir=args.output_dir, marker="config.json", name="--save_dense_to")
    if args.cpu_small:
        args.max_train_samples, args.pretrain_epochs, args.finetune_epochs = 4000, 3, 2
        args.seeds, args.search_episodes, args.recovery_steps, args.num_rounds = [0], 8, 10, 2
        args.latency_runs, args.max_length = 1, min(args.max_length or 128, 128)
    for method in args.methods:  # every run's pruning settings, checked before minutes of pre-training
        for budget in args.budgets:
            prune_config(args, method, budget, args.seeds[0])
    os.makedirs(args.output_dir, exist_ok=True)
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    setup = setup_task(args)
    dense, device = setup.dense, setup.device
    name = setup.name + ("-while-pretraining" if args.prune_while_pretraining else "")
    results = {
        "name": name, "task": args.task, "command": command,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "args": {k: v for k, v in vars(args).items()},
        "dense": {"accuracy": setup.dense_accuracy, "macs": compute_macs(dense), "params": count_parameters(dense),
                  "pretrain_seconds": setup.pretrain_seconds, "pretrain_reward_accuracy_per_epoch": setup.history,
                  "latency_ms": {k: v["dense"] for k, v in latency_figures(dense, dense, device).items()}},
        "runs": [],
    }
    for budget in args.budgets:
        for method in args.methods:
            for index, seed in enumerate(args.seeds):
                results["runs"].append(run_one(args, dense, {"dense_accuracy": setup.dense_accuracy}, setup.tensors, method, budget, seed,
                                               device, setup.autocast, measure_latency_now=index < args.latency_runs))
                # survives a cut-off run, even one cut off while writing it
                write_text_atomic(os.path.join(args.output_dir, f"{name}.partial.json"), json.dumps(results))
    return write_outputs(results, args)


if __name__ == "__main__":
    main()
