"""RL agent and baselines that choose per-layer keep ratios from observation vectors (never from a model)."""

from .baselines import RandomSearchPolicy, SearchPolicy, UniformPolicy
from .ppo import ActorCritic, PPOAgent, PPOConfig, clipped_policy_loss, compute_gae, ppo_update
from .search import SearchResult, evaluate_policy, run_search

__all__ = [
    "ActorCritic",
    "PPOAgent",
    "PPOConfig",
    "RandomSearchPolicy",
    "SearchPolicy",
    "SearchResult",
    "UniformPolicy",
    "clipped_policy_loss",
    "compute_gae",
    "evaluate_policy",
    "ppo_update",
    "run_search",
]
