"""RL agent and baselines that choose per-layer keep ratios from observation vectors (never from a model)."""

from .baselines import RandomSearchPolicy, SearchPolicy, UniformPolicy
from .ppo import ActorCritic, PPOAgent, PPOConfig, clipped_policy_loss, compute_gae, ppo_update

__all__ = [
    "ActorCritic",
    "PPOAgent",
    "PPOConfig",
    "RandomSearchPolicy",
    "SearchPolicy",
    "UniformPolicy",
    "clipped_policy_loss",
    "compute_gae",
    "ppo_update",
]
