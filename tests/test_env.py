import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig
from hf_rlprune.env import OBSERVATION_FEATURES, PruningEnv, PruningVectorEnv
from hf_rlprune.pruning import apply_masks, compute_macs, count_parameters, masks_from_widths


def constant_accuracy(widths):
    return 0.5


def run_episode(env, actions):
    obs, _ = env.reset(seed=0)
    for step, action in enumerate(actions):
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(np.array([action], dtype=np.float32))
        assert terminated == (step == len(actions) - 1) and not truncated
    return reward, info


cnn_configs = st.builds(
    lambda convs, hidden, bn: RLPruneCNNConfig(conv_channels=convs, hidden_sizes=hidden, use_batch_norm=bn, image_size=16, pool_after=[len(convs) - 1]),
    st.lists(st.integers(1, 48), min_size=1, max_size=4),
    st.lists(st.integers(1, 96), min_size=0, max_size=2),
    st.booleans(),
)
lstm_configs = st.builds(
    lambda emb, hidden, dense: RLPruneLSTMConfig(vocab_size=50, embedding_dim=emb, lstm_hidden_sizes=hidden, hidden_sizes=dense, max_seq_length=20),
    st.integers(1, 64),
    st.lists(st.integers(1, 64), min_size=1, max_size=2),
    st.lists(st.integers(1, 32), min_size=0, max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.one_of(cnn_configs, lstm_configs),
    target=st.floats(0.02, 1.0),
    budget_kind=st.sampled_from(["macs", "params"]),
    fill=st.booleans(),
    multiple=st.sampled_from([1, 8]),
    data=st.data(),
)
def test_no_finished_episode_exceeds_the_budget(config, target, budget_kind, fill, multiple, data):
    try:
        env = PruningEnv(config, constant_accuracy, target=target, budget_kind=budget_kind, fill_budget=fill, width_multiple=multiple, min_keep=0.05)
    except ValueError as error:
        assert "cannot be met" in str(error)
        return
    actions = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(env.groups), max_size=len(env.groups)))
    _, info = run_episode(env, actions)
    cost = compute_macs(config, widths=info["widths"]) if budget_kind == "macs" else count_parameters(config, widths=info["widths"])
    dense = compute_macs(config) if budget_kind == "macs" else count_parameters(config)
    assert cost <= target * dense * (1 + 1e-9)
    for group, width in zip(env.groups, info["widths"].values()):
        assert 1 <= width <= group.width
        if multiple > 1 and group.width > multiple and width != group.width:
            assert width % multiple == 0
        if fill and multiple == 1 and width < group.width:  # the fill is maximal: one more unit anywhere breaks the budget
            grown = dict(info["widths"], **{group.name: width + 1})
            grown_cost = compute_macs(config, widths=grown) if budget_kind == "macs" else count_parameters(config, widths=grown)
            assert grown_cost > target * dense * (1 + 1e-9), (group.name, info["widths"])


def one_step_top_up(env, filled, shares, fits):
    """The fill's top-up as first written, one step per budget check: the definition `_top_up` computes in runs."""
    filled = list(filled)
    while True:
        for idx in sorted(range(len(filled)), key=lambda idx: filled[idx] / shares[idx]):
            grown = list(filled)
            grown[idx] = min(env._snap(filled[idx] + env.width_multiple, idx), env.max_widths[idx])
            if grown[idx] > filled[idx] and fits(grown):
                filled = grown
                break
        else:
            return filled


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.one_of(cnn_configs, lstm_configs), target=st.floats(0.05, 1.0), multiple=st.sampled_from([1, 4, 8]), data=st.data())
def test_top_up_in_runs_equals_one_step_at_a_time(config, target, multiple, data):
    try:
        env = PruningEnv(config, constant_accuracy, target=target, fill_budget=False, width_multiple=multiple, min_keep=0.05)
    except ValueError:
        return
    _, info = run_episode(env, data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(env.groups), max_size=len(env.groups))))
    start = list(info["widths"].values())
    shares = data.draw(st.lists(st.floats(0.5, 500.0), min_size=len(start), max_size=len(start)))  # ties included
    shares = [float(max(1, round(share))) for share in shares] if data.draw(st.booleans()) else shares

    def fits(widths):
        return env.cost(widths) <= env.budget * (1 + 1e-9)

    assert env._top_up(start, shares, fits) == one_step_top_up(env, start, shares, fits)


def test_top_up_checks_the_budget_per_run_not_per_unit():
    # a wide, cheap dense layer left far below its cap: one-step growth would check the budget once per unit
    config = RLPruneCNNConfig(conv_channels=[8, 8], hidden_sizes=[2048], image_size=8)
    env = PruningEnv(config, constant_accuracy, target=0.9, fill_budget=False)
    start, calls = [8, 8, 16], []

    def fits(widths):
        calls.append(widths)
        return env.cost(widths) <= env.budget * (1 + 1e-9)

    grown = env._top_up(start, [8.0, 8.0, 16.0], fits)
    assert grown[2] > 1000 and len(calls) < 50
    calls.clear()
    assert one_step_top_up(env, start, [8.0, 8.0, 16.0], fits) == grown and len(calls) > 1000


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be met.*Raise the target or lower min_keep"):
        PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=0.01, min_keep=0.5)
    # a latency whose fixed part alone is over budget: lowering min_keep cannot help, so it is not suggested
    with pytest.raises(ValueError, match=r"Raise the target: even one unit per group costs 0\.9\d\d x dense\.$"):
        PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=0.5, budget_kind="latency",
                   latency_fn=lambda widths: 10.0 + 0.001 * sum(widths.values()))
    # the minimum is one multiple of width_multiple per group: it is that which cannot fit, not min_keep
    small = RLPruneCNNConfig(num_channels=1, image_size=7, padding="valid", kernel_size=1, conv_channels=[6, 5], pool_after=[0, 1],
                             use_batch_norm=True, hidden_sizes=[], num_labels=2)
    with pytest.raises(ValueError, match="width_multiple=4 rounds each group's minimum up to a multiple of 4: lower width_multiple"):
        PruningEnv(small, constant_accuracy, target=0.3, budget_kind="params", width_multiple=4)
    PruningEnv(small, constant_accuracy, target=0.3, budget_kind="params", width_multiple=1)  # as the message says
    with pytest.raises(ValueError, match="target"):
        PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=1.5)
    with pytest.raises(ValueError, match="budget_kind"):
        PruningEnv(RLPruneCNNConfig(), constant_accuracy, budget_kind="energy")
    with pytest.raises(ValueError, match="latency_fn"):
        PruningEnv(RLPruneCNNConfig(), constant_accuracy, budget_kind="latency")


def test_fill_budget_uses_the_budget_and_keeps_proportions_roughly():
    config = RLPruneCNNConfig()
    env = PruningEnv(config, constant_accuracy, target=0.5)
    _, info = run_episode(env, [0.1, 0.1, 0.1])
    assert 0.45 < info["macs_ratio"] <= 0.5
    env_raw = PruningEnv(config, constant_accuracy, target=0.5, fill_budget=False)
    _, raw = run_episode(env_raw, [0.1, 0.1, 0.1])
    assert raw["macs_ratio"] < 0.05
    # a budget of the whole model leaves it whole, whatever the actions
    _, info = run_episode(PruningEnv(config, constant_accuracy, target=1.0), [0.5, 0.5, 0.5])
    assert list(info["widths"].values()) == [32, 64, 512]


def test_fill_tops_up_snapped_widths_until_no_multiple_fits():
    # 50% of the MACs in multiples of 8: the common scale alone stops where the next step of one group overshoots.
    config = RLPruneCNNConfig()
    for actions in ([1.0, 0.5, 0.2], [0.3, 0.9, 0.1], [0.1, 0.1, 0.1]):
        env = PruningEnv(config, constant_accuracy, target=0.5, width_multiple=8)
        _, info = run_episode(env, actions)
        widths = list(info["widths"].values())
        assert compute_macs(config, widths=info["widths"]) <= 0.5 * compute_macs(config)
        for idx, group in enumerate(env.groups):  # maximal: one more multiple in any group breaks the budget
            if widths[idx] < group.width:
                grown = dict(info["widths"], **{group.name: min(widths[idx] + 8, group.width)})
                assert compute_macs(config, widths=grown) > 0.5 * compute_macs(config), (actions, group.name, widths)


def test_keeping_a_whole_group_is_not_snapped_down_to_a_multiple():
    # widths 10/20/30 are no multiples of 8: keep ratio 1.0 keeps them whole, with or without the fill
    config = RLPruneCNNConfig(image_size=8, conv_channels=[10, 20], hidden_sizes=[30])
    for fill in (False, True):
        _, info = run_episode(PruningEnv(config, constant_accuracy, target=1.0, width_multiple=8, fill_budget=fill), [1.0, 1.0, 1.0])
        assert list(info["widths"].values()) == [10, 20, 30], fill


def test_budget_wall_never_snaps_below_min_keep_or_under_a_cap_that_fits():
    # dense widths 23/22/22, capped (max_keep) at 23/22/10, min_keep 0.5: minimum widths 12/11/11 -> 12/12/10 after caps
    config = RLPruneCNNConfig(image_size=8, conv_channels=[23, 22], hidden_sizes=[22])
    env = PruningEnv(config, constant_accuracy, target=0.868, min_keep=0.5, width_multiple=4, fill_budget=False,
                     max_keep=[1.0, 1.0, 10 / 22])
    _, info = run_episode(env, [1.0, 1.0, 1.0])
    widths = list(info["widths"].values())
    assert all(width >= minimum for width, minimum in zip(widths, env.min_widths)), (widths, env.min_widths)
    assert widths[2] == 10  # the cap fits the budget: it is kept, not snapped down to 8
    assert info["macs_ratio"] <= 0.868


def test_budget_wall_clips_greedy_early_layers():
    env = PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=0.25, fill_budget=False)
    _, info = run_episode(env, [1.0, 1.0, 1.0])
    assert info["macs_ratio"] <= 0.25
    assert info["widths"]["conv_blocks.0"] == 32  # the first layer could stay whole; later ones pay for it


def test_uniform_keep_ratio_meets_the_budget():
    for target in (0.5, 0.25):
        env = PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=target, fill_budget=False)
        ratio = env.uniform_keep_ratio()
        _, info = run_episode(env, [ratio] * 3)
        assert info["macs_ratio"] <= target
        assert info["macs_ratio"] > target - 0.03
        assert max(info["keep_ratios"]) - min(info["keep_ratios"]) < 0.03


def test_reward_modes():
    def accuracy(widths):
        return 0.8

    config = RLPruneCNNConfig()
    rewards = {}
    for mode in ("budget_accuracy", "trade_off", "amc"):
        env = PruningEnv(config, accuracy, target=0.5, reward_mode=mode)
        rewards[mode], info = run_episode(env, [0.5, 0.5, 0.5])
    assert rewards["budget_accuracy"] == pytest.approx(0.8)
    assert rewards["trade_off"] == pytest.approx(0.8 / info["macs_ratio"])
    assert rewards["amc"] == pytest.approx(-0.2 * np.log(2 * info["macs"]))
    with pytest.raises(ValueError, match="reward_mode"):
        PruningEnv(config, accuracy, reward_mode="speed")


def test_observations_are_normalized_and_describe_the_group():
    env = PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=0.5)
    obs, _ = env.reset()
    features = dict(zip(OBSERVATION_FEATURES, obs))
    assert features["is_conv"] == 1.0 and features["index"] == 0.0 and features["previous_action"] == 1.0
    assert features["budget"] == 0.5 and features["max_keep"] == 1.0 and features["cost_removed"] == 0.0
    # what cutting every group to its minimum would remove
    assert features["cost_ahead"] == pytest.approx(1 - env.cost(env.min_widths) / env.dense_cost, abs=1e-6)
    obs, *_ = env.step(np.array([0.3]))
    features = dict(zip(OBSERVATION_FEATURES, obs))
    assert features["index"] == 0.5 and features["previous_action"] == pytest.approx(0.3)
    first_width = env._widths[0]
    assert features["cost_removed"] == pytest.approx(1 - env.cost([first_width] + env.dense_widths[1:]) / env.dense_cost, abs=1e-6)
    assert env.observation_space.shape == (len(OBSERVATION_FEATURES),)
    # a group earlier rounds cut to half is capped there, and the agent sees the cap
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[8, 16], hidden_sizes=[32], image_size=8))
    apply_masks(model, masks_from_widths(model, {"conv_blocks.0": 4}))
    obs, _ = PruningEnv(model, constant_accuracy, target=0.25).reset()
    assert dict(zip(OBSERVATION_FEATURES, obs))["max_keep"] == 0.5 and dict(zip(OBSERVATION_FEATURES, obs))["budget"] == 0.25


def test_masks_on_the_model_cap_each_group():
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[8, 16], hidden_sizes=[32], image_size=8))
    apply_masks(model, masks_from_widths(model, {"conv_blocks.0": 4, "conv_blocks.1": 16, "hidden_layers.0": 8}))
    env = PruningEnv(model, constant_accuracy, target=0.6)
    _, info = run_episode(env, [1.0, 1.0, 1.0])
    assert info["widths"]["conv_blocks.0"] <= 4 and info["widths"]["hidden_layers.0"] <= 8


def test_step_after_the_end_is_an_error():
    env = PruningEnv(RLPruneCNNConfig(), constant_accuracy, target=0.5)
    run_episode(env, [0.5, 0.5, 0.5])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5]))


def test_vector_env_evaluates_lockstep_episodes_in_one_batch():
    config = RLPruneCNNConfig()
    calls = []

    def batch_accuracy(allocations):
        calls.append(len(allocations))
        return [widths["conv_blocks.0"] / 1000 for widths in allocations]

    actions = np.array([[0.2, 0.9, 0.5], [0.6, 0.3, 0.5], [1.0, 1.0, 1.0]], dtype=np.float32)  # (K, steps)
    vector_env = PruningVectorEnv([PruningEnv(config, constant_accuracy, target=0.4) for _ in range(3)], batch_accuracy)
    obs, _ = vector_env.reset(seed=0)
    assert obs.shape == (3, len(OBSERVATION_FEATURES)) and vector_env.observation_space.contains(obs)
    for step in range(3):
        obs, rewards, terminated, truncated, infos = vector_env.step(actions[:, step : step + 1])
        assert terminated.tolist() == [step == 2] * 3 and not truncated.any()
    assert calls == [3]  # one batch for the three allocations
    for index in range(3):  # each episode as a PruningEnv alone would have run it
        _, single = run_episode(PruningEnv(config, constant_accuracy, target=0.4), actions[index])
        assert {name: int(values[index]) for name, values in infos["widths"].items() if not name.startswith("_")} == single["widths"]
        assert rewards[index] == pytest.approx(single["widths"]["conv_blocks.0"] / 1000)
        assert infos["cost_ratio"][index] <= 0.4 + 1e-9


def test_vector_env_rejects_a_wrong_number_of_accuracies():
    vector_env = PruningVectorEnv([PruningEnv(RLPruneCNNConfig(), constant_accuracy) for _ in range(2)], lambda allocations: [0.5])
    vector_env.reset()
    for _ in range(2):
        vector_env.step(np.full((2, 1), 0.5))
    with pytest.raises(ValueError, match="2 allocations"):
        vector_env.step(np.full((2, 1), 0.5))


def test_vector_env_refuses_shared_envs_and_wrong_action_counts():
    env = PruningEnv(RLPruneCNNConfig(), constant_accuracy)
    with pytest.raises(ValueError, match="distinct"):
        PruningVectorEnv([env, env])
    vector_env = PruningVectorEnv([env, PruningEnv(RLPruneCNNConfig(), constant_accuracy)])
    vector_env.reset()
    with pytest.raises(ValueError, match="4 actions for 2"):
        vector_env.step(np.full((2, 2), 0.5))


def test_the_cost_cache_stays_bounded_and_correct(monkeypatch):
    monkeypatch.setattr("hf_rlprune.env.MAX_CACHED_COSTS", 5)
    config = RLPruneCNNConfig()
    env = PruningEnv(config, constant_accuracy, target=0.5)
    for width in range(1, 20):  # 19 allocations through a cache of 5
        widths = [width, 2 * width, 16 * width]
        assert env.cost(widths) == compute_macs(config, widths=env.widths_dict(widths))
        assert len(env._costs) <= 5
