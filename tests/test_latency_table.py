import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_rlprune import RLPruneCNNConfig, RLPruneConfig, RLPruneLSTMConfig
from hf_rlprune.env import PruningEnv
from hf_rlprune.pruning import LatencyTable, get_prunable_groups
from hf_rlprune.pruning import latency_table as latency_table_module
from hf_rlprune.pruning.latency_table import grid_widths
from tests.test_env import cnn_configs, constant_accuracy, lstm_configs, run_episode

TINY_CNN = RLPruneCNNConfig(conv_channels=[8, 24], hidden_sizes=[40], image_size=8)
TINY_LSTM = RLPruneLSTMConfig(vocab_size=50, embedding_dim=24, lstm_hidden_sizes=[16, 24], hidden_sizes=[16], max_seq_length=12)


class CountingTimer:
    """Deterministic stand-in for wall-clock timing (grows with weights and activations, like a real layer);
    `noise` scatters it by a fixed pseudo-random factor per shape, so raw timings are not monotone."""

    def __init__(self, noise: float = 0.0):
        self.calls = 0
        self.noise = noise

    def __call__(self, module, inputs):
        self.calls += 1
        params = sum(p.numel() for p in module.parameters())
        activations = sum(v.numel() for v in inputs.values())
        shapes = str([tuple(p.shape) for p in module.parameters()])
        factor = 1.0 + self.noise * random.Random(shapes).uniform(-1.0, 1.0)
        return (1e-4 * params + 1e-5 * activations) * factor + 0.01


def build(config=TINY_CNN, timer=None, **kwargs):
    values = dict(runtime="onnxruntime", batch_size=4, threads=1, grid=3, timer=timer or CountingTimer(), timer_name="counting")
    return LatencyTable.build(config, **{**values, **kwargs})


def random_widths(table, rng):
    return {name: rng.randint(1, width) for name, width in table.dense_widths.items()}


# ---- cache --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY_CNN, TINY_LSTM], ids=["cnn", "lstm"])
def test_cache_round_trips(tmp_path, config):
    timer = CountingTimer()
    table = build(config, timer, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    loaded = LatencyTable.load(path, expected_key=table.key)
    again = build(config, timer, cache_dir=tmp_path)
    calls = timer.calls
    rng = random.Random(0)
    for _ in range(50):
        widths = random_widths(table, rng)
        assert loaded(widths) == table(widths) == again(widths)
    assert again.dense_ms == table.dense_ms
    assert timer.calls == calls  # loaded, not measured again
    grid_points = sum(len(layer.in_widths) * len(layer.out_widths) for layer in table.layers)
    contexts = sum(len(layer.in_widths) for layer in table.layers if layer.kind == "conv" and layer.in_group)
    assert timer.calls == 2 * (grid_points + contexts + 5)  # two passes over grid, predecessors, calibration models


@pytest.mark.parametrize(
    "change",
    [{"runtime": "torch"}, {"threads": 2}, {"batch_size": 8}, {"device_name": "cpu: some other processor"}],
    ids=lambda change: next(iter(change)),
)
def test_cache_with_another_key_is_not_used(tmp_path, monkeypatch, change):
    timer = CountingTimer()
    first = build(timer=timer, cache_dir=tmp_path)
    calls = timer.calls
    kwargs = {k: v for k, v in change.items() if k != "device_name"}
    if "device_name" in change:
        monkeypatch.setattr(latency_table_module, "device_name", lambda device="cpu": change["device_name"])
    second = build(timer=timer, cache_dir=tmp_path, **kwargs)
    assert timer.calls == 2 * calls  # measured again
    assert second.key != first.key and len(list(tmp_path.glob("*.json"))) == 2
    (first_path,) = [p for p in tmp_path.glob("*.json") if json.loads(p.read_text())["key"] == first.key]
    field = "device" if "device_name" in change else next(iter(change))
    with pytest.raises(ValueError, match=f"different {field}"):
        LatencyTable.load(first_path, expected_key=second.key)


def test_a_cache_file_whose_key_does_not_match_is_measured_again(tmp_path):
    timer = CountingTimer()
    table = build(timer=timer, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    stale = json.loads(path.read_text())
    stale["key"]["threads"] = 64  # e.g. written by another machine under the same file name
    stale["overhead_ms"] = 1e6
    path.write_text(json.dumps(stale))
    calls = timer.calls
    again = build(timer=timer, cache_dir=tmp_path)
    assert timer.calls == 2 * calls and again.dense_ms == table.dense_ms
    assert json.loads(path.read_text())["key"] == table.key  # rewritten
    path.write_text("{not json")
    assert build(timer=timer, cache_dir=tmp_path).dense_ms == table.dense_ms


def test_damaged_or_unwritable_caches_never_lose_a_measured_table(tmp_path, caplog):
    timer = CountingTimer()
    table = build(timer=timer, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    good = json.loads(path.read_text())
    short = dict(good, layers=[dict(good["layers"][0], ms=good["layers"][0]["ms"][:-1]), *good["layers"][1:]])
    for damaged in ("[]", "null", json.dumps(short)):
        path.write_text(damaged)
        assert build(timer=timer, cache_dir=tmp_path).dense_ms == table.dense_ms  # measured again, not a crash
        path.write_text(damaged)
        with pytest.raises(ValueError, match="latency table|rows of timings"):
            LatencyTable.load_for(path, TINY_CNN, "onnxruntime", 4)
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match="is not a readable latency table"):
        LatencyTable.load_for(path, TINY_CNN, "onnxruntime", 4)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    again = build(timer=timer, cache_dir=blocked / "cache")  # the cache folder cannot be made: warn, keep the table
    assert again.dense_ms == table.dense_ms and "Could not cache the latency table" in caplog.text


def test_two_unnamed_timers_never_share_a_cache_entry(tmp_path):
    fast = build(timer=lambda module, inputs: 1.0, cache_dir=tmp_path, timer_name=None)
    slow = build(timer=lambda module, inputs: 5.0, cache_dir=tmp_path, timer_name=None)
    assert slow.dense_ms > fast.dense_ms and not list(tmp_path.glob("*.json"))


def test_device_name_tells_cpu_generations_apart(monkeypatch):
    import io

    def fake_cpuinfo(text):
        monkeypatch.setattr(latency_table_module, "open", lambda path: io.StringIO(text), raising=False)

    fake_cpuinfo("processor : 0\nmodel name : AMD EPYC\nflags : fpu sse avx2 avx512f\n")
    assert latency_table_module.device_name() == "cpu: AMD EPYC [avx2 avx512f]"
    fake_cpuinfo("processor : 0\nmodel name : AMD EPYC\nflags : fpu sse avx2\n")
    assert latency_table_module.device_name() == "cpu: AMD EPYC [avx2]"
    fake_cpuinfo("processor : 0\nFeatures : fp asimd sve\n")  # ARM: no model name
    assert latency_table_module.device_name().endswith("[asimd sve]")


def test_timing_leaves_the_callers_module_as_it_was():
    from hf_rlprune.pruning.latency import time_forward

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    for runtime in ("torch", "onnxruntime"):
        time_forward(module, {"x": torch.randn(2, 4)}, runtime=runtime, warmup=0, repeats=1, threads=1)
        assert module.training and all(m.training for m in module.modules()), runtime


@pytest.mark.parametrize("config", [TINY_CNN, TINY_LSTM], ids=["cnn", "lstm"])
def test_a_deployment_table_is_used_as_measured_there(tmp_path, monkeypatch, config):
    monkeypatch.setattr(latency_table_module, "device_name", lambda device="cpu": "cpu: the deployment machine")
    deployed = build(config, CountingTimer(noise=0.3), threads=7)
    path = deployed.save(tmp_path / "deploy.json")
    monkeypatch.undo()  # back on the training host: another processor, other threads
    cfg = RLPruneConfig(budget_kind="latency", target=0.5, latency_batch_size=4, latency_table_path=str(path))
    from hf_rlprune.callback import build_latency_table

    loaded = build_latency_table(config, cfg)
    assert loaded.key == deployed.key and loaded.key["device"] == "cpu: the deployment machine" and loaded.key["threads"] == 7
    rng = random.Random(0)
    for _ in range(20):
        widths = random_widths(deployed, rng)
        assert loaded(widths) == deployed(widths)
    env = PruningEnv(config, constant_accuracy, target=0.5, budget_kind="latency", latency_fn=loaded, width_multiple=1)
    _, info = run_episode(env, [1.0] * len(env.groups))
    assert deployed(info["widths"]) <= 0.5 * deployed.dense_ms * (1 + 1e-9)  # the budget holds on the deployment's timings


def test_the_lstm_pooling_is_part_of_the_key():
    mean = RLPruneLSTMConfig(**{**TINY_LSTM.to_dict(), "pooling": "mean"})
    assert LatencyTable.cache_key(mean, batch_size=4)["structure"]["pooling"] == "mean"
    assert LatencyTable.cache_key(mean, batch_size=4) != LatencyTable.cache_key(TINY_LSTM, batch_size=4)
    table = build(mean)
    assert 0 < table({name: 1 for name in table.dense_widths}) < table.dense_ms


def test_a_deployment_table_for_another_workload_is_refused(tmp_path):
    path = build(TINY_CNN).save(tmp_path / "deploy.json")
    with pytest.raises(ValueError, match="batch_size"):
        LatencyTable.load_for(path, TINY_CNN, "onnxruntime", batch_size=128)
    with pytest.raises(ValueError, match="runtime"):
        LatencyTable.load_for(path, TINY_CNN, "torch", batch_size=4)
    wider = RLPruneCNNConfig(conv_channels=[8, 32], hidden_sizes=[40], image_size=8)
    with pytest.raises(ValueError, match="structure"):
        LatencyTable.load_for(path, wider, "onnxruntime", batch_size=4)
    lstm_path = build(TINY_LSTM).save(tmp_path / "lstm.json")
    longer = RLPruneLSTMConfig(**{**TINY_LSTM.to_dict(), "max_seq_length": 24})
    with pytest.raises(ValueError, match="seq_len"):
        LatencyTable.load_for(lstm_path, longer, "onnxruntime", batch_size=4)
    with pytest.raises(ValueError, match="does not exist.*--save_tables"):
        LatencyTable.load_for(tmp_path / "missing.json", TINY_CNN, "onnxruntime", batch_size=4)
    (tmp_path / "corrupt.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="not a readable latency table"):
        LatencyTable.load_for(tmp_path / "corrupt.json", TINY_CNN, "onnxruntime", batch_size=4)
    with pytest.raises(ValueError, match="only read for a latency budget"):
        RLPruneConfig(target=0.5, latency_table_path=str(path))


# ---- the estimate -------------------------------------------------------------------------------------------------

NOISY_TABLES = {"cnn": build(TINY_CNN, CountingTimer(noise=0.4), grid=4), "lstm": build(TINY_LSTM, CountingTimer(noise=0.4), grid=4)}


@settings(max_examples=80, deadline=None)
@given(which=st.sampled_from(sorted(NOISY_TABLES)), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_estimate_is_monotone_in_every_width(which, seed, data):
    table = NOISY_TABLES[which]  # raw timings scattered by +-40%: monotone only because the table makes it so
    widths = random_widths(table, random.Random(seed))
    name = data.draw(st.sampled_from(sorted(widths)))
    wider = dict(widths, **{name: data.draw(st.integers(widths[name], table.dense_widths[name]))})
    assert table(wider) >= table(widths) > 0
    assert table(table.dense_widths) == table.dense_ms == table({})


def test_grid_is_multiples_of_eight_ending_at_the_dense_width():
    assert grid_widths(64, 4) == [8, 24, 48, 64]
    assert grid_widths(100, 4)[-1] == 100 and all(w % 8 == 0 for w in grid_widths(100, 4)[:-1])
    assert grid_widths(6, 4) == [1, 6]
    table = build(grid={"conv_blocks.1": [8, 16, 24]})
    assert table.layers[1].out_widths == [8, 16, 24]
    with pytest.raises(ValueError, match="end at the dense width"):
        build(grid={"conv_blocks.1": [8, 16]})
    with pytest.raises(KeyError, match="unknown group"):
        build(grid={"conv_blocks.7": [8]})


def test_interpolation_is_exact_for_cost_bilinear_in_widths():
    def macs_like(module, inputs):  # in x out, like a layer's MACs
        return 1e-3 * sum(p.numel() for p in module.parameters() if p.dim() > 1)

    table = build(timer=macs_like, grid=2)
    rng = random.Random(1)
    for _ in range(20):
        c0, c1, hidden = (rng.randint(8, w) for w in table.dense_widths.values())  # at or above the first grid point
        macs = 3 * c0 * 9 + c0 * c1 * 9 + c1 * 4 * 4 * hidden + hidden * 10
        assert table.layers_ms({"conv_blocks.0": c0, "conv_blocks.1": c1, "hidden_layers.0": hidden}) == pytest.approx(1e-3 * macs)


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="runtime"):
        build(runtime="tensorrt")
    with pytest.raises(ValueError, match="batch_size"):
        build(batch_size=0)
    with pytest.raises(ValueError, match="runtime='torch'"):
        build(device="cuda")
    with pytest.raises(ValueError, match="grid"):
        build(grid=1)
    with pytest.raises(KeyError, match="Unknown prunable group"):
        build()({"conv_blocks.9": 3})
    with pytest.raises(TypeError, match="cannot estimate the latency of a object"):
        LatencyTable.build(object())


def test_interference_is_measured_away():
    from torch import nn

    from hf_rlprune.pruning.latency_table import _time_jobs

    # scripted timings per module: interference only adds time, so the lowest of passes that agree counts
    timings = {"steady": [5.0, 5.1], "burst_in_one_pass": [9.0, 5.0, 5.1], "burst_in_two_passes": [9.0, 8.0, 5.0, 5.0]}
    calls = []

    def job(name):
        module = nn.Identity()
        module.tag = name
        return lambda: (module, {})

    def timer(module, inputs):
        calls.append(module.tag)
        return timings[module.tag][calls.count(module.tag) - 1]

    assert _time_jobs({name: job(name) for name in timings}, timer, passes=2) == dict.fromkeys(timings, 5.0)
    assert [calls.count(name) for name in timings] == [2, 3, 4]


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_real_measurement_on_a_tiny_model(tmp_path, runtime):
    # timings are not compared with numbers (they vary); only their shape is checked
    for config in (TINY_CNN, TINY_LSTM):
        table = LatencyTable.build(config, runtime=runtime, batch_size=2, threads=1, grid=2, warmup=0, repeats=1, passes=1, cache_dir=tmp_path)
        assert table.dense_ms > 0 and len(table.calibration) == 5
        smallest = {name: 1 for name in table.dense_widths}
        assert table(smallest) <= table.dense_ms
        assert LatencyTable.load(next(tmp_path.glob(f"*{config.model_type}-{runtime}*.json")), expected_key=table.key).dense_ms == table.dense_ms


# ---- the budget ---------------------------------------------------------------------------------------------------


def tiled_latency(config):
    """Synthetic monotone latency with hardware steps: layers cost by 8-wide tiles of (in, out) plus a constant."""
    groups = get_prunable_groups(config)

    def latency_fn(widths):
        tiles = [math.ceil(widths.get(g.name, g.width) / 8) for g in groups]
        return 0.05 + 0.01 * sum(a * b for a, b in zip([1] + tiles[:-1], tiles)) + 0.001 * sum(widths.values())

    return latency_fn


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.one_of(cnn_configs, lstm_configs),
    target=st.floats(0.02, 1.0),
    model=st.sampled_from(["tiled", "table"]),
    fill=st.booleans(),
    multiple=st.sampled_from([1, 8, 16]),
    data=st.data(),
)
def test_latency_budget_is_met_by_construction_with_snapping(config, target, model, fill, multiple, data):
    latency_fn = tiled_latency(config) if model == "tiled" else build(config, CountingTimer(noise=0.3), grid=3)
    try:
        env = PruningEnv(config, constant_accuracy, target=target, budget_kind="latency", latency_fn=latency_fn,
                         fill_budget=fill, width_multiple=multiple)
    except ValueError as error:
        assert "cannot be met" in str(error)
        return
    actions = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(env.groups), max_size=len(env.groups)))
    _, info = run_episode(env, actions)
    dense = latency_fn({g.name: g.width for g in env.groups})
    assert latency_fn(info["widths"]) <= target * dense * (1 + 1e-9)
    assert info["latency_ms"] == latency_fn(info["widths"]) and info["cost_ratio"] <= target * (1 + 1e-9)
    for group, width in zip(env.groups, info["widths"].values()):
        assert 1 <= width <= group.width
        if multiple > 1 and group.width > multiple and width != group.width:
            assert width % multiple == 0
    uniform = env.uniform_keep_ratio()
    _, info = run_episode(env, [uniform] * len(env.groups))
    assert latency_fn(info["widths"]) <= target * dense * (1 + 1e-9)


def test_latency_rewards():
    config = RLPruneCNNConfig()
    table = build(config, grid=2)
    rewards = {}
    for mode, cost in [("trade_off", "latency"), ("trade_off", "macs"), ("amc", "latency"), ("amc", None)]:
        env = PruningEnv(config, lambda widths: 0.8, target=0.5, budget_kind="macs", reward_mode=mode, reward_cost=cost, latency_fn=table)
        rewards[mode, cost], info = run_episode(env, [0.5, 0.5, 0.5])
    latency_ratio = info["latency_ms"] / table.dense_ms
    assert rewards["trade_off", "latency"] == pytest.approx(0.8 / latency_ratio)
    assert rewards["trade_off", "macs"] == pytest.approx(0.8 / info["macs_ratio"])
    assert rewards["amc", "latency"] == pytest.approx(-0.2 * np.log(1e3 * info["latency_ms"]))
    assert rewards["amc", None] == pytest.approx(-0.2 * np.log(2 * info["macs"]))
    with pytest.raises(ValueError, match="reward_cost='latency' needs latency_fn"):
        PruningEnv(config, constant_accuracy, reward_mode="trade_off", reward_cost="latency")
    with pytest.raises(ValueError, match="reward_cost"):
        PruningEnv(config, constant_accuracy, reward_mode="trade_off", reward_cost="energy")


# ---- configuration and callback -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(budget_kind="latency", target=0.5, target_latency_ms=10.0), "not both"),
        (dict(target_latency_ms=10.0), "budget_kind='latency'"),
        (dict(budget_kind="latency", target_latency_ms=0.0), "target_latency_ms = 0.0 must be > 0"),
        (dict(budget_kind="latency", target=1.5), "target = 1.5"),
        (dict(reward_cost="latency"), "only weighs the trade_off and amc"),
        (dict(reward_mode="trade_off", reward_cost="energy"), "reward_cost = 'energy' is unknown"),
        (dict(latency_runtime="tensorrt"), "latency_runtime = 'tensorrt' is unknown"),
        (dict(latency_batch_size=0), "latency_batch_size = 0"),
        (dict(latency_device="tpu"), "latency_device = 'tpu' is unknown"),
        (dict(latency_device="cuda"), "needs latency_runtime='torch'"),
        (dict(latency_threads=0), "latency_threads = 0"),
        (dict(budget_kind="latency", width_multiple=0), "width_multiple = 0"),
    ],
)
def test_config_validation(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RLPruneConfig(**values)


def test_config_defaults_and_latency_target():
    assert RLPruneConfig().target == 0.5 and RLPruneConfig().width_multiple == 1
    assert RLPruneConfig(budget_kind="latency").width_multiple == 8  # hardware-friendly widths for latency budgets
    assert RLPruneConfig(budget_kind="latency", width_multiple=1).width_multiple == 1
    config = RLPruneConfig(budget_kind="latency", target_latency_ms=30.0)
    assert config.target is None and config.uses_latency
    with pytest.raises(ValueError, match="resolve_target_latency"):
        config.round_targets()
    assert config.resolve_target_latency(120.0) == pytest.approx(0.25)
    assert config.round_targets(config.resolve_target_latency(120.0))[-1] == pytest.approx(0.25)
    assert config.target is None and dataclasses.replace(config, prune_seed=1).target_latency_ms == 30.0  # left as given
    with pytest.raises(ValueError, match="not below the dense model's estimated latency"):
        config.resolve_target_latency(20.0)
    assert RLPruneConfig(reward_mode="trade_off", reward_cost="latency").uses_latency


def test_callback_builds_the_table_once_and_prunes_to_milliseconds(tmp_path, monkeypatch):
    # the Trainer-driven path is covered by tests/test_callback.py; here: the table, the budget and the env wiring
    from types import SimpleNamespace

    from hf_rlprune import RLPruneCallback, RLPruneCNNForImageClassification

    timer = CountingTimer()
    real_build = LatencyTable.build.__func__
    monkeypatch.setattr(LatencyTable, "build", classmethod(lambda cls, *a, **k: real_build(cls, *a, **{**k, "timer": timer, "timer_name": "counting"})))
    dense_ms = LatencyTable.build(TINY_CNN, batch_size=16, threads=2, cache_dir=tmp_path).dense_ms
    config = RLPruneConfig(budget_kind="latency", target_latency_ms=0.4 * dense_ms, latency_batch_size=16, latency_threads=2,
                           latency_cache_dir=str(tmp_path), reward_mode="trade_off", reward_cost="latency")
    callback = RLPruneCallback(config, reward_dataset=[0])
    callback.dense_config, callback._evaluator = TINY_CNN, constant_accuracy
    calls = timer.calls
    callback._build_latency_table(SimpleNamespace(is_world_process_zero=True))
    assert timer.calls == calls and list(tmp_path.glob("*.json"))  # same key: loaded from the cache
    assert callback._target == pytest.approx(0.4) and config.target is None  # resolved for the run, the config left as given
    env = callback._make_env(RLPruneCNNForImageClassification(TINY_CNN), callback._target)
    assert env.latency_fn is callback.latency_table and env.width_multiple == 8 and env.reward_cost == "latency"
    reward, info = run_episode(env, [env.uniform_keep_ratio()] * len(env.groups))
    assert info["latency_ms"] <= 0.4 * dense_ms * (1 + 1e-9) and reward == pytest.approx(0.5 / info["cost_ratio"])
    assert all(width % 8 == 0 for width in info["widths"].values())
    impossible = RLPruneConfig(budget_kind="latency", target_latency_ms=0.01 * dense_ms, latency_batch_size=16, latency_threads=2,
                               latency_cache_dir=str(tmp_path))
    callback = RLPruneCallback(impossible, reward_dataset=[0])
    callback.dense_config = TINY_CNN
    with pytest.raises(ValueError, match="target_latency_ms = .* is 0.010 x the dense model's estimated .* cannot be met"):
        callback._build_latency_table(SimpleNamespace(is_world_process_zero=True))  # at train begin, before any round
