#!/usr/bin/env python
"""Reward fidelity against recovery length: how well the search's reward ranks allocations by their accuracy after
full fine-tuning, and what each recovery length costs per candidate.

    python scripts/bench_fidelity.py --task cifar10 --dataset_dir ../shared/data/cifar10 \
        --policies_from results/raw/cifar10-random-oneshot-b25.json --fidelity_recovery_steps 0 20 40 100 200

The policies are the random one-shot allocations of a `benchmark.py --methods random_oneshot` run: diverse
allocations at one budget, each already fine-tuned with the full recipe (its test accuracy is in that file). Here
each is scored again from the same dense model (rebuilt by benchmark.py's seed-0 pre-training, or loaded with
--dense_model_path; its test accuracy must match the file's) by RewardEvaluator with each recovery length. All
candidates share one set of recovery batches and the reward split, as within one search round. (The benchmark's
callback measured its rewards after the first fine-tuning step, with per-seed recovery batches, so the file's own
rewards differ slightly from these.) Prints the Spearman correlation of reward with test accuracy and the
milliseconds per candidate (after an untimed warm-up), and writes them to --output. The correlation with the same
models' accuracy on the held-out reward split is printed beside it: compare reward designs on that one, not on test.
--fidelity_refit_ridges adds rows with the consumers refitted before recovery (CandidateRepair refit_ridge), and
--fidelity_bn_recalibration_batches rows with each candidate's batch-norm statistics recomputed. Data and pre-training take
benchmark.py's arguments; its method, seed and search arguments do nothing here, and --budgets picks the policies.
"""

import json
import logging
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from benchmark import BenchmarkArguments, setup_task, spearman  # scripts/ is on sys.path when run as a script
from hf_rlprune import RLPruneConfig
from hf_rlprune.atomic import write_text_atomic
from hf_rlprune.device_data import DeviceBatchCollator, IndexDataset
from hf_rlprune.pruning import widths_from_keep_ratios
from hf_rlprune.reward import CandidateRepair, RewardEvaluator, take_batches

logger = logging.getLogger("hf_rlprune.bench_fidelity")


@dataclass
class FidelityArguments(BenchmarkArguments):
    policies_from: str = field(default="results/raw/cifar10-random-oneshot-b25.json",
                               metadata={"help": "A benchmark.py results JSON whose random_oneshot runs are the policies."})
    fidelity_recovery_steps: list[int] = field(default_factory=lambda: [0, 20, 40, 100, 200],
                                               metadata={"help": "Recovery lengths (Adam steps per candidate) to compare."})
    fidelity_refit_ridges: list[float] = field(
        default_factory=list,
        metadata={"help": "Also score with the consumers refitted (CandidateRepair refit_ridge) at each of these ridges, "
                          "at every recovery length."})
    fidelity_bn_recalibration_batches: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Batch-norm recalibration lengths (CandidateRepair bn_recalibration_batches; 0: off) to compare, "
                          "with every refit ridge and recovery length."})
    output: str = field(default="results/fidelity.json", metadata={"help": "Where the JSON results go."})


def load_policies(path: str, task: str, budgets: list[float]) -> tuple[list[dict], float]:
    """The random_oneshot runs at one of `budgets` in a results file (policy keep ratios, test accuracy) and the
    dense test accuracy. Allocations of different budgets are not ranked together: one budget per study."""
    with open(path) as handle:
        results = json.load(handle)
    if results.get("task") != task:
        raise ValueError(f"{path} holds task {results.get('task')!r}, not {task!r}; pass --task {results.get('task')}.")
    runs = [run for run in results["runs"] if run["method"] == "random_oneshot" and run["budget"] in budgets]
    found = sorted({run["budget"] for run in runs})
    if len(found) > 1:
        raise ValueError(f"{path} has random_oneshot runs at budgets {found}; pick one with --budgets.")
    if len(runs) < 3:
        raise ValueError(f"{path} has {len(runs)} random_oneshot runs at budgets {budgets}; a rank correlation needs at least 3 "
                         "(run benchmark.py --methods random_oneshot --seeds 0 1 ... 19).")
    return runs, results["dense"]["accuracy"]


def recovery_batches(setup, steps: int, batch_size: int, seed: int = 0) -> list[dict]:
    """`steps` shuffled, augmented training batches, the same for every candidate and recovery length."""
    train = setup.tensors["train"]
    loader = DataLoader(IndexDataset(len(train["labels"])), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=DeviceBatchCollator(train, train=True, seed=seed))
    return take_batches(loader, steps)


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(FidelityArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if any(steps < 0 for steps in args.fidelity_recovery_steps):
        raise ValueError(f"--fidelity_recovery_steps {args.fidelity_recovery_steps} must all be >= 0.")
    if any(count < 0 for count in args.fidelity_bn_recalibration_batches):
        raise ValueError(f"--fidelity_bn_recalibration_batches {args.fidelity_bn_recalibration_batches} must all be >= 0.")
    if args.cpu_small:
        raise ValueError("--cpu_small is benchmark.py's shorthand; pass the settings it stands for (--max_train_samples 4000 "
                         "--pretrain_epochs 3 --max_length 128) so the dense model matches that run's.")
    runs, file_dense_accuracy = load_policies(args.policies_from, args.task, args.budgets)
    setup = setup_task(args)
    if abs(setup.dense_accuracy - file_dense_accuracy) > 1e-4:
        raise ValueError(f"The dense model's test accuracy {setup.dense_accuracy:.4f} differs from {file_dense_accuracy:.4f} in "
                         f"{args.policies_from}: these policies were fine-tuned from another dense model. Pass the same "
                         "--dense_model_path / pre-training arguments as that run.")
    prune = RLPruneConfig()  # the callback's defaults: reward batch size, recovery lr, importance, candidates per pass
    reward = DataLoader(IndexDataset(len(setup.tensors["reward"]["labels"])), batch_size=prune.reward_batch_size,
                        collate_fn=DeviceBatchCollator(setup.tensors["reward"], train=False))
    reward_batches = list(reward)
    candidates = [widths_from_keep_ratios(setup.dense, run["report"]["policy"]) for run in runs]
    accuracies = [run["test_accuracy"] for run in runs]
    # the same fine-tuned models on the held-out reward split: a ranking target that is not the test split
    held_out = [run["report"]["accuracy"].get("reward_split_pruned") for run in runs]
    refit_batches = 4
    most = max(args.fidelity_recovery_steps + args.fidelity_bn_recalibration_batches + [refit_batches])
    shared_batches = recovery_batches(setup, most, args.batch_size)
    rows = []

    def evaluator_for(steps, ridge, norm_batches):
        repair = CandidateRepair(refit_ridge=ridge, refit_batches=refit_batches, bn_recalibration_batches=norm_batches,
                                 recovery_steps=steps, recovery_lr=prune.recovery_lr)
        evaluator = RewardEvaluator(reward_batches, shared_batches[:repair.training_batches], repair=repair, importance=prune.importance,
                                    autocast_dtype=setup.autocast, candidates_per_pass=prune.candidates_per_pass)
        evaluator.begin_round(setup.dense)
        return evaluator

    def seconds(work):
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = work()
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    warm_up_ridge = args.fidelity_refit_ridges[0] if args.fidelity_refit_ridges else None  # the refit's solver too
    warm_up = evaluator_for(1, warm_up_ridge, max(args.fidelity_bn_recalibration_batches))
    warm_up.evaluate_batch(candidates[: prune.candidates_per_pass])  # untimed: kernels, allocator
    for ridge in [None] + args.fidelity_refit_ridges:
        for norm_batches in args.fidelity_bn_recalibration_batches:
            for steps in args.fidelity_recovery_steps:
                # once per search round (the refit's reference outputs), then per candidate
                evaluator, setup_seconds = seconds(lambda: evaluator_for(steps, ridge, norm_batches))
                rewards, candidate_seconds = seconds(lambda: evaluator.evaluate_batch(candidates))
                rows.append({"refit_ridge": ridge, "bn_recalibration_batches": norm_batches, "recovery_steps": steps,
                             "spearman": spearman(rewards, accuracies),
                             "spearman_reward_split": spearman(rewards, held_out) if None not in held_out else float("nan"),
                             "ms_per_candidate": 1000 * candidate_seconds / len(candidates), "round_setup_ms": 1000 * setup_seconds,
                             "rewards": rewards})
                logger.info("refit %s, batch-norm recalibration %d batches, recovery %d steps: Spearman %.2f (reward split %.2f), "
                            "%.1f ms per candidate", ridge, norm_batches, steps, rows[-1]["spearman"], rows[-1]["spearman_reward_split"],
                            rows[-1]["ms_per_candidate"])
    budgets = sorted({run["budget"] for run in runs})
    lines = [f"Reward fidelity on {setup.name} ({len(runs)} random one-shot allocations at MACs budget(s) {budgets}, each fine-tuned "
             f"in {args.policies_from}; device {setup.device.type}):", "",
             "| refit ridge | BN recalibration batches | recovery steps | Spearman vs test accuracy after fine-tuning | "
             "vs reward-split accuracy after fine-tuning | ms per candidate | ms per round (setup) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {'–' if row['refit_ridge'] is None else row['refit_ridge']} | {row['bn_recalibration_batches']} | "
              f"{row['recovery_steps']} | {row['spearman']:.2f} | "
              f"{row['spearman_reward_split']:.2f} | {row['ms_per_candidate']:.1f} | {row['round_setup_ms']:.0f} |" for row in rows]
    print("\n".join(lines))
    summary = {"command": "python scripts/bench_fidelity.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
               "device": torch.cuda.get_device_name(0) if setup.device.type == "cuda" else "cpu",
               "dense_accuracy": setup.dense_accuracy, "policies": [run["report"]["policy"] for run in runs],
               "test_accuracies": accuracies, "reward_split_accuracies": held_out, "rows": rows, "table": "\n".join(lines)}
    write_text_atomic(args.output, json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
