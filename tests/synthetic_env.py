"""A model-free stand-in for the pruning environment, with a known optimum, for testing search policies.

N fake layers have cost weights c_i (MACs) and hidden sensitivities s_i. The episode visits them in order; the agent
proposes keep ratios k_i in [min_keep, 1]; an AMC-style budget wall clips each proposal so the remaining layers at
min_keep can still meet the budget sum(c_i k_i) / sum(c_i) <= budget, and the last layer takes the largest keep that
meets it. Reward (last step only) is accuracy-like: 1 - sum(s_i (1 - k_i)^2).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class SyntheticPruneEnv(gym.Env):
    OBS_DIM = 7

    def __init__(self, sensitivities, costs, budget: float, min_keep: float = 0.1):
        self.sensitivities = np.asarray(sensitivities, dtype=np.float64)
        self.costs = np.asarray(costs, dtype=np.float64)
        self.num_layers = len(self.costs)
        self.budget, self.min_keep = float(budget), float(min_keep)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.OBS_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(self.min_keep, 1.0, (1,), dtype=np.float32)
        self.keep_ratios: list[float] = []

    def reward_of(self, keep_ratios) -> float:
        return float(1.0 - np.sum(self.sensitivities * (1.0 - np.asarray(keep_ratios)) ** 2))

    def uniform_keep_ratio(self) -> float:
        return self.budget

    def _max_keep(self) -> float:
        """Largest keep for the current layer that leaves the budget reachable with later layers at min_keep."""
        layer = len(self.keep_ratios)
        kept = float(np.dot(self.costs[:layer], self.keep_ratios))
        later_at_min = self.min_keep * float(self.costs[layer + 1:].sum())
        room = self.budget * self.costs.sum() - kept - later_at_min
        return float(np.clip(room / self.costs[layer], self.min_keep, 1.0))

    def _obs(self) -> np.ndarray:
        layer = len(self.keep_ratios)
        total = self.costs.sum()
        kept = float(np.dot(self.costs[:layer], self.keep_ratios))
        return np.array(
            [
                layer / (self.num_layers - 1),  # progress
                self.costs[layer] / total,  # this layer's cost share
                (self.costs[:layer].sum() - kept) / total,  # removed so far
                self.costs[layer:].sum() / total,  # remaining
                self.budget,
                self.keep_ratios[-1] if self.keep_ratios else 1.0,  # previous action
                (self._max_keep() - self.min_keep) / (1.0 - self.min_keep),  # budget wall
            ],
            dtype=np.float32,
        )

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.keep_ratios = []
        return self._obs(), {"budget": self.budget}

    def step(self, action):
        proposed = float(np.clip(np.asarray(action).reshape(-1)[0], self.min_keep, 1.0))
        last = len(self.keep_ratios) == self.num_layers - 1
        wall = self._max_keep()
        self.keep_ratios.append(wall if last else min(proposed, wall))
        info = {"budget": self.budget}
        if last:
            info["keep_ratios"] = list(self.keep_ratios)
            observation = np.zeros(self.OBS_DIM, dtype=np.float32)
            return observation, self.reward_of(self.keep_ratios), True, False, info
        return self._obs(), 0.0, False, False, info

    def optimum(self) -> tuple[list[float], float]:
        """KKT (water-filling) solution k_i = clip(1 - lam c_i / (2 s_i), min_keep, 1), lam bisected onto the budget."""
        target = self.budget * self.costs.sum()

        def keeps(lam):
            return np.clip(1.0 - lam * self.costs / (2.0 * self.sensitivities), self.min_keep, 1.0)

        low, high = 0.0, 1.0
        while np.dot(self.costs, keeps(high)) > target:
            high *= 2.0
        for _ in range(200):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if np.dot(self.costs, keeps(mid)) > target else (low, mid)
        best = keeps(high)
        return best.tolist(), self.reward_of(best)
