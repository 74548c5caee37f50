"""RLPruneConfig: everything the pruning callback needs to know, as a dataclass that HfArgumentParser reads."""

from dataclasses import dataclass, field

from .env import BUDGET_KINDS, REWARD_COSTS, REWARD_MODES
from .pruning import IMPORTANCE_CRITERIA
from .pruning.latency import RUNTIMES

METHODS = ("ppo", "random", "uniform")


@dataclass
class RLPruneConfig:
    target: float | None = field(
        default=None,
        metadata={"help": "Budget: the pruned model's cost as a fraction of the dense model's, in (0, 1] (default 0.5; "
                          "leave unset when giving target_latency_ms)."},
    )
    budget_kind: str = field(default="macs", metadata={"help": f"What the budget limits: one of {BUDGET_KINDS}."})
    target_latency_ms: float | None = field(
        default=None,
        metadata={"help": "Budget in milliseconds on the latency runtime (needs budget_kind latency; replaces target): "
                          "converted to a fraction of the dense model's latency estimated by the latency table."},
    )
    reward_mode: str = field(
        default="budget_accuracy",
        metadata={"help": f"Reward: one of {REWARD_MODES} (accuracy under the budget; accuracy / cost; AMC's -error*log(cost))."},
    )
    reward_cost: str | None = field(
        default=None,
        metadata={"help": f"The cost in the trade_off and amc rewards: one of {REWARD_COSTS}; 'latency' makes trade_off the "
                          "plan's accuracy / inference time. Default: the budget's kind for trade_off, macs (FLOPs) for amc."},
    )
    latency_runtime: str = field(
        default="onnxruntime", metadata={"help": f"Where latency is measured for latency budgets and rewards: one of {RUNTIMES}."}
    )
    latency_batch_size: int = field(default=128, metadata={"help": "Batch size the latency is measured at (the deployment batch)."})
    latency_device: str = field(default="cpu", metadata={"help": "Device for the latency: 'cpu', or 'cuda' with latency_runtime torch."})
    latency_threads: int | None = field(default=None, metadata={"help": "CPU threads for the latency (default: torch's default, the core count)."})
    latency_cache_dir: str | None = field(
        default=None, metadata={"help": "Where latency tables are cached as JSON (default: ~/.cache/hf_rlprune/latency)."}
    )
    latency_table_path: str | None = field(
        default=None,
        metadata={"help": "A latency table measured on the deployment machine (`scripts/bench_latency.py --save_tables DIR`), used "
                          "instead of measuring here: train on a GPU host, prune for the CPU the model will serve on. Its runtime, "
                          "batch size and model structure must match this run's; its device and threads are the deployment's."},
    )
    method: str = field(
        default="ppo",
        metadata={"help": f"Who chooses the per-layer keep ratios: one of {METHODS} (the PPO agent or the two baselines)."},
    )
    importance: str = field(default="l1", metadata={"help": f"Which units a layer keeps: one of {IMPORTANCE_CRITERIA}."})
    num_rounds: int = field(
        default=4,
        metadata={"help": "Pruning rounds; the budget tightens toward `target` on a cubic schedule. The default suits pruning while "
                          "the model trains; for a few epochs of fine-tuning a trained model, 1 round with start_fraction=0 "
                          "and end_fraction=0 did better on the reference CNN (README, 'Which schedule')."},
    )
    start_fraction: float = field(default=0.1, metadata={"help": "Fraction of training steps before the first round (warm-up)."})
    end_fraction: float = field(
        default=0.5, metadata={"help": "Fraction of training steps at which the last round runs; the rest fine-tunes the final model."}
    )
    search_episodes: int = field(default=64, metadata={"help": "Reward evaluations (search episodes) per round."})
    recovery_steps: int = field(
        default=0, metadata={"help": "Training steps on each candidate (after its refit) before its reward is measured. With the refit, "
                                     "0 ranks candidates as well as 40 (reference CNN, Spearman 0.88 against test accuracy after "
                                     "fine-tuning); without it (refit=False) use 40-200: 0.25 right after masking, 0.60 at 40 "
                                     "steps, 0.82 at 200 (scripts/bench_fidelity.py)."}
    )
    refit: bool = field(
        default=True,
        metadata={"help": "Refit each candidate's pruned layers' consumers (the next conv, dense layer or LSTM input projection) "
                          "by ridge least squares to the unpruned model's outputs on 4 training batches before measuring its "
                          "reward. With recovery_steps=0 the best reward for its cost on the reference CNN and IMDB, a tie on the "
                          "VGG-style CNN (README), so on by "
                          "default; --refit false measures right after masking (plus any recovery steps)."},
    )
    refit_ridge: float = field(
        default=0.01,
        metadata={"help": "The refit's ridge strength, relative to the inputs' mean eigenvalue (0.01 was picked on the "
                          "reference CNN's reward split; 0.1 ranks nearly as well, 1.0 worse)."},
    )
    refit_applied: bool = field(
        default=False,
        metadata={"help": "With the refit on, refit the trained model's consumers too when a round's masks are applied, so "
                          "training continues from the refitted candidate (before its recovery steps, if any). Off by "
                          "default: on the reference CNN it cost 0.2-1.3 points after fine-tuning (README); on IMDB it was "
                          "neutral."},
    )
    bn_recalibration_batches: int = field(
        default=0,
        metadata={"help": "Recompute each candidate's batch-norm running statistics on this many training batches after "
                          "masking and refit, before its reward (adaptive BN); 0 keeps the round's statistics. Models "
                          "without batch norm are unaffected."},
    )
    recovery_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the per-candidate recovery."})
    reward_batch_size: int = field(default=256, metadata={"help": "Batch size for measuring accuracy on the reward split."})
    candidates_per_pass: int = field(
        default=8,
        metadata={"help": "Search episodes run in lockstep and evaluated together: on a GPU their masked copies train and are "
                          "measured in one vmapped pass (models without LSTMs; memory grows with it); on CPU one at a time. For PPO it is "
                          "capped at ppo_episodes_per_update, since the agent updates only between batches."},
    )
    min_keep: float = field(default=0.05, metadata={"help": "Smallest keep ratio any layer may get, in (0, 1]."})
    fill_budget: bool = field(default=True, metadata={"help": "Scale each allocation up to use the whole budget."})
    width_multiple: int | None = field(
        default=None,
        metadata={"help": "Snap kept widths to a multiple of this (hardware-friendly widths). Default: 8 for latency "
                          "budgets, 1 otherwise."},
    )
    ppo_episodes_per_update: int = field(default=8, metadata={"help": "Episodes per PPO update."})
    ppo_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "PPO Adam learning rate. The plan's 3e-4 lost to random search at 32-64 episodes per round on "
                          "the synthetic benchmark (tests/test_agent.py); 1e-3 beat it."},
    )
    prune_seed: int = field(default=0, metadata={"help": "Seed of the search: the same seed gives the same pruning decisions."})
    save_dir: str | None = field(
        default=None, metadata={"help": "Where the pruned model, report and card are written (default: <output_dir>/pruned)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "The data the model is trained and tested on, named in the saved model card: cifar10, imdb or a "
                          "Hub dataset id (unset: the card names none)."},
    )
    pruned_hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Push the saved pruned model (model, card, report) to this Hub repo at train end: a repo of its own, "
                          "not the Trainer's; the card names it. The Trainer's hub_token, hub_private_repo and hub_revision apply."},
    )
    save_on_train_end: bool = field(default=True, metadata={"help": "Compact and save the pruned model when training ends."})
    show_progress: bool = field(default=True, metadata={"help": "A progress bar per search round (main process only)."})

    def __post_init__(self):
        def check(condition, message):
            if not condition:
                raise ValueError(message)

        check(self.budget_kind in BUDGET_KINDS, f"budget_kind = {self.budget_kind!r} is unknown; choose one of {BUDGET_KINDS}.")
        if self.target_latency_ms is not None:
            check(self.target is None, f"Give one budget: target = {self.target} (a fraction) or target_latency_ms = "
                                       f"{self.target_latency_ms} (milliseconds), not both.")
            check(self.budget_kind == "latency", f"target_latency_ms = {self.target_latency_ms} is a latency budget; set "
                                                 f"budget_kind='latency' (got {self.budget_kind!r}).")
            check(self.target_latency_ms > 0, f"target_latency_ms = {self.target_latency_ms} must be > 0 milliseconds.")
        elif self.target is None:
            self.target = 0.5
        if self.target is not None:
            check(0.0 < self.target <= 1.0, f"target = {self.target} must be a fraction of the dense cost in (0, 1], e.g. 0.25.")
        check(self.reward_mode in REWARD_MODES, f"reward_mode = {self.reward_mode!r} is unknown; choose one of {REWARD_MODES}.")
        if self.reward_cost is not None:
            check(self.reward_cost in REWARD_COSTS, f"reward_cost = {self.reward_cost!r} is unknown; choose one of {REWARD_COSTS}.")
            check(self.reward_mode in ("trade_off", "amc"), f"reward_cost = {self.reward_cost!r} only weighs the trade_off and "
                                                            f"amc rewards; set reward_mode to one of them or leave reward_cost unset.")
        check(self.latency_runtime in RUNTIMES, f"latency_runtime = {self.latency_runtime!r} is unknown; choose one of {RUNTIMES}.")
        check(self.latency_batch_size >= 1, f"latency_batch_size = {self.latency_batch_size} must be >= 1.")
        check(self.latency_device == "cpu" or self.latency_device.startswith("cuda"),
              f"latency_device = {self.latency_device!r} is unknown; use 'cpu' or 'cuda' (or 'cuda:N').")
        check(self.latency_device == "cpu" or self.latency_runtime == "torch",
              f"latency_device = {self.latency_device!r} needs latency_runtime='torch'; onnxruntime measures on the CPU.")
        check(self.latency_threads is None or self.latency_threads >= 1, f"latency_threads = {self.latency_threads} must be >= 1 (or unset).")
        if self.latency_table_path is not None:
            check(self.uses_latency, f"latency_table_path = {self.latency_table_path!r} is only read for a latency budget "
                                     "(budget_kind='latency') or a latency reward (reward_cost='latency'); set one or drop it.")
        if self.width_multiple is None:  # hardware-friendly widths by default where speed is what the budget limits
            self.width_multiple = 8 if self.budget_kind == "latency" else 1
        check(self.method in METHODS, f"method = {self.method!r} is unknown; choose one of {METHODS}.")
        check(self.importance in IMPORTANCE_CRITERIA, f"importance = {self.importance!r} is unknown; choose one of {IMPORTANCE_CRITERIA}.")
        check(self.num_rounds >= 1, f"num_rounds = {self.num_rounds} must be >= 1.")
        check(
            0.0 <= self.start_fraction <= self.end_fraction < 1.0,
            f"Need 0 <= start_fraction ({self.start_fraction}) <= end_fraction ({self.end_fraction}) < 1.",
        )
        check(self.search_episodes >= 1, f"search_episodes = {self.search_episodes} must be >= 1.")
        check(self.recovery_steps >= 0, f"recovery_steps = {self.recovery_steps} must be >= 0.")
        check(isinstance(self.refit_ridge, (int, float)) and self.refit_ridge >= 0,
              f"refit_ridge = {self.refit_ridge} must be a number >= 0; to measure rewards without the refit, set refit = False.")
        check(not self.refit_applied or self.refit, "refit_applied = True needs refit = True: there is no refit to apply without it.")
        check(self.bn_recalibration_batches >= 0,
              f"bn_recalibration_batches = {self.bn_recalibration_batches} must be >= 0 (0: keep the round's statistics).")
        check(self.recovery_lr > 0, f"recovery_lr = {self.recovery_lr} must be > 0.")
        check(self.reward_batch_size >= 1, f"reward_batch_size = {self.reward_batch_size} must be >= 1.")
        check(self.candidates_per_pass >= 1, f"candidates_per_pass = {self.candidates_per_pass} must be >= 1.")
        check(0.0 < self.min_keep <= 1.0, f"min_keep = {self.min_keep} must be in (0, 1].")
        check(self.method != "ppo" or self.min_keep < 1.0,
              "min_keep = 1.0 keeps every unit, which leaves the PPO agent no choice: lower min_keep (or use method='uniform').")
        check(not self.pruned_hub_model_id or self.save_on_train_end,
              "pruned_hub_model_id pushes the model saved at train end: set save_on_train_end = True (or push it yourself "
              "with hf_rlprune.card.push_pruned_folder).")
        check(self.width_multiple >= 1, f"width_multiple = {self.width_multiple} must be >= 1.")
        check(self.ppo_episodes_per_update >= 1, f"ppo_episodes_per_update = {self.ppo_episodes_per_update} must be >= 1.")
        check(self.ppo_learning_rate > 0, f"ppo_learning_rate = {self.ppo_learning_rate} must be > 0.")

    @property
    def effective_refit_ridge(self) -> float | None:
        """The ridge the reward evaluator refits with, None when the refit is off."""
        return float(self.refit_ridge) if self.refit else None

    @property
    def uses_latency(self) -> bool:
        """Whether a latency table is needed: a latency budget or a latency reward."""
        return self.budget_kind == "latency" or self.reward_cost == "latency"

    def resolve_target_latency(self, dense_latency_ms: float) -> float:
        """The budget as a fraction of the dense cost: `target`, or target_latency_ms over the dense model's latency
        (the latency table's estimate; the callback resolves it at train begin). The config is left as it was given,
        so it can still be copied (`dataclasses.replace`) or reused for another run."""
        if self.target_latency_ms is None:
            return self.target
        if self.target_latency_ms >= dense_latency_ms:
            raise ValueError(
                f"target_latency_ms = {self.target_latency_ms} is not below the dense model's estimated latency of "
                f"{dense_latency_ms:.2f} ms ({self.latency_runtime}, {self.latency_device}, batch {self.latency_batch_size}): "
                "nothing to prune. Lower target_latency_ms."
            )
        return self.target_latency_ms / dense_latency_ms

    def round_targets(self, target: float | None = None) -> list[float]:
        """Budget after each round: cubic from dense toward `target` (Zhu & Gupta's gradual schedule), ending on it.
        `target` defaults to the config's; a budget in milliseconds passes its resolved fraction."""
        target = self.target if target is None else target
        if target is None:
            raise ValueError("target_latency_ms is a budget in milliseconds: pass round_targets(resolve_target_latency(dense latency)).")
        rounds = self.num_rounds
        return [target + (1.0 - target) * (1.0 - (r + 1) / rounds) ** 3 for r in range(rounds)]

    def round_steps(self, max_steps: int) -> list[int]:
        """Global steps (1-based, after the optimizer step) at which each round runs."""
        if max_steps < 1:
            raise ValueError("Training has no steps; RLPruneCallback needs max_steps >= 1.")
        start = max(1, round(self.start_fraction * max_steps))
        end = max(start, round(self.end_fraction * max_steps))
        if self.num_rounds == 1:
            return [end]
        steps = [round(start + (end - start) * r / (self.num_rounds - 1)) for r in range(self.num_rounds)]
        return [max(1, min(step, max_steps)) for step in steps]
