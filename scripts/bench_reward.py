#!/usr/bin/env python
"""Reward evaluation speed: candidates evaluated one at a time against K stacked in one vmapped pass.

    python scripts/bench_reward.py                      # CPU
    python scripts/bench_reward.py --device cuda        # GPU, bf16 autocast, as the benchmark runs it
    python scripts/bench_reward.py --device cuda --model lstm --recovery_steps 50 --candidates_per_pass 1 4 8
    python scripts/bench_reward.py --recovery_steps 0 --refit_ridge 0.01   # the refit's cost per candidate

Each candidate is a random allocation of the reference CIFAR-10 CNN (or IMDB LSTM: random token ids, `seq_len`
long), recovered for `recovery_steps` Adam steps on batches of 128 random inputs and measured on `reward_batches`
batches, exactly as RewardEvaluator does in a search. LSTM candidates stack as one block-diagonal LSTM
(hf_rlprune.batched_lstm). Prints milliseconds per candidate for each K and how far each K's rewards are from K=1's.
"""

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.pruning import get_prunable_groups
from hf_rlprune.reward import CandidateRepair, RewardEvaluator


@dataclass
class BenchRewardArguments:
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    model: str = field(default="cnn", metadata={"help": "cnn (reference CIFAR-10 CNN) or lstm (reference IMDB LSTM)."})
    seq_len: int = field(default=512, metadata={"help": "LSTM only: tokens per example (the IMDB benchmark's max_length)."})
    candidates: int = field(default=16, metadata={"help": "Candidate allocations timed per setting."})
    candidates_per_pass: list[int] = field(default_factory=lambda: [1, 8, 16], metadata={"help": "K values (1: one at a time; always run first, as the reference)."})
    recovery_steps: int = field(default=40, metadata={"help": "Recovery steps per candidate (the CIFAR-10 benchmark's)."})
    refit_ridge: float | None = field(default=None, metadata={"help": "Refit the consumers first, at this ridge (unset: no refit)."})
    reward_batches: int = field(default=20, metadata={"help": "Batches of 128 in the reward split."})
    seed: int = field(default=0, metadata={"help": "Seed of the data and the allocations."})


def random_batches(args, config, count: int, generator: torch.Generator) -> list[dict]:
    if args.model == "lstm":
        return [{"input_ids": torch.randint(1, config.vocab_size, (128, args.seq_len), generator=generator),
                 "labels": torch.randint(0, 2, (128,), generator=generator)} for _ in range(count)]
    return [{"pixel_values": torch.randn(128, 3, 32, 32, generator=generator), "labels": torch.randint(0, 10, (128,), generator=generator)}
            for _ in range(count)]


def random_allocation(model, rng: np.random.Generator) -> dict[str, int]:
    """Each group keeps between an eighth and all of its units."""
    return {group.name: int(rng.integers(max(1, group.width // 8), group.width + 1)) for group in get_prunable_groups(model)}


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(BenchRewardArguments).parse_args_into_dataclasses(args=argv)
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    if args.model not in ("cnn", "lstm"):
        raise ValueError(f"--model {args.model!r} is unknown; use cnn or lstm.")
    if args.model == "lstm":
        model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(max_seq_length=args.seq_len)).to(device)
    else:
        model = RLPruneCNNForImageClassification(RLPruneCNNConfig()).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    reward_batches = random_batches(args, model.config, args.reward_batches, generator)
    recovery_batches = random_batches(args, model.config, 10, generator)
    rng = np.random.default_rng(args.seed)
    candidates = [random_allocation(model, rng) for _ in range(args.candidates)]
    results, reference = {}, None
    for per_pass in sorted(set(args.candidates_per_pass) | {1}):  # K=1 first: the reference every K is compared with
        repair = CandidateRepair(refit_ridge=args.refit_ridge, recovery_steps=args.recovery_steps)
        evaluator = RewardEvaluator(reward_batches, recovery_batches, repair=repair, candidates_per_pass=per_pass,
                                    stack_candidates=per_pass > 1, autocast_dtype=autocast)
        evaluator.begin_round(model)
        evaluator.evaluate_batch(candidates[:per_pass])  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rewards = evaluator.evaluate_batch(candidates)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_candidate_ms = 1000 * (time.perf_counter() - start) / len(candidates)
        reference = reference or rewards
        max_difference = max(abs(a - b) for a, b in zip(rewards, reference))
        results[per_pass] = {"ms_per_candidate": per_candidate_ms, "max_reward_difference_to_k1": max_difference}
        refit = f"refit {args.refit_ridge}, " if args.refit_ridge is not None else ""
        print(f"K={per_pass:3d}: {per_candidate_ms:8.1f} ms per candidate ({refit}{args.recovery_steps} recovery steps, "
              f"{args.reward_batches} reward batches); max |reward - reward(K=1)| = {max_difference:.4f}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    summary = {"device": device_name, "args": vars(args), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
