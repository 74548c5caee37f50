"""RLPruneCallback: RL-guided structured pruning alongside HF Trainer fine-tuning.

Warm-up, then `num_rounds` search rounds interleaved with training; each round tightens the budget (cubic schedule),
searches per-layer keep ratios with the agent on the reward split, and masks the live model with the best one.
Training recovers between rounds. At the end the model is compacted in place (so `trainer.model` is the small
model) and saved with its report and model card. Rank 0 decides; the decision is broadcast; every rank applies it.
"""

import hashlib
import inspect
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import RemoveColumnsCollator

from .agent import PPOAgent, PPOConfig, RandomSearchPolicy, UniformPolicy
from .callback_state import STATE_FILE, PruningState, read_agent, read_state, write_state
from .card import build_report, check_save_dir, push_pruned_folder, save_pruned_model
from .config import RLPruneConfig
from .env import OBSERVATION_FEATURES, PruningEnv, PruningVectorEnv
from .pruning import (
    TaylorAccumulator,
    apply_masks,
    check_supported,
    compact,
    compute_macs,
    count_parameters,
    enforce_masks,
    get_masks,
    get_prunable_groups,
    masked_widths,
    masks_from_widths,
    remove_masks,
)
from .pruning.latency_table import LatencyTable, default_cache_dir
from .reward import CandidateRepair, RewardEvaluator, batched_accuracy, move_to_device, take_batches
from .search import run_search

logger = logging.getLogger(__name__)



def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(payload):
    """Rank 0's payload on every rank (identity when not distributed)."""
    if not _is_distributed():
        return payload
    holder = [payload]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _first_batch_logits(model, batches: list[dict], autocast_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The model's logits on the first batch (eval mode), as float32: computed in float32, or under `autocast_dtype`.

    Calls the class's forward: under a Trainer with bf16/fp16, accelerate replaces the instance's forward with one that
    runs under autocast, which would make the float32 comparison a half-precision one."""
    if not batches:
        return None
    device_type = next(model.parameters()).device.type
    was_training = model.training
    model.eval()
    inputs = {key: value for key, value in batches[0].items() if key != "labels"}
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = type(model).forward(model, **inputs).logits.float()  # (B, labels)
    model.train(was_training)
    return logits


def _check_compaction(masked: dict, compacted: dict) -> dict | None:
    """How far the compacted model is from the masked one, per precision ({"float32": logits, "bfloat16": logits}); a
    warning when they disagree, since the saved model would then not compute what was trained and scored.

    float32 logits should agree to rounding. Half precision rounds logits coarsely and may flip a borderline
    prediction, so there the predictions are compared (at most 2% of the batch, or one, may flip): a kernel that is
    wrong for the compacted shapes (cuDNN's half-precision LSTM was, for some widths) flips many."""
    checks = {}
    for precision, masked_logits in masked.items():
        compacted_logits = compacted[precision]
        if masked_logits is None or compacted_logits is None:
            continue
        difference = float((compacted_logits - masked_logits).abs().max())
        flipped = int((compacted_logits.argmax(-1) != masked_logits.argmax(-1)).sum())
        agreement = 1.0 - flipped / max(1, masked_logits.shape[0])
        if precision == "float32":
            agrees = difference <= 1e-2 * max(1.0, float(masked_logits.abs().max()))  # room for TF32 and kernel choice on GPUs
        else:  # a borderline prediction or one in 50 may flip by rounding
            agrees = flipped <= max(1, int(0.02 * masked_logits.shape[0]))
        checks[precision] = {"max_logit_difference": difference, "prediction_agreement": agreement, "agrees": agrees}
        if not agrees:
            logger.warning(
                "The compacted model's %s logits differ from the masked model's on a reward batch (up to %.4g; %.1f%% of "
                "predictions agree); the saved model does not compute what was trained. Please report it with the model's "
                "widths, device and precision.", precision, difference, 100 * agreement)
    if not checks:
        return None
    return {**checks, "agrees": all(check["agrees"] for check in checks.values())}


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def build_latency_table(model_config, cfg: RLPruneConfig):
    """The latency table `cfg` asks for: the deployment machine's file when `latency_table_path` is set, otherwise
    measured here (runtime, device, batch, threads) or loaded from its JSON cache."""
    if cfg.latency_table_path is not None:
        return LatencyTable.load_for(cfg.latency_table_path, model_config, cfg.latency_runtime, cfg.latency_batch_size)
    return LatencyTable.build(model_config, runtime=cfg.latency_runtime, batch_size=cfg.latency_batch_size, device=cfg.latency_device,
                              threads=cfg.latency_threads, cache_dir=cfg.latency_cache_dir or default_cache_dir())


def check_budget(model_or_config, cfg: RLPruneConfig, latency_table=None) -> None:
    """A ValueError naming the fix when `cfg`'s budget cannot be met (a latency budget needs the dense model's
    latency table, which also turns target_latency_ms into a fraction)."""
    target = cfg.resolve_target_latency(latency_table.dense_ms) if cfg.target_latency_ms is not None else cfg.target
    try:
        PruningEnv(model_or_config, lambda widths: 0.0, target=target, budget_kind=cfg.budget_kind, min_keep=cfg.min_keep,
                   latency_fn=latency_table, width_multiple=cfg.width_multiple)
    except ValueError as error:
        if cfg.target_latency_ms is not None:
            raise ValueError(f"target_latency_ms = {cfg.target_latency_ms} is {target:.3f} x the dense model's "
                             f"estimated {latency_table.dense_ms:.2f} ms. {error}") from error
        raise ValueError(f"RLPruneConfig(target={cfg.target}, budget_kind={cfg.budget_kind!r}) cannot be met: {error}") from error


class RLPruneCallback(TrainerCallback):
    """Prune while the Trainer trains. Two lines in an existing script:

        from hf_rlprune import RLPruneCallback, RLPruneConfig
        trainer = Trainer(..., callbacks=[RLPruneCallback(RLPruneConfig(target=0.25), reward_dataset=reward_split)])

    Args:
        config: the pruning settings.
        reward_dataset: held-out *training* examples the reward is measured on (never the test split); see
            `hf_rlprune.data.split_reward`. Collated with `data_collator`, default the Trainer's.
        data_collator: collator for the reward split when it differs from the training one.
    """

    def __init__(self, config: RLPruneConfig | None = None, reward_dataset=None, data_collator=None):
        self.config = config or RLPruneConfig()
        if reward_dataset is not None and not hasattr(reward_dataset, "__len__"):
            raise ValueError(
                f"reward_dataset is a {type(reward_dataset).__name__} without a length (a streamed dataset?), but every "
                "candidate is measured on the same reward examples. Give a map-style dataset: load it with "
                "streaming=False, or materialize some rows, e.g. Dataset.from_list(list(streamed.take(5000)))."
            )
        if reward_dataset is None or len(reward_dataset) == 0:
            raise ValueError(
                "RLPruneCallback needs reward_dataset: held-out training examples (not the test split) to measure the "
                "reward on. Carve one with hf_rlprune.data.split_reward(train_dataset, reward_size=0.1, seed=0)."
            )
        self.reward_dataset = reward_dataset
        self.data_collator = data_collator
        self._reset_run_state()
        self._handler = None
        self._evaluator = None
        self._round_steps: list[int] = []
        self._train_dataset = None
        self._train_collator = None
        self._batch_size = 8
        self._resumed = None  # (model, step, checkpoint) of the last resume

    def _reset_run_state(self) -> None:
        """What one pruning run accumulates: rounds, agent, scores, report."""
        self.rounds_done = 0
        self.history: list[dict] = []
        self.search_seconds = 0.0
        self.reward_evaluations = 0
        self.agent: PPOAgent | None = None
        self.taylor = TaylorAccumulator() if self.config.importance == "taylor" else None
        self.dense_config = None
        self.pruned_model = None
        self.report: dict | None = None
        self.latency_table = None  # LatencyTable for latency budgets / rewards, built once at train begin
        self._state_saved_at: str | None = None  # the checkpoint on_push_begin wrote the state to
        self._target = self.config.target  # the final budget as a fraction (target_latency_ms resolves at train begin)

    # ---- Trainer events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_supported(model)
        if model.config.num_labels < 2:  # argmax over one output is always 0: every candidate would score the same
            raise ValueError(
                f"RLPruneCallback rewards classification accuracy on the reward split, but this model has num_labels = "
                f"{model.config.num_labels} (a regression head). Prune a classifier (num_labels >= 2)."
            )
        if args.push_to_hub and self.config.pruned_hub_model_id and self.config.pruned_hub_model_id == args.hub_model_id:
            raise ValueError(
                f"pruned_hub_model_id = hub_model_id = {args.hub_model_id!r}: the pruned folder's push replaces that repo's "
                "files, which would delete the Trainer's pushed checkpoints there. Give the pruned model a repo of its own."
            )
        if state.global_step == 0 and self.dense_config is not None and model is not self.pruned_model:
            # a new run (another model, the Trainer's model_init, or auto_find_batch_size's retry after running out of
            # memory, which keeps the model) through the same callback: prune it afresh, from no masks
            self._reset_run_state()
            remove_masks(model)
        if self.pruned_model is model and optimizer is not None:
            live = {id(parameter) for parameter in model.parameters()}
            if any(id(parameter) not in live for group in optimizer.param_groups for parameter in group["params"]):
                raise ValueError(
                    "This Trainer's optimizer still holds the dense model's parameters: RLPruneCallback compacted the model "
                    "when the last train() ended, so another train() would update nothing. Set trainer.optimizer = None "
                    "and trainer.lr_scheduler = None (or build a new Trainer) before training the compacted model again."
                )
        cfg = self.config
        self.dense_config = type(model.config).from_dict(model.config.to_dict()) if self.dense_config is None else self.dense_config
        self._round_steps = cfg.round_steps(state.max_steps)
        self._train_dataset = train_dataloader.dataset
        self._train_collator = train_dataloader.collate_fn
        # the per-device batch size the Trainer trains with: auto_find_batch_size lowers it below the argument's on a retry
        # (and then resumes with the checkpoint's), which the Trainer records in state.train_batch_size
        lowered = args.auto_find_batch_size and state.train_batch_size
        self._batch_size = state.train_batch_size // max(1, args.n_gpu) if lowered else args.per_device_train_batch_size
        reward_dataset, collator = self._reward_data(model, args, self.data_collator or train_dataloader.collate_fn)
        reward_loader = DataLoader(reward_dataset, batch_size=cfg.reward_batch_size, shuffle=False, collate_fn=collator)
        autocast = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        repair = CandidateRepair(refit_ridge=cfg.effective_refit_ridge, bn_recalibration_batches=cfg.bn_recalibration_batches,
                                 recovery_steps=cfg.recovery_steps, recovery_lr=cfg.recovery_lr)
        self._evaluator = RewardEvaluator(list(reward_loader), repair=repair, importance=cfg.importance, seed=cfg.prune_seed,
                                          autocast_dtype=autocast, candidates_per_pass=cfg.candidates_per_pass)
        if repair.training_batches and isinstance(self._train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "The training set is an iterable (streaming) dataset, but each pruning round draws shuffled training "
                "batches from it for the reward (the refit's calibration, recovery steps, batch-norm recalibration). "
                "Pass a map-style dataset (e.g. load_dataset(..., streaming=False)), or set refit=False, recovery_steps=0 "
                "and bn_recalibration_batches=0."
            )
        if args.save_strategy != "no" or (cfg.save_on_train_end and not cfg.save_dir):  # needs the run's folder: an
            self._run_dir(args, state)  # unnamed hyperparameter-search trial's is refused now
        if cfg.save_on_train_end and state.is_world_process_zero:
            check_save_dir(self._save_dir(args, state), output_dir=args.output_dir)  # refused now, not after training
        if cfg.method == "ppo" and self.agent is None:
            ppo = PPOConfig(learning_rate=cfg.ppo_learning_rate, episodes_per_update=cfg.ppo_episodes_per_update)
            self.agent = PPOAgent(len(OBSERVATION_FEATURES), cfg.min_keep, 1.0, ppo, seed=cfg.prune_seed)
        if state.global_step > 0:
            self._resume(self._checkpoint_to_resume(args, state, model), model, optimizer)
        if cfg.uses_latency:
            self._build_latency_table(state)
        else:  # an impossible budget is an error now, not after warm-up training
            check_budget(model, cfg)
        self._handler = self._calling_handler()

    def _checkpoint_to_resume(self, args, state, model) -> str:
        """The checkpoint the Trainer resumed from: TrainingArguments.resume_from_checkpoint when set, else the step's
        checkpoint in the run's folder (TrainerCallback is not told the path given to `trainer.train`), which is taken
        only if its state was saved with the weights the Trainer loaded: it may be another run's checkpoint of that
        step. auto_find_batch_size's retry keeps the checkpoint taken by the attempt that ran out of memory: the
        Trainer loaded its weights once, before that attempt trained them further."""
        if self._resumed is not None and self._resumed[0] is model and self._resumed[1] == state.global_step:
            return self._resumed[2]
        named = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
        guessed = self._checkpoint_dir(args, state)
        if named is not None and os.path.isfile(os.path.join(named, STATE_FILE)):
            directory = named
        elif os.path.isfile(os.path.join(guessed, STATE_FILE)):
            if read_state(guessed).weights_sha1 not in (None, weights_digest(model)):  # None: written before the hash
                raise ValueError(
                    f"Resuming at step {state.global_step}: the pruning state in {guessed} was saved with other weights than "
                    "the ones the Trainer resumed, so it belongs to another run. Pass the checkpoint you resume from as "
                    "TrainingArguments(resume_from_checkpoint=...) too (the callback is not told the path given to train())."
                )
            directory = guessed
        else:
            candidates = [guessed] if named in (None, guessed) else [named, guessed]
            raise FileNotFoundError(
                f"Resuming at step {state.global_step}, but none of {candidates} holds {STATE_FILE} (the pruning masks and "
                "agent). Pass the checkpoint as TrainingArguments(resume_from_checkpoint=...) or keep it under output_dir."
            )
        self._resumed = (model, state.global_step, directory)
        return directory

    def _build_latency_table(self, state) -> None:
        """Measure (or load from cache) the dense model's latency table on the main process, which alone searches;
        every rank resolves a target in milliseconds to the same fraction of the dense latency."""
        cfg = self.config
        dense_ms = None
        if state.is_world_process_zero:
            if self.latency_table is None:
                self.latency_table = build_latency_table(self.dense_config, cfg)
            dense_ms = self.latency_table.dense_ms
        self._target = cfg.resolve_target_latency(_broadcast(dense_ms))
        if state.is_world_process_zero:  # an impossible budget is an error now, not after the first rounds
            check_budget(self.dense_config, cfg, self.latency_table)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.taylor is not None:
            self.taylor.accumulate(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        while self.rounds_done < self.config.num_rounds and state.global_step >= self._round_steps[self.rounds_done]:
            self._run_round(args, state, control, model, optimizer)
        return control

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        # With hub_strategy "checkpoint" or "all_checkpoints" the Trainer uploads the checkpoint folder in the background
        # before on_save runs, so the pruning state is written here first or the pushed checkpoint may lack it.
        checkpoint = self._checkpoint_dir(args, state)
        if state.is_world_process_zero and self.report is None and os.path.isdir(checkpoint):
            self.save_state(checkpoint, model)
            self._state_saved_at = checkpoint

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = self._checkpoint_dir(args, state)
        if state.is_world_process_zero and self._state_saved_at != checkpoint:  # not already written for the push
            self.save_state(checkpoint, model)

    @staticmethod
    def _run_dir(args, state) -> str:
        """The folder the Trainer saves this run's checkpoints in: output_dir, or a hyperparameter search trial's
        folder under it, which the callback can only name when the search names its trials (`hp_name`)."""
        if state.trial_name is not None:
            return os.path.join(args.output_dir, state.trial_name)
        if state.trial_params is not None:
            raise ValueError(
                "Trainer.hyperparameter_search saves each trial's checkpoints in a folder of its own, which a callback is "
                "told only when the search names its trials: pass hp_name, e.g. "
                "trainer.hyperparameter_search(..., hp_name=lambda trial: f'run-{trial.number}')."
            )
        return args.output_dir

    def _checkpoint_dir(self, args, state) -> str:
        return os.path.join(self._run_dir(args, state), f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self._restore_best_masks(state.best_model_checkpoint, model)
        if self.rounds_done == 0:
            logger.warning("Training ended before the first pruning round (rounds at steps %s); the model is saved unpruned.",
                           self._round_steps)
        elif self.rounds_done < self.config.num_rounds:
            logger.warning(
                "Training ended after %d of %d pruning rounds (rounds at steps %s); the model is pruned to the last "
                "finished round's budget.", self.rounds_done, self.config.num_rounds, self._round_steps
            )
        self.finalize(model)
        if self.config.save_on_train_end and state.is_world_process_zero:
            save_dir = self._save_dir(args, state)
            save_pruned_model(model, save_dir, self.report, processing_class=processing_class, dataset_name=self.config.dataset_name,
                              repo_id=self.config.pruned_hub_model_id)
            if self.config.pruned_hub_model_id:
                push_pruned_folder(save_dir, self.config.pruned_hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                                   revision=args.hub_revision)

    def _reward_data(self, model, args, collator):
        """The reward split and its collator, without the columns the Trainer drops from its training set
        (remove_unused_columns): those the model's forward does not take, such as a tokenized set's raw "text", which
        the collator could not batch. A `datasets.Dataset` loses them; other datasets (a list of dicts, a torch
        Dataset) lose them per example in the collator, as the Trainer does."""
        dataset = self.reward_dataset
        if not args.remove_unused_columns:
            return dataset, collator
        accepted = set(inspect.signature(type(model).forward).parameters) | {"label", "label_ids", *(args.label_names or [])}
        if not hasattr(dataset, "remove_columns"):
            return dataset, RemoveColumnsCollator(collator, sorted(accepted))
        unused = [name for name in dataset.column_names if name not in accepted]
        if len(unused) == len(dataset.column_names):
            raise ValueError(
                f"reward_dataset has no column the model takes (columns {dataset.column_names}; the model's forward takes "
                f"{sorted(accepted - {'self', 'kwargs'})}). Prepare it as the training set (tokenize / transform it the same way), "
                "or set remove_unused_columns=False if a transform produces the inputs."
            )
        return (dataset.remove_columns(unused) if unused else dataset), collator

    def _save_dir(self, args, state) -> str:
        return self.config.save_dir or os.path.join(self._run_dir(args, state), "pruned")

    # ---- rounds -----------------------------------------------------------------------------------------------
    def _recovery_batches(self, round_index: int) -> list[dict]:
        """The training batches this round's candidates are repaired on (shuffled with the round's seed)."""
        count = self._evaluator.repair.training_batches
        if not count:
            return []
        generator = torch.Generator().manual_seed(self.config.prune_seed * 1000 + round_index)
        loader = DataLoader(self._train_dataset, batch_size=self._batch_size, shuffle=True, generator=generator,
                            collate_fn=self._train_collator, drop_last=len(self._train_dataset) > self._batch_size)
        return take_batches(loader, count)

    def _make_env(self, model, target: float) -> PruningEnv:
        cfg = self.config
        return PruningEnv(
            model,
            self._evaluator,
            target=target,
            budget_kind=cfg.budget_kind,
            reward_mode=cfg.reward_mode,
            reward_cost=cfg.reward_cost,
            latency_fn=self.latency_table,
            min_keep=cfg.min_keep,
            fill_budget=cfg.fill_budget,
            width_multiple=cfg.width_multiple,
        )

    def _search(self, model, round_index: int, target: float, is_main: bool) -> dict:
        cfg = self.config
        self._evaluator.begin_round(model, self.taylor, recovery_batches=self._recovery_batches(round_index))
        env = self._make_env(model, target)
        if cfg.method == "ppo":
            policy, episodes = self.agent, cfg.search_episodes
        elif cfg.method == "random":
            policy, episodes = RandomSearchPolicy(cfg.min_keep, 1.0, seed=cfg.prune_seed * 1000 + round_index), cfg.search_episodes
        else:
            policy, episodes = UniformPolicy(env.uniform_keep_ratio()), 1
        # PPO updates only between lockstep batches: a batch no larger than an update keeps its update schedule
        lockstep = min(cfg.candidates_per_pass, episodes, cfg.ppo_episodes_per_update if cfg.method == "ppo" else episodes)
        envs = [env] + [self._make_env(model, target) for _ in range(lockstep - 1)]
        result = run_search(
            PruningVectorEnv(envs, self._evaluator.evaluate_batch), policy, episodes, seed=cfg.prune_seed * 1000 + round_index, show_progress=cfg.show_progress and is_main,
            desc=f"rlprune round {round_index + 1}/{cfg.num_rounds} ({cfg.method}, target {target:.3f})",
        )
        if isinstance(policy, PPOAgent) and policy.episodes_in_buffer:
            policy.update()  # learn from this round's leftover episodes: the next round has another budget and weights
        widths = result.best_info["widths"]
        masks = masks_from_widths(model, widths, cfg.importance, taylor=self.taylor, seed=cfg.prune_seed)
        refit = cfg.refit and cfg.refit_applied
        return {
            "masks": {name: mask.tolist() for name, mask in masks.items()},
            "refitted": self._evaluator.refitted_tensors(widths) if refit else {},
            "reward": result.best_reward,
            "accuracy": result.best_info["accuracy"],
            "evaluations": result.num_evaluations,
            "search_seconds": result.wall_time_s,
            "mean_reward": sum(result.history) / len(result.history),
        }

    def _run_round(self, args, state, control, model, optimizer):
        cfg = self.config
        round_index = self.rounds_done
        target = cfg.round_targets(self._target)[round_index]
        is_main = state.is_world_process_zero
        decision = None
        start = time.perf_counter()
        devices = [model.device] if model.device.type == "cuda" else []
        # The search draws its own randomness (seeded per round) and leaves the training RNG streams untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.prune_seed * 1000 + round_index)
            if is_main or not _is_distributed():
                decision = self._search(model, round_index, target, is_main)
        decision = _broadcast(decision)
        masks = {name: torch.tensor(mask, dtype=torch.bool) for name, mask in decision["masks"].items()}
        apply_masks(model, masks)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with torch.no_grad():  # the refitted consumers (and norm statistics), as the chosen candidate started from them
            for name, value in decision["refitted"].items():
                tensors[name].copy_(value)
        enforce_masks(model, _inner_optimizer(optimizer) if optimizer is not None else None)
        self.rounds_done += 1
        self.search_seconds += time.perf_counter() - start
        self.reward_evaluations += decision["evaluations"]
        widths = masked_widths(model)
        dense_macs = compute_macs(self.dense_config)
        record = {
            "round": self.rounds_done,
            "step": state.global_step,
            "target": target,
            "macs": compute_macs(model),
            "macs_ratio": compute_macs(model) / dense_macs,
            "params": count_parameters(model),
            "reward": decision["reward"],
            "reward_accuracy": decision["accuracy"],
            "mean_reward": decision["mean_reward"],
            "evaluations": decision["evaluations"],
            "search_seconds": decision["search_seconds"],
            "widths": widths,
            "keep_ratios": {g.name: widths[g.name] / g.width for g in get_prunable_groups(self.dense_config)},
            "masks_sha1": masks_digest(get_masks(model)),  # what this rank applied, so ranks can be compared
        }
        self.history.append(record)
        self._log(args, state, control, record)

    def _log(self, args, state, control, record: dict):
        """Per-round metrics into the Trainer's log history and its report_to integrations."""
        logs = {f"rlprune/{key}": record[key] for key in ("round", "target", "macs", "macs_ratio", "params", "reward", "reward_accuracy", "evaluations", "search_seconds")}
        logs.update({f"rlprune/keep_ratio/{name}": ratio for name, ratio in record["keep_ratios"].items()})
        logger.info("rlprune round %d: %s", record["round"], json.dumps({**logs, "masks_sha1": record["masks_sha1"]}))
        state.log_history.append({**logs, "rlprune/widths": record["widths"], "rlprune/masks_sha1": record["masks_sha1"], "step": state.global_step})
        if self._handler is not None:
            others = [cb for cb in self._handler.callbacks if cb is not self]
            for callback in others:  # TrainerCallback gives no handle on Trainer.log; dispatch to the others directly
                callback.on_log(args, state, control, logs=dict(logs), model=self._handler.model)

    def _calling_handler(self):
        """The CallbackHandler delivering the current event, to reach the report_to integrations (TensorBoard, W&B).

        TrainerCallback receives no reference to the Trainer, and the integrations run before user callbacks in
        `on_log`, so per-round metrics are dispatched to them directly. The handler is the `self` of a calling frame
        (`CallbackHandler.call_event`): the Trainer that runs now, even where one callback sits in several Trainers.
        """
        frame = sys._getframe(1)
        while frame is not None:
            caller = frame.f_locals.get("self")
            # type(): a lazy proxy's __class__ is not touched
            if issubclass(type(caller), CallbackHandler) and any(callback is self for callback in caller.callbacks):
                return caller
            frame = frame.f_back
        logger.warning("RLPruneCallback.on_train_begin was not called by a Trainer's CallbackHandler: per-round metrics go "
                       "to the log history only, not to report_to integrations.")
        return None

    # ---- end of training --------------------------------------------------------------------------------------
    def finalize(self, model) -> None:
        """Compact `model` in place and build the report (reward-split accuracy before/after, cost, policy)."""
        dense_config = self.dense_config
        evaluator = self._evaluator
        if evaluator is None:
            reward_batches = []
        elif evaluator._device == model.device:  # already on the device since the first round
            reward_batches = evaluator.reward_batches
        else:
            reward_batches = [move_to_device(b, model.device) for b in evaluator.reward_batches_cpu]
        # float32, and the Trainer's mixed precision (accelerate runs the model's forward under that autocast)
        precisions = {"float32": None}
        if evaluator is not None and evaluator.autocast_dtype is not None:
            precisions[str(evaluator.autocast_dtype).removeprefix("torch.")] = evaluator.autocast_dtype
        masked_logits = {name: _first_batch_logits(model, reward_batches, dtype) for name, dtype in precisions.items()}
        small = compact(model)
        for name, child in small.named_children():  # in-place swap: trainer.model becomes the small model
            setattr(model, name, child)
        model.config = small.config
        remove_masks(model)  # its hooks were on the masked parameters, now replaced by the compacted ones
        self.pruned_model = model
        compacted_logits = {name: _first_batch_logits(model, reward_batches, dtype) for name, dtype in precisions.items()}
        compaction_check = _check_compaction(masked_logits, compacted_logits)
        self.report = build_report(
            dense_config=dense_config,
            pruned_model=model,
            config=self.config,
            history=self.history,
            reward_accuracy_after=batched_accuracy(model, reward_batches) if reward_batches else None,
            search_seconds=self.search_seconds,
            reward_evaluations=self.reward_evaluations,
            target=self._target,
        )
        if compaction_check is not None:
            self.report["compaction_check"] = compaction_check

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_state(self, directory: str, model) -> None:
        state = PruningState(
            dense_config=json.loads(self.dense_config.to_json_string()),
            rounds_done=self.rounds_done,
            history=self.history,
            search_seconds=self.search_seconds,
            reward_evaluations=self.reward_evaluations,
            masks=get_masks(model),
            taylor_scores=self.taylor.scores if self.taylor is not None else {},
            taylor_steps=self.taylor.steps if self.taylor is not None else 0,
            weights_sha1=weights_digest(model),
        )
        write_state(directory, state, self.agent)

    def _resume(self, directory: str, model, optimizer) -> None:
        state = read_state(directory)
        if state.dense_config.get("model_type") != model.config.model_type:
            raise ValueError(f"{directory} holds pruning state for a {state.dense_config.get('model_type')} model, not "
                             f"{model.config.model_type}.")
        self.dense_config = type(model.config).from_dict(state.dense_config)
        self.rounds_done, self.history = state.rounds_done, state.history
        self.search_seconds, self.reward_evaluations = state.search_seconds, state.reward_evaluations
        if state.masks:
            apply_masks(model, state.masks)
            if optimizer is not None:
                enforce_masks(model, _inner_optimizer(optimizer))
        if self.taylor is not None:
            self.taylor.scores = {name: score.to(model.device) for name, score in state.taylor_scores.items()}
            self.taylor.steps = state.taylor_steps
        if self.config.method == "ppo":  # a fresh agent would make other decisions than the run being resumed
            self.agent = read_agent(directory)

    def _restore_best_masks(self, checkpoint: str, model) -> None:
        state = read_state(checkpoint)
        if state.masks:
            apply_masks(model, state.masks)
        else:  # saved before the first round: the Trainer loaded its unpruned weights, which the last round's masks must not cut
            remove_masks(model)
        if state.rounds_done < self.config.num_rounds:
            logger.warning(
                "load_best_model_at_end picked %s, saved after %d of %d pruning rounds: the saved model keeps that "
                "checkpoint's (larger) widths. Evaluate only after the last round (step %d) to get the target budget.",
                checkpoint, state.rounds_done, self.config.num_rounds, self._round_steps[-1],
            )
        self.rounds_done, self.history = state.rounds_done, state.history


def weights_digest(model) -> str:
    """A hash of the model's parameters, saved with the pruning state so a resume can tell its own checkpoint's state
    from another run's."""
    digest = hashlib.sha1()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """A short hash of a set of masks, logged per round so ranks (and runs) can be compared."""
    digest = hashlib.sha1()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(bytes(masks[name].to(torch.uint8).cpu().tolist()))
    return digest.hexdigest()[:12]
