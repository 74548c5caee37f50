"""Baseline policies with the agent's interface (``name``, ``act_batch``, ``observe_batch``), so a search treats all alike."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SearchPolicy(Protocol):
    name: str

    def act(self, obs, deterministic: bool = False) -> float: ...

    def act_batch(self, observations, deterministic: bool = False) -> np.ndarray: ...

    def observe_batch(self, rewards, dones) -> None: ...


class UniformPolicy:
    """The same keep ratio for every layer; the environment supplies the one that meets the budget."""

    name = "uniform"

    def __init__(self, keep_ratio: float):
        self.keep_ratio = float(keep_ratio)

    def act(self, obs, deterministic: bool = False) -> float:
        return self.keep_ratio

    def act_batch(self, observations, deterministic: bool = False) -> np.ndarray:
        return np.full(len(observations), self.keep_ratio)

    def observe_batch(self, rewards, dones) -> None:
        pass


class RandomSearchPolicy:
    """An independent uniform keep ratio in [action_low, action_high] per step, seeded.

    ``deterministic`` is ignored: random search has no deterministic policy, its result is the best episode found.
    """

    name = "random_search"

    def __init__(self, action_low: float, action_high: float, seed: int = 0):
        if not action_low <= action_high:
            raise ValueError(f"action_low ({action_low}) must be <= action_high ({action_high})")
        self.action_low, self.action_high = float(action_low), float(action_high)
        self.rng = np.random.default_rng(seed)

    def act(self, obs, deterministic: bool = False) -> float:
        return float(self.act_batch([obs])[0])

    def act_batch(self, observations, deterministic: bool = False) -> np.ndarray:
        return self.rng.uniform(self.action_low, self.action_high, size=len(observations))

    def observe_batch(self, rewards, dones) -> None:
        pass
