"""Episode loop shared by the PPO agent and the baselines: one episode = one reward evaluation.

It lives outside `agent/`, since it drives the pruning environments (and so the model they prune); the agent
itself only maps observations to actions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from .agent import PPOAgent, SearchPolicy
from .env import PruningEnv, PruningVectorEnv


@dataclass
class SearchResult:
    best_reward: float
    best_keep_ratios: list[float]  # the environment's realized (budget-clipped) keep ratios of the best episode
    best_info: dict  # terminal info dict of the best episode
    history: list[float]  # episode reward, in order
    num_evaluations: int  # episodes run, i.e. reward evaluations
    wall_time_s: float
    update_stats: list[dict] = field(default_factory=list)  # one entry per PPO update during the search


def _run_episodes(vector_env, policy: SearchPolicy, seed, deterministic: bool) -> list[tuple[float, dict]]:
    """One episode per sub-environment, in lockstep; (summed reward, terminal info) of each, in env order.

    Only stochastic episodes are fed to ``observe_batch``.
    """
    observations, _ = vector_env.reset(seed=seed)
    episode_rewards = np.zeros(vector_env.num_envs)
    done = False
    while not done:
        actions = policy.act_batch(observations, deterministic=deterministic)  # (K,)
        observations, rewards, terminated, truncated, infos = vector_env.step(np.asarray(actions, dtype=np.float32).reshape(-1, 1))
        dones = np.logical_or(terminated, truncated)
        if dones.any() and not dones.all():
            raise ValueError("The vector env's episodes ended at different steps; run_search needs lockstep episodes of one length.")
        episode_rewards += rewards
        if not deterministic:
            policy.observe_batch(rewards, dones)
        done = bool(dones.all())
    if "keep_ratios" not in infos:
        raise KeyError("the environment's terminal info must contain 'keep_ratios' (the realized keep ratios)")
    return [(float(reward), _env_info(infos, index)) for index, reward in enumerate(episode_rewards)]


def _env_info(infos: dict, index: int) -> dict:
    """Sub-environment `index`'s info out of gymnasium's vector info (arrays over envs, `_key` masks)."""
    info = {}
    for key, value in infos.items():
        present = infos.get(f"_{key}")
        if key.startswith("_") or (present is not None and not present[index]):
            continue
        if isinstance(value, dict):
            info[key] = _env_info(value, index)
        else:
            item = value[index]
            info[key] = item.item() if isinstance(item, np.generic) else item
    return info


def as_vector_env(env) -> gym.vector.VectorEnv:
    """A vector environment as it is; a PruningEnv as a PruningVectorEnv of one; any other Env through gymnasium's
    SyncVectorEnv (episodes are reset here, so no autoreset)."""
    if isinstance(env, gym.vector.VectorEnv):
        return env
    if isinstance(env, PruningEnv):
        return PruningVectorEnv([env])
    return gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def run_search(env, policy: SearchPolicy, num_episodes: int, seed: int = 0, show_progress: bool = True,
               desc: str | None = None) -> SearchResult:
    """Run ``num_episodes`` episodes of ``policy``, updating a PPOAgent whenever it has enough episodes.

    ``env`` is a PruningEnv, or a PruningVectorEnv whose K episodes run in lockstep and are evaluated in one batch
    (the last batch is smaller when K does not divide ``num_episodes``). Only the first reset is seeded
    (gymnasium's convention); the best episode is the first with the highest reward.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    vector_env = as_vector_env(env)
    start = time.perf_counter()
    best_reward, best_info, history, update_stats = -float("inf"), {}, [], []
    progress = tqdm(total=num_episodes, desc=desc or f"search ({policy.name})", disable=not show_progress)
    while len(history) < num_episodes:
        count = min(vector_env.num_envs, num_episodes - len(history))
        batch_env = vector_env
        if count < vector_env.num_envs:  # the last, smaller batch: evaluations stay exactly num_episodes
            if not isinstance(vector_env, PruningVectorEnv):
                raise ValueError(f"num_episodes = {num_episodes} is not a multiple of the vector env's {vector_env.num_envs} envs.")
            batch_env = PruningVectorEnv(vector_env.envs[:count], vector_env.evaluate_batch_fn)
        for reward, info in _run_episodes(batch_env, policy, seed if not history else None, deterministic=False):
            history.append(reward)
            if reward > best_reward:
                best_reward, best_info = reward, info
        if isinstance(policy, PPOAgent) and policy.should_update:
            update_stats.append(policy.update())
        postfix = {"reward": f"{history[-1]:.4f}", "best": f"{best_reward:.4f}"}
        if "budget" in best_info:
            postfix["budget"] = f"{float(best_info['budget']):.3f}"
        progress.set_postfix(postfix)
        progress.update(count)
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
    vector_env = as_vector_env(env)
    if vector_env.num_envs != 1:
        raise ValueError(f"evaluate_policy runs one deterministic episode; give a single env, not {vector_env.num_envs}.")
    start = time.perf_counter()
    ((reward, info),) = _run_episodes(vector_env, policy, seed, deterministic=True)
    return SearchResult(
        best_reward=reward,
        best_keep_ratios=[float(k) for k in info["keep_ratios"]],
        best_info=info,
        history=[reward],
        num_evaluations=1,
        wall_time_s=time.perf_counter() - start,
    )
