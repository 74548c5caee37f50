"""Episode loop shared by the PPO agent and the baselines: one episode = one reward evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .baselines import SearchPolicy
from .ppo import PPOAgent


@dataclass
class SearchResult:
    best_reward: float
    best_keep_ratios: list[float]  # the environment's realized (budget-clipped) keep ratios of the best episode
    best_info: dict  # terminal info dict of the best episode
    history: list[float]  # episode reward, in order
    num_evaluations: int  # episodes run, i.e. reward evaluations
    wall_time_s: float
    update_stats: list[dict] = field(default_factory=list)  # one entry per PPO update during the search


def _run_episode(env, policy: SearchPolicy, seed, deterministic: bool):
    """One episode; returns (summed reward, terminal info). Only stochastic episodes are fed to ``observe``."""
    obs, info = env.reset(seed=seed)
    episode_reward, done = 0.0, False
    while not done:
        action = policy.act(obs, deterministic=deterministic)
        obs, reward, terminated, truncated, info = env.step(np.array([action], dtype=np.float32))
        done = bool(terminated or truncated)
        episode_reward += float(reward)
        if not deterministic:
            policy.observe(float(reward), done)
    if "keep_ratios" not in info:
        raise KeyError("the environment's terminal info must contain 'keep_ratios' (the realized keep ratios)")
    return episode_reward, info


def run_search(env, policy: SearchPolicy, num_episodes: int, seed: int = 0, show_progress: bool = True,
               desc: str | None = None) -> SearchResult:
    """Run ``num_episodes`` episodes of ``policy`` on ``env``, updating a PPOAgent whenever it has enough episodes.

    Only the first reset is seeded (gymnasium's convention); the best episode is the first with the highest reward.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    start = time.perf_counter()
    best_reward, best_info, history, update_stats = -float("inf"), {}, [], []
    progress = tqdm(range(num_episodes), desc=desc or f"search ({policy.name})", disable=not show_progress)
    for episode in progress:
        reward, info = _run_episode(env, policy, seed if episode == 0 else None, deterministic=False)
        history.append(reward)
        if reward > best_reward:
            best_reward, best_info = reward, info
        if isinstance(policy, PPOAgent) and policy.should_update:
            update_stats.append(policy.update())
        postfix = {"reward": f"{reward:.4f}", "best": f"{best_reward:.4f}"}
        if "budget" in info:
            postfix["budget"] = f"{float(info['budget']):.3f}"
        progress.set_postfix(postfix)
    progress.close()
    return SearchResult(
        best_reward=best_reward,
        best_keep_ratios=[float(k) for k in best_info["keep_ratios"]],
        best_info=best_info,
        history=history,
        num_evaluations=num_episodes,
        wall_time_s=time.perf_counter() - start,
        update_stats=update_stats,
    )


def evaluate_policy(env, policy: SearchPolicy, seed: int | None = None) -> SearchResult:
    """One deterministic episode (the PPO agent acts with its mean); nothing is recorded or learned."""
    start = time.perf_counter()
    reward, info = _run_episode(env, policy, seed, deterministic=True)
    return SearchResult(
        best_reward=reward,
        best_keep_ratios=[float(k) for k in info["keep_ratios"]],
        best_info=info,
        history=[reward],
        num_evaluations=1,
        wall_time_s=time.perf_counter() - start,
    )
