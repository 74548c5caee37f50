"""PruningEnv: an AMC-style gymnasium environment that walks a model's prunable groups, one keep ratio per step.

The environment knows the model's structure and cost (through `pruning`), never its weights: accuracy comes from
an `evaluate_fn(widths) -> accuracy` supplied by the caller (the callback masks a model, lets it recover briefly
and measures the reward split). The agent sees only observation vectors, actions and rewards.
"""

import math
from collections.abc import Callable

import gymnasium as gym
import numpy as np

from .pruning import compute_macs, count_parameters, get_prunable_groups, masked_widths

BUDGET_KINDS = ("macs", "params", "latency")
REWARD_MODES = ("budget_accuracy", "trade_off", "amc")
REWARD_COSTS = BUDGET_KINDS  # the cost the trade_off and amc rewards weigh accuracy against
GROUP_KINDS = ("conv", "dense", "lstm", "embedding")
MAX_CACHED_COSTS = 100_000  # allocations whose cost is kept; a long run starts the cache afresh past this
OBSERVATION_FEATURES = (
    "index", *(f"is_{kind}" for kind in GROUP_KINDS), "in_width", "out_width", "kernel",
    "macs_share", "params_share", "cost_removed", "cost_ahead", "previous_action", "budget", "max_keep",
)  # fmt: skip


class PruningEnv(gym.Env):
    """One episode = one keep ratio per prunable group, in forward order; the reward comes at the last step.

    Args:
        model_or_config: one of our models (its current masks cap how much each group may keep) or its config.
        evaluate_fn: `widths (group name -> kept units) -> accuracy in [0, 1]`, measured on the reward split.
        target: the budget, a fraction of the dense model's cost in (0, 1].
        budget_kind: what the budget limits: "macs" (default), "params" or "latency" (needs `latency_fn`).
        reward_mode: "budget_accuracy" (accuracy under the budget; the default), "trade_off" (the plan's
            accuracy / cost, cost relative to dense) or "amc" (AMC's -error * log(cost)).
        reward_cost: the cost in the trade_off and amc rewards: "macs", "params" or "latency" (needs `latency_fn`;
            trade_off then is the plan's accuracy / inference time). Default: the budget's kind for trade_off,
            "macs" for amc (log of FLOPs, as in AMC). amc takes the log of FLOPs, parameters or microseconds.
        min_keep: the smallest keep ratio an action may choose.
        max_keep: per-group caps (list, group order), e.g. what earlier pruning rounds left alive.
        latency_fn: `widths -> milliseconds`, required for budget_kind="latency" or reward_cost="latency".
        fill_budget: scale the episode's allocation up, keeping its proportions, until the budget is used, so the
            agent chooses how to spend the budget rather than whether to. Widths are then topped up one unit (or
            one `width_multiple`) at a time, the group furthest below its share first, until none can grow.
        width_multiple: snap kept widths down to a multiple of this (hardware-friendly), never below one multiple
            or the group width.
        seq_len: sequence length for the LSTM's MACs (default: the model's max length).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model_or_config,
        evaluate_fn: Callable[[dict[str, int]], float],
        target: float = 0.5,
        budget_kind: str = "macs",
        reward_mode: str = "budget_accuracy",
        reward_cost: str | None = None,
        min_keep: float = 0.05,
        max_keep: list[float] | None = None,
        latency_fn: Callable[[dict[str, int]], float] | None = None,
        fill_budget: bool = True,
        width_multiple: int = 1,
        seq_len: int | None = None,
    ):
        super().__init__()
        config = getattr(model_or_config, "config", model_or_config)
        self.config = config
        self.groups = get_prunable_groups(model_or_config)
        self.evaluate_fn = evaluate_fn
        self.seq_len = seq_len
        if budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget_kind = {budget_kind!r} is unknown; choose one of {BUDGET_KINDS}.")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode = {reward_mode!r} is unknown; choose one of {REWARD_MODES}.")
        if budget_kind == "latency" and latency_fn is None:
            raise ValueError("budget_kind='latency' needs latency_fn (widths -> milliseconds), e.g. a LatencyTable.")
        if reward_cost is not None and reward_cost not in REWARD_COSTS:
            raise ValueError(f"reward_cost = {reward_cost!r} is unknown; choose one of {REWARD_COSTS} (or None).")
        if reward_cost == "latency" and latency_fn is None:
            raise ValueError("reward_cost='latency' needs latency_fn (widths -> milliseconds), e.g. a LatencyTable.")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target = {target} must be a fraction of the dense cost in (0, 1].")
        if not 0.0 < min_keep <= 1.0:
            raise ValueError(f"min_keep = {min_keep} must be in (0, 1].")
        if width_multiple < 1:
            raise ValueError(f"width_multiple = {width_multiple} must be >= 1.")
        self.budget_kind, self.reward_mode, self.target = budget_kind, reward_mode, float(target)
        self.min_keep, self.fill_budget, self.width_multiple = float(min_keep), fill_budget, int(width_multiple)
        self.latency_fn = latency_fn
        self.reward_cost = reward_cost or (budget_kind if reward_mode == "trade_off" else "macs")
        self.dense_widths = [group.width for group in self.groups]
        self._costs: dict[tuple, float] = {}  # (kind, *widths) -> cost; PruningVectorEnv shares it among alike envs
        if max_keep is None:
            max_keep = self._max_keep_from_masks(model_or_config)
        if len(max_keep) != len(self.groups):
            raise ValueError(f"max_keep has {len(max_keep)} entries for {len(self.groups)} prunable groups.")
        self.max_widths = [max(1, min(w, int(round(r * w)))) for r, w in zip(max_keep, self.dense_widths)]
        self.min_widths = [min(self._snap(max(1, math.ceil(min_keep * w)), i, up=True), self.max_widths[i]) for i, w in enumerate(self.dense_widths)]
        self.dense_cost = self.cost(self.dense_widths)
        self.dense_macs = compute_macs(self.config, seq_len=seq_len)
        self.budget = self.target * self.dense_cost
        smallest = self.cost(self.min_widths)
        if smallest > self.budget * (1 + 1e-9):
            floor = self.cost([1] * len(self.groups))  # what no min_keep gets under: unpruned layers, a runtime's fixed cost
            unsnapped = [min(max(1, math.ceil(min_keep * w)), m) for w, m in zip(self.dense_widths, self.max_widths)]
            if floor > self.budget * (1 + 1e-9):
                fix = f"Raise the target: even one unit per group costs {floor / self.dense_cost:.3f} x dense."
            elif self.width_multiple > 1 and self.cost(unsnapped) <= self.budget * (1 + 1e-9):
                fix = (f"width_multiple={self.width_multiple} rounds each group's minimum up to a multiple of "
                       f"{self.width_multiple}: lower width_multiple (1: any width) or raise the target.")
            else:
                fix = "Raise the target or lower min_keep."
            raise ValueError(
                f"The budget of {self.target:.3f} x dense {budget_kind} cannot be met: keeping only min_keep={min_keep} "
                f"of every group still costs {smallest / self.dense_cost:.3f} x dense. {fix}"
            )
        self._group_macs, self._group_params = self._group_shares()
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        self.action_space = gym.spaces.Box(self.min_keep, 1.0, shape=(1,), dtype=np.float32)
        self._step_index = 0
        self._widths: list[int] = []
        self._previous_action = 1.0

    # ---- cost -------------------------------------------------------------------------------------------------
    def widths_dict(self, widths: list[int]) -> dict[str, int]:
        return {group.name: int(width) for group, width in zip(self.groups, widths)}

    def cost(self, widths: list[int], kind: str | None = None) -> float:
        """Cost of an allocation (widths in group order): the budget's kind, or `kind`; latency in milliseconds."""
        kind = kind or self.budget_kind
        key = (kind, *widths)
        if key not in self._costs:  # the budget wall and the fill bisect over the same allocations again and again
            if len(self._costs) >= MAX_CACHED_COSTS:  # bounded memory over many rounds; cleared in place, as envs share it
                self._costs.clear()
            named = self.widths_dict(widths)
            if kind == "macs":
                self._costs[key] = float(compute_macs(self.config, seq_len=self.seq_len, widths=named))
            elif kind == "params":
                self._costs[key] = float(count_parameters(self.config, widths=named))
            else:
                self._costs[key] = float(self.latency_fn(named))
        return self._costs[key]

    def _max_keep_from_masks(self, model_or_config) -> list[float]:
        if not hasattr(model_or_config, "config"):
            return [1.0] * len(self.groups)
        alive = masked_widths(model_or_config)
        return [alive[group.name] / group.width for group in self.groups]

    def _snap(self, width: int, index: int, up: bool = False) -> int:
        multiple = self.width_multiple
        if multiple == 1 or self.dense_widths[index] <= multiple or width >= self.dense_widths[index]:
            return min(width, self.dense_widths[index])  # the full width is kept whole, a multiple or not
        snapped = (math.ceil(width / multiple) if up else width // multiple) * multiple
        return int(min(max(snapped, multiple), self.dense_widths[index]))

    def _group_shares(self):
        """Each group's share of the dense MACs and params: the cost removed when it alone drops to one unit."""
        dense_macs, dense_params = self.dense_macs, count_parameters(self.config)
        macs, params = [], []
        for idx in range(len(self.groups)):
            widths = list(self.dense_widths)
            widths[idx] = 1
            macs.append(1 - compute_macs(self.config, seq_len=self.seq_len, widths=self.widths_dict(widths)) / dense_macs)
            params.append(1 - count_parameters(self.config, widths=self.widths_dict(widths)) / dense_params)
        return macs, params

    def max_feasible_width(self, index: int, chosen: list[int]) -> int:
        """The widest width for group `index` that keeps the budget reachable with every later group at its minimum."""
        low, high = self.min_widths[index], self.max_widths[index]
        tail = self.min_widths[index + 1 :]

        def fits(width):
            return self.cost(chosen + [width] + tail) <= self.budget * (1 + 1e-9)

        if fits(high):
            return high
        while high - low > 1:  # cost is monotone in each width: bisect
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    # ---- gymnasium API ----------------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._step_index, self._widths, self._previous_action = 0, [], 1.0
        return self._observation(), {"budget": self.target}

    def _observation(self) -> np.ndarray:
        idx = self._step_index
        group = self.groups[idx]
        n = len(self.groups)
        max_width = max(self.dense_widths)
        chosen = self._widths + self.dense_widths[idx:]
        cost_removed = 1 - self.cost(chosen) / self.dense_cost
        cost_ahead = self.dense_cost - self.cost(self._widths + self.min_widths[idx:]) if idx < n else 0.0
        in_width = self.dense_widths[idx - 1] if idx > 0 else getattr(self.config, "num_channels", 1)
        kernel = getattr(self.config, "kernel_size", 1) if group.kind == "conv" else 1
        features = [
            idx / max(n - 1, 1),
            *(float(group.kind == kind) for kind in GROUP_KINDS),
            in_width / max_width,
            group.width / max_width,
            kernel / 7.0,
            self._group_macs[idx],
            self._group_params[idx],
            cost_removed,
            max(0.0, cost_ahead / self.dense_cost),
            self._previous_action,
            self.target,
            self.max_widths[idx] / group.width,
        ]
        return np.clip(np.asarray(features, dtype=np.float32), 0.0, 1.0)

    def step(self, action):
        widths = self.advance(action)
        if widths is None:
            return self._observation(), 0.0, False, False, {"budget": self.target}
        info = self.evaluate(widths)
        return np.zeros(self.observation_space.shape, dtype=np.float32), info["reward"], True, False, info

    def advance(self, action) -> list[int] | None:
        """Apply one keep ratio behind the budget wall; at the last group, the episode's final widths (else None).

        `step` without the reward evaluation, so that PruningVectorEnv can evaluate several episodes' allocations at once.
        """
        if self._step_index >= len(self.groups):
            raise RuntimeError("The episode is over; call reset() before step().")
        idx = self._step_index
        ratio = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], self.min_keep, 1.0))
        feasible = self.max_feasible_width(idx, self._widths)  # the budget wall
        width = self._width_from_ratio(ratio, idx)
        if width > feasible:
            snapped = self._snap(feasible, idx)
            # the wall itself when it is the cap (an earlier round's width) or snapping would break min_keep
            keep_wall = feasible == self.max_widths[idx] or not self.min_widths[idx] <= snapped <= feasible
            width = feasible if keep_wall else snapped
        self._widths.append(width)
        self._previous_action = ratio
        self._step_index += 1
        if self._step_index < len(self.groups):
            return None
        return self._fill(self._widths) if self.fill_budget else list(self._widths)

    def _fill(self, widths: list[int]) -> list[int]:
        """Scale the allocation up (same proportions, capped per group) to the largest that fits the budget."""
        ratios = [w / d for w, d in zip(widths, self.dense_widths)]

        def scaled(scale):
            out = []
            for idx, ratio in enumerate(ratios):
                width = self._snap(max(1, int(math.floor(ratio * scale * self.dense_widths[idx] + 1e-9))), idx)
                out.append(min(max(width, widths[idx]), self.max_widths[idx]))
            return out

        def fits(candidate):
            return self.cost(candidate) <= self.budget * (1 + 1e-9)

        low, high = 1.0, 1.0 / max(min(ratios), 1e-6)
        for _ in range(30):  # bisection on the common scale; cost is monotone in it
            middle = (low + high) / 2
            low, high = (middle, high) if fits(scaled(middle)) else (low, middle)
        return self._top_up(scaled(low), [ratio * dense for ratio, dense in zip(ratios, self.dense_widths)], fits)

    def _top_up(self, filled: list[int], shares: list[float], fits) -> list[int]:
        """Widths move in whole units (or multiples), so a common scale stops where the next step of any one group
        would overshoot (a conv channel costs far more than a dense unit), however much budget the others could still
        use. Top up one step at a time, the group furthest below its proportional share first (ties: the first group),
        until no group's next step fits.

        Computed a run of steps at a time: the group in front keeps taking steps while it stays in front and they fit
        (found by bisection), so a wide, cheap layer does not cost one budget check per unit. Growing only shrinks the
        budget left, so a group whose next step does not fit is never considered again.
        """
        filled = list(filled)

        def behind(idx):
            return (filled[idx] / shares[idx], idx)

        growable = list(range(len(filled)))
        while growable:
            growable.sort(key=behind)
            idx = growable[0]
            rival = behind(growable[1]) if len(growable) > 1 else None
            # the widths of the steps it takes while in front: the first always, each later one if it is still in front
            # of the rival before taking it; at_cap when the last of them is as far as it can grow
            path, width, at_cap = [], filled[idx], False
            while not path or rival is None or (path[-1] / shares[idx], idx) < rival:
                width = min(self._snap(width + self.width_multiple, idx), self.max_widths[idx])
                if width <= (path[-1] if path else filled[idx]):
                    at_cap = True
                    break
                path.append(width)
            low, high = 0, len(path)  # bisect the most of those steps that fit: cost grows with the width
            while low < high:
                middle = (low + high + 1) // 2
                fit = fits(filled[:idx] + [path[middle - 1]] + filled[idx + 1:])
                low, high = (middle, high) if fit else (low, middle - 1)
            if low:
                filled[idx] = path[low - 1]
            if low < len(path) or at_cap:  # its next step does not fit (now or later), or it is at its cap
                growable.pop(0)
        return filled

    def evaluate(self, widths: list[int]) -> dict:
        """Accuracy, cost and reward of one allocation (a list of widths in group order)."""
        return self.score(widths, float(self.evaluate_fn(self.widths_dict(widths))))

    def score(self, widths: list[int], accuracy: float) -> dict:
        """Cost and reward of an allocation (widths in group order) whose accuracy is already measured."""
        named = self.widths_dict(widths)
        macs, params = int(self.cost(widths, "macs")), int(self.cost(widths, "params"))  # cached: exact integers as floats
        cost_ratio = self.cost(widths) / self.dense_cost
        latency_ms = self.cost(widths, "latency") if self.latency_fn is not None else None
        if self.reward_mode == "budget_accuracy":
            reward = accuracy
        elif self.reward_mode == "trade_off":
            # accuracy / cost, cost relative to dense: the plan's trade-off, scale-free
            reward = accuracy / max(self.cost(widths, self.reward_cost) / self.cost(self.dense_widths, self.reward_cost), 1e-9)
        else:  # AMC: -error * log(cost); FLOPs as in AMC, latency in microseconds so the log stays positive
            amc_cost = {"macs": 2.0 * macs, "params": params, "latency": 1e3 * (latency_ms or 0.0)}
            reward = -(1.0 - accuracy) * math.log(max(amc_cost[self.reward_cost], 1.0))
        return {
            "reward": float(reward),
            "accuracy": accuracy,
            "widths": named,
            "keep_ratios": [w / d for w, d in zip(widths, self.dense_widths)],
            "macs": macs,
            "macs_ratio": macs / self.dense_macs,
            "params": params,
            "cost_ratio": cost_ratio,
            "latency_ms": latency_ms,
            "budget": self.target,
        }

    def uniform_keep_ratio(self) -> float:
        """The largest single keep ratio that, applied to every group, meets the budget (the uniform baseline)."""
        def fits(ratio):
            widths = [min(self._width_from_ratio(ratio, i), self.max_widths[i]) for i in range(len(self.groups))]
            return self.cost(widths) <= self.budget * (1 + 1e-9)

        low, high = self.min_keep, 1.0
        if fits(high):
            return high
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        # actions travel as float32: step down until the float32 value itself fits
        ratio = np.float32(low)
        while ratio > self.min_keep and not fits(float(ratio)):
            ratio = np.nextafter(ratio, np.float32(0))
        return float(ratio)

    def _width_from_ratio(self, ratio: float, index: int) -> int:
        width = self._snap(max(1, int(round(ratio * self.dense_widths[index]))), index)
        return max(width, self.min_widths[index])


class PruningVectorEnv(gym.vector.VectorEnv):
    """Several PruningEnv episodes in lockstep, so that their allocations are evaluated in one batch.

    Every episode has one step per prunable group, so all sub-environments finish on the same step; there the
    final allocations go to `evaluate_batch_fn` together (e.g. RewardEvaluator.evaluate_batch, which trains and
    measures them in one vmapped pass). No autoreset: call `reset` to start the next batch of episodes.
    Infos follow gymnasium's vector convention (arrays over sub-environments, with `_key` masks).

    Args:
        envs: the sub-environments, alike (same model, budget and reward); they share nothing but their config.
        evaluate_batch_fn: `list of widths dicts -> list of accuracies`, in order. Default: each env's evaluate_fn.
    """

    metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.DISABLED}

    def __init__(self, envs: list[PruningEnv], evaluate_batch_fn: Callable[[list[dict[str, int]]], list[float]] | None = None):
        if not envs:
            raise ValueError("PruningVectorEnv needs at least one PruningEnv.")
        if len({id(env) for env in envs}) != len(envs):
            raise ValueError("PruningVectorEnv needs distinct PruningEnv objects: each holds its own episode.")
        if len({len(env.groups) for env in envs}) != 1:
            raise ValueError("The sub-environments must walk the same prunable groups (one model, one budget).")
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        for env in self.envs[1:]:  # alike envs price allocations alike: one cost cache for all
            if env.config is envs[0].config and env.latency_fn is envs[0].latency_fn and env.seq_len == envs[0].seq_len:
                env._costs = envs[0]._costs
        self.evaluate_batch_fn = evaluate_batch_fn or (lambda widths: [env.evaluate_fn(w) for env, w in zip(self.envs, widths)])
        self.single_observation_space = envs[0].observation_space
        self.single_action_space = envs[0].action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)

    def reset(self, *, seed=None, options=None):
        seeds = [None] * self.num_envs if seed is None else [seed + index for index in range(self.num_envs)]
        observations, infos = [], {}
        for index, (env, env_seed) in enumerate(zip(self.envs, seeds)):
            observation, info = env.reset(seed=env_seed, options=options)
            observations.append(observation)
            infos = self._add_info(infos, info, index)
        return np.stack(observations), infos  # (K, obs_dim)

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.float32)
        if actions.size != self.num_envs:
            raise ValueError(f"Got {actions.size} actions for {self.num_envs} environments; give one keep ratio each.")
        actions = actions.reshape(self.num_envs, 1)  # (K, 1)
        final_widths = [env.advance(action) for env, action in zip(self.envs, actions)]
        done = [widths is not None for widths in final_widths]
        if any(done) and not all(done):
            raise RuntimeError("The sub-environments fell out of lockstep; reset them together.")
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        infos = {}
        if all(done):
            accuracies = self.evaluate_batch_fn([env.widths_dict(widths) for env, widths in zip(self.envs, final_widths)])
            if len(accuracies) != self.num_envs:
                raise ValueError(f"evaluate_batch_fn returned {len(accuracies)} accuracies for {self.num_envs} allocations.")
            for index, (env, widths, accuracy) in enumerate(zip(self.envs, final_widths, accuracies)):
                info = env.score(widths, float(accuracy))
                rewards[index] = info["reward"]
                infos = self._add_info(infos, info, index)
            observations = np.zeros((self.num_envs, *self.single_observation_space.shape), dtype=np.float32)
        else:
            observations = np.stack([env._observation() for env in self.envs])
            for index, env in enumerate(self.envs):
                infos = self._add_info(infos, {"budget": env.target}, index)
        terminated = np.asarray(done, dtype=np.bool_)
        return observations, rewards, terminated, np.zeros(self.num_envs, dtype=np.bool_), infos
