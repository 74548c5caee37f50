import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors import safe_open

from hf_rlprune.agent import (
    PPOAgent,
    PPOConfig,
    RandomSearchPolicy,
    UniformPolicy,
    clipped_policy_loss,
    compute_gae,
    ppo_update,
)
from hf_rlprune.agent.ppo import ActorCritic, RolloutBatch
from hf_rlprune.search import evaluate_policy, run_search

from .synthetic_env import SyntheticPruneEnv

MIN_KEEP = 0.1


def make_env(budget=0.5):
    # Costly, insensitive layers (2 and 4) should be pruned hard, the cheap sensitive ends kept: far from uniform.
    return SyntheticPruneEnv(
        sensitivities=[0.8, 0.1, 0.05, 0.3, 0.02, 0.6], costs=[1, 3, 4, 2, 3, 1], budget=budget, min_keep=MIN_KEEP
    )


def make_agent(seed=0, **config):
    # RLPruneConfig's learning rate: the plan's 3e-4 loses to random search within a few hundred episodes
    config = {"learning_rate": 1e-3, **config}
    return PPOAgent(SyntheticPruneEnv.OBS_DIM, MIN_KEEP, 1.0, PPOConfig(**config), seed=seed)


@pytest.fixture
def single_thread():
    # Tiny MLPs gain nothing from intra-op threads, and on a shared CPU they can slow the search tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rollout_actions(agent, env, num_episodes, seed):
    """Keep ratios the agent proposes over ``num_episodes``, updating whenever it is ready."""
    actions = []
    obs, _ = env.reset(seed=seed)
    for _ in range(num_episodes):
        done = False
        while not done:
            actions.append(agent.act(obs))
            obs, reward, terminated, truncated, _ = env.step(np.array([actions[-1]], dtype=np.float32))
            done = terminated or truncated
            agent.observe(reward, done)
        if agent.should_update:
            agent.update()
        obs, _ = env.reset()
    return actions


# --- GAE and the clipped objective, against hand-worked numbers ---


def test_gae_three_steps_with_episode_boundary():
    # CleanRL convention: dones[t] = 1 means obs[t] starts a new episode. Here step 0 ended an episode;
    # steps 1-2 belong to the next one, which is still running and is bootstrapped by next_value.
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, 1.0, 1.5])
    dones = torch.tensor([0.0, 1.0, 0.0])
    gamma, lam = 0.9, 0.8
    advantages, returns = compute_gae(
        rewards, values, dones, next_value=2.0, next_done=0.0, gamma=gamma, gae_lambda=lam
    )
    # t=2: delta = 3 + 0.9 * 2.0 - 1.5 = 3.3;               A2 = 3.3
    # t=1: delta = 2 + 0.9 * 1.5 - 1.0 = 2.35;              A1 = 2.35 + 0.9 * 0.8 * 3.3 = 4.726
    # t=0: next obs starts a new episode, no bootstrap:     A0 = 1 - 0.5 = 0.5
    torch.testing.assert_close(advantages, torch.tensor([0.5, 4.726, 3.3]))
    torch.testing.assert_close(returns, torch.tensor([0.5 + 0.5, 4.726 + 1.0, 3.3 + 1.5]))


def test_gae_terminal_last_step_ignores_next_value():
    advantages, returns = compute_gae(
        torch.tensor([0.0, 1.0]), torch.tensor([0.2, 0.4]), torch.zeros(2), next_value=99.0, next_done=1.0,
        gamma=1.0, gae_lambda=1.0,
    )
    # t=1: A1 = 1 - 0.4 = 0.6;  t=0: delta = 0 + 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.6 = 0.8; returns = A + V = [1, 1].
    torch.testing.assert_close(advantages, torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(returns, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(
    "ratio, advantage, expected",
    [
        (1.5, 2.0, -2.4),  # above 1 + clip, positive A: clipped, -2 * 1.2 (no credit beyond the trust region)
        (0.5, -1.0, 0.8),  # below 1 - clip, negative A: clipped, -(-1) * 0.8
        (1.1, 3.0, -3.3),  # inside the clip range: plain -A * r
        (1.5, -1.0, 1.5),  # above 1 + clip, negative A: pessimistic unclipped term, -(-1) * 1.5
        (0.5, 2.0, -1.0),  # below 1 - clip, positive A: pessimistic unclipped term, -2 * 0.5
    ],
)
def test_clipped_policy_loss_single(ratio, advantage, expected):
    old_logprob = torch.tensor([-1.0])
    new_logprob = old_logprob + math.log(ratio)
    loss = clipped_policy_loss(new_logprob, old_logprob, torch.tensor([advantage]), clip_coef=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clipped_policy_loss_is_mean_over_batch():
    old_logprob = torch.zeros(3)
    new_logprob = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    loss = clipped_policy_loss(new_logprob, old_logprob, torch.tensor([2.0, -1.0, 3.0]), clip_coef=0.2)
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 3.3) / 3, abs=1e-6)


# --- configuration ---


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", 0.0),
        ("gamma", 1.5),
        ("gamma", -0.1),
        ("gae_lambda", 1.01),
        ("clip_coef", 0.0),
        ("update_epochs", 0),
        ("update_epochs", 2.5),
        ("minibatch_size", 0),
        ("ent_coef", -0.01),
        ("vf_coef", -1.0),
        ("max_grad_norm", 0.0),
        ("hidden_size", 0),
        ("init_std", 0.0),
        ("episodes_per_update", 0),
    ],
)
def test_config_rejects_bad_values(name, value):
    with pytest.raises(ValueError, match=name):
        PPOConfig(**{name: value})


def test_config_defaults_and_help():
    config = PPOConfig()
    assert (config.learning_rate, config.gamma, config.clip_coef, config.update_epochs, config.minibatch_size) == (3e-4, 0.99, 0.2, 10, 64)
    assert all(f.metadata.get("help") for f in PPOConfig.__dataclass_fields__.values())


def test_agent_rejects_bad_construction_and_misuse():
    with pytest.raises(ValueError, match="action_low"):
        PPOAgent(3, 1.0, 0.5)
    agent = make_agent()
    with pytest.raises(ValueError, match="obs_dim"):
        agent.act(np.zeros(3, dtype=np.float32))
    with pytest.raises(RuntimeError, match="observe"):
        agent.observe(0.0, True)
    obs = np.zeros(SyntheticPruneEnv.OBS_DIM, dtype=np.float32)
    agent.act(obs)
    with pytest.raises(RuntimeError, match="observe"):
        agent.act(obs)
    with pytest.raises(RuntimeError, match="complete episode"):
        PPOAgent(3, 0.0, 1.0).update()


# --- the update itself ---


def test_ppo_update_is_deterministic_and_changes_the_policy():
    def run(seed_for_data):
        torch.manual_seed(seed_for_data)  # data only; the model and the shuffling have their own generator
        batch = RolloutBatch(
            obs=torch.rand(40, 5), actions=torch.rand(40, 1), logprobs=torch.full((40,), 0.5),
            advantages=torch.randn(40), returns=torch.randn(40),
        )
        generator = torch.Generator().manual_seed(0)
        model = ActorCritic(5, hidden_size=16, generator=generator)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        stats = ppo_update(model, optimizer, batch, PPOConfig(minibatch_size=16, update_epochs=2), generator)
        return stats, before, [p.detach() for p in model.parameters()]

    stats, before, after = run(0)
    assert set(stats) == {"policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"}
    assert all(math.isfinite(v) for v in stats.values())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    stats_again, _, after_again = run(0)
    assert stats_again == stats and all(torch.equal(a, b) for a, b in zip(after, after_again))


# --- the agent learns ---


def search_pair(seed, num_episodes):
    env = make_env()
    agent = make_agent(seed=seed)
    ppo = run_search(env, agent, num_episodes, seed=seed, show_progress=False)
    deterministic = evaluate_policy(env, agent)
    random = run_search(env, RandomSearchPolicy(MIN_KEEP, 1.0, seed=seed), num_episodes, seed=seed, show_progress=False)
    return ppo, deterministic, random


def test_ppo_finds_near_optimal_keep_ratios_and_beats_random_search(single_thread):
    env = make_env()
    optimal_keep, optimum = env.optimum()
    uniform = env.reward_of([env.uniform_keep_ratio()] * env.num_layers)
    assert optimum - uniform > 0.3  # the problem is far from uniform, so a non-learning policy cannot pass
    num_episodes = 500
    for seed in range(3):
        ppo, deterministic, random = search_pair(seed, num_episodes)
        assert ppo.num_evaluations == random.num_evaluations == num_episodes
        assert ppo.best_reward >= optimum - 0.01 * optimum, (seed, ppo.best_reward, optimum)
        assert deterministic.best_reward >= optimum - 0.04 * optimum, (seed, deterministic.best_reward, optimum)
        assert ppo.best_reward > random.best_reward, (seed, ppo.best_reward, random.best_reward)
        # The search got better over time, not just lucky: late episodes beat early ones on average.
        assert np.mean(ppo.history[-100:]) > np.mean(ppo.history[:100]) + 0.1
        assert np.allclose(ppo.best_keep_ratios, optimal_keep, atol=0.15), (ppo.best_keep_ratios, optimal_keep)


def test_ppo_learns_with_episodes_in_lockstep(single_thread):
    # The callback's way: 8 episodes step together so their rewards are evaluated in one batch, one update per batch.
    vector_env = gym.vector.SyncVectorEnv([make_env] * 8, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    env = make_env()
    optimal_keep, optimum = env.optimum()
    agent = make_agent(seed=0, episodes_per_update=8)
    ppo = run_search(vector_env, agent, 496, seed=0, show_progress=False)
    random = run_search(vector_env, RandomSearchPolicy(MIN_KEEP, 1.0, seed=0), 496, seed=0, show_progress=False)
    assert ppo.num_evaluations == len(ppo.history) == 496 and len(ppo.update_stats) == 62
    assert ppo.best_reward >= optimum - 0.01 * optimum and ppo.best_reward > random.best_reward
    assert evaluate_policy(env, agent).best_reward >= optimum - 0.04 * optimum
    with pytest.raises(ValueError, match="multiple"):
        run_search(vector_env, agent, 12, show_progress=False)
    with pytest.raises(ValueError, match="single env"):
        evaluate_policy(vector_env, agent)


def test_run_search_refuses_episodes_of_different_lengths():
    def short_env():
        return SyntheticPruneEnv(sensitivities=[0.5, 0.5, 0.5], costs=[1, 1, 1], budget=0.5, min_keep=MIN_KEEP)

    vector_env = gym.vector.SyncVectorEnv([make_env, short_env], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    with pytest.raises(ValueError, match="different steps"):
        run_search(vector_env, RandomSearchPolicy(MIN_KEEP, 1.0), 2, show_progress=False)


def test_lockstep_episodes_enter_the_buffer_whole_and_in_order():
    agent = make_agent(episodes_per_update=3)
    envs = [make_env() for _ in range(3)]
    observations = np.stack([env.reset(seed=0)[0] for env in envs])
    for step in range(envs[0].num_layers):
        actions = agent.act_batch(observations)
        assert actions.shape == (3,) and agent.episodes_in_buffer == 0  # nothing enters before the episodes end
        results = [env.step(np.array([action], dtype=np.float32)) for env, action in zip(envs, actions)]
        observations = np.stack([result[0] for result in results])
        agent.observe_batch([result[1] for result in results], [result[2] for result in results])
    steps = envs[0].num_layers
    assert agent.episodes_in_buffer == 3 and len(agent.rollout["obs"]) == 3 * steps
    assert [float(t) for t in agent.rollout["terminals"]] == ([0.0] * (steps - 1) + [1.0]) * 3
    assert torch.equal(agent.rollout["obs"][steps], agent.rollout["obs"][0])  # episode 2 starts where episode 1 did
    agent.update()
    with pytest.raises(ValueError, match="rewards"):
        agent.act_batch(observations[:2])
        agent.observe_batch([0.0], [True])


# --- determinism, save and load ---


def test_same_seed_same_actions_different_seed_different_actions(single_thread):
    actions = [
        rollout_actions(make_agent(seed=seed, episodes_per_update=4), make_env(), 12, seed=0) for seed in (0, 0, 1)
    ]
    assert actions[0] == actions[1]
    assert actions[0] != actions[2]
    assert all(MIN_KEEP <= a <= 1.0 for a in actions[0])


def test_save_load_resumes_bit_identically(tmp_path, single_thread):
    agent = make_agent(seed=3, episodes_per_update=4)
    env = make_env()
    rollout_actions(agent, env, 10, seed=0)  # two updates, two complete episodes left in the buffer
    assert agent.num_updates == 2 and agent.episodes_in_buffer == 2
    path = tmp_path / "agent.safetensors"
    agent.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["agent.safetensors"]
    with safe_open(str(path), framework="pt") as checkpoint:
        metadata = checkpoint.metadata()
        keys = set(checkpoint.keys())
    assert json.loads(metadata["config"])["episodes_per_update"] == 4
    assert json.loads(metadata["numpy_rng"])["bit_generator"] == "PCG64"
    assert "rng.torch_generator" in keys and any(key.endswith("exp_avg_sq") for key in keys)

    loaded = PPOAgent.load(path)
    assert loaded.num_updates == 2 and loaded.episodes_in_buffer == 2
    original_actions = rollout_actions(agent, make_env(), 10, seed=1)
    loaded_actions = rollout_actions(loaded, make_env(), 10, seed=1)
    assert original_actions == loaded_actions
    assert agent.num_updates == loaded.num_updates == 5
    for (name, a), (_, b) in zip(agent.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_refuses_mid_step(tmp_path):
    agent = make_agent()
    agent.act(np.zeros(SyntheticPruneEnv.OBS_DIM, dtype=np.float32))
    with pytest.raises(RuntimeError, match="observe"):
        agent.save(tmp_path / "agent.safetensors")


def test_deterministic_evaluation_draws_no_randomness_and_records_nothing(single_thread):
    evaluated, untouched = make_agent(seed=5), make_agent(seed=5)
    result = evaluate_policy(make_env(), evaluated)
    assert result.num_evaluations == 1 and len(result.best_keep_ratios) == 6
    assert evaluated.episodes_in_buffer == 0
    assert rollout_actions(evaluated, make_env(), 3, seed=0) == rollout_actions(untouched, make_env(), 3, seed=0)


# --- the search loop and warm starts ---


def test_run_search_reports_the_best_realized_keep_ratios(capsys):
    env = make_env(budget=0.4)
    result = run_search(env, RandomSearchPolicy(MIN_KEEP, 1.0, seed=0), 20, show_progress=False)
    assert capsys.readouterr().err == ""
    assert result.num_evaluations == len(result.history) == 20
    assert result.best_reward == max(result.history)
    assert result.best_reward == pytest.approx(env.reward_of(result.best_keep_ratios))
    assert result.best_keep_ratios == result.best_info["keep_ratios"]
    realized = np.dot(env.costs, result.best_keep_ratios) / env.costs.sum()
    assert realized <= 0.4 + 1e-9
    assert result.wall_time_s >= 0.0 and result.update_stats == []


def test_run_search_progress_bar_shows_reward_best_and_budget(capsys):
    run_search(make_env(budget=0.4), UniformPolicy(0.4), 3, desc="uniform search")
    err = capsys.readouterr().err
    assert "uniform search" in err and "best=" in err and "budget=0.400" in err


def test_agent_warm_starts_across_searches_with_a_new_budget(single_thread):
    agent = make_agent(seed=0, episodes_per_update=8)
    first = run_search(make_env(budget=0.5), agent, 12, show_progress=False)
    assert len(first.update_stats) == 1 and agent.episodes_in_buffer == 4  # leftover episodes carry over
    second = run_search(make_env(budget=0.3), agent, 12, show_progress=False)
    assert len(second.update_stats) == 2 and agent.num_updates == 3 and agent.episodes_in_buffer == 0
    assert np.dot(make_env().costs, second.best_keep_ratios) / make_env().costs.sum() <= 0.3 + 1e-9


# --- baselines ---


def test_uniform_policy_is_constant_and_meets_the_budget():
    env = make_env(budget=0.5)
    policy = UniformPolicy(env.uniform_keep_ratio())
    assert policy.name == "uniform"
    assert {policy.act(np.zeros(7)) for _ in range(5)} == {0.5}
    result = run_search(env, policy, 2, show_progress=False)
    assert result.best_keep_ratios == pytest.approx([0.5] * env.num_layers)
    assert result.history[0] == result.history[1]


def test_random_search_is_reproducible_by_seed_and_in_range():
    def draws(seed):
        policy = RandomSearchPolicy(0.2, 0.9, seed=seed)
        return [policy.act(None) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert all(0.2 <= d <= 0.9 for d in draws(7))
    assert RandomSearchPolicy(0.2, 0.9).name == "random_search"
    with pytest.raises(ValueError, match="action_low"):
        RandomSearchPolicy(0.9, 0.2)
