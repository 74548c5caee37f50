import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification, BertConfig

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.pruning import (
    TaylorAccumulator,
    apply_masks,
    compact,
    compute_flops,
    compute_macs,
    count_parameters,
    enforce_masks,
    export_onnx,
    get_masks,
    get_prunable_groups,
    masked_widths,
    masks_from_widths,
    measure_latency,
    pruning_ratios,
    trade_off_score,
    unit_scores,
    widths_from_keep_ratios,
)

CNN_CONFIGS = {
    "reference_tiny": dict(conv_channels=[6, 8], hidden_sizes=[10], image_size=8),
    "batch_norm_deep": dict(conv_channels=[4, 6, 8, 5], pool_after=[1, 3], use_batch_norm=True, hidden_sizes=[7, 6], image_size=8),
    "valid_no_hidden": dict(conv_channels=[5, 7], padding="valid", pool_after=[0], hidden_sizes=[], image_size=9),
}


def make_cnn(name="reference_tiny", seed=0):
    torch.manual_seed(seed)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(**CNN_CONFIGS[name]))
    for module in model.modules():  # non-trivial batch-norm statistics so eval mode exercises them
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def make_lstm(seed=0, **overrides):
    torch.manual_seed(seed)
    config = RLPruneLSTMConfig(**{"vocab_size": 40, "embedding_dim": 9, "lstm_hidden_sizes": [7, 5], "hidden_sizes": [6], "max_seq_length": 12, **overrides})
    return RLPruneLSTMForSequenceClassification(config).eval()


def cnn_inputs(model, batch=3):
    size = model.config.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))}


def lstm_inputs(batch=4, length=11):
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, 40, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def random_masks(model, generator, mode="random"):
    masks = {}
    for group in get_prunable_groups(model):
        if mode == "one":
            keep = torch.zeros(group.width, dtype=torch.bool)
            keep[torch.randint(group.width, (1,), generator=generator)] = True
        elif mode == "all":
            keep = torch.ones(group.width, dtype=torch.bool)
        else:
            keep = torch.rand(group.width, generator=generator) < 0.5
            keep[torch.randint(group.width, (1,), generator=generator)] = True
        masks[group.name] = keep
    return masks


def test_default_cnn_has_the_documented_macs():
    config = RLPruneCNNConfig()
    assert compute_macs(config) == 28_152_832
    assert compute_flops(config) == 2 * 28_152_832
    model = RLPruneCNNForImageClassification(config)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_groups_describe_the_models():
    cnn = make_cnn("batch_norm_deep")
    assert [(g.name, g.kind, g.width) for g in get_prunable_groups(cnn)] == [
        ("conv_blocks.0", "conv", 4), ("conv_blocks.1", "conv", 6), ("conv_blocks.2", "conv", 8),
        ("conv_blocks.3", "conv", 5), ("hidden_layers.0", "dense", 7), ("hidden_layers.1", "dense", 6),
    ]  # fmt: skip
    lstm = make_lstm()
    assert [(g.name, g.kind, g.width) for g in get_prunable_groups(lstm)] == [
        ("embeddings", "embedding", 9), ("lstm_layers.0", "lstm", 7), ("lstm_layers.1", "lstm", 5), ("hidden_layers.0", "dense", 6),
    ]  # fmt: skip
    assert all("classifier" not in g.name for g in get_prunable_groups(lstm))


@pytest.mark.parametrize("name", list(CNN_CONFIGS))
@pytest.mark.parametrize("mode", ["random", "one", "all"])
def test_compact_cnn_matches_masked_model(name, mode):
    generator = torch.Generator().manual_seed(11)
    for trial in range(3):
        model = make_cnn(name, seed=trial)
        masks = random_masks(model, generator, mode)
        apply_masks(model, masks)
        inputs = cnn_inputs(model)
        small = compact(model)
        assert small.config.conv_channels == [int(masks[f"conv_blocks.{i}"].sum()) for i in range(len(small.config.conv_channels))]
        assert torch.allclose(model(**inputs).logits, small(**inputs).logits, atol=1e-5)
        assert sum(p.numel() for p in small.parameters()) == count_parameters(model) == count_parameters(small)
        assert compute_macs(model) == compute_macs(small)
        assert not get_masks(small)


@pytest.mark.parametrize("mode", ["random", "one", "all"])
def test_compact_lstm_matches_masked_model(mode):
    generator = torch.Generator().manual_seed(3)
    for trial in range(3):
        model = make_lstm(seed=trial)
        masks = random_masks(model, generator, mode)
        apply_masks(model, masks)
        inputs = lstm_inputs()
        small = compact(model)
        assert small.config.embedding_dim == int(masks["embeddings"].sum())
        assert small.config.lstm_hidden_sizes == [int(masks[f"lstm_layers.{i}"].sum()) for i in range(2)]
        assert torch.allclose(model(**inputs).logits, small(**inputs).logits, atol=1e-5)
        assert sum(p.numel() for p in small.parameters()) == count_parameters(small) == count_parameters(model)


def test_masked_units_output_exact_zero():
    model = make_cnn("batch_norm_deep")
    masks = random_masks(model, torch.Generator().manual_seed(0))
    apply_masks(model, masks)
    captured = {}
    for idx, block in enumerate(model.conv_blocks):
        block.register_forward_hook(lambda mod, inp, out, idx=idx: captured.__setitem__(idx, out))
    model.train()(**cnn_inputs(model))
    for idx in range(4):
        dropped = ~masks[f"conv_blocks.{idx}"]
        assert torch.all(captured[idx][:, dropped] == 0)


@pytest.mark.parametrize("make", [lambda: make_cnn("batch_norm_deep"), make_lstm])
def test_training_never_revives_masked_units(make):
    model = make().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = cnn_inputs(model, 8) if isinstance(model, RLPruneCNNForImageClassification) else lstm_inputs(8)
    labels = torch.randint(0, 2, (8,))
    for _ in range(3):  # Adam moments for every weight before masking
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    masks = random_masks(model, torch.Generator().manual_seed(1))
    apply_masks(model, masks)
    enforce_masks(model, optimizer)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(5):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    small_before = compact(model)
    for group in get_prunable_groups(model):
        dropped = torch.nonzero(~masks[group.name]).flatten()
        for slice_ in group.producers:
            tensor = dict(model.named_parameters()).get(slice_.name)
            if tensor is None:
                continue
            assert torch.all(tensor.index_select(slice_.dim, slice_.indices(dropped)) == 0), slice_.name
            for value in optimizer.state[tensor].values():
                if torch.is_tensor(value) and value.shape == tensor.shape:
                    assert torch.all(value.index_select(slice_.dim, slice_.indices(dropped)) == 0)
    assert any(not torch.equal(p, reference[n]) for n, p in model.named_parameters())  # live units did train
    model.eval()
    small_before.eval()
    assert torch.allclose(model(**inputs).logits, small_before(**inputs).logits, atol=1e-5)


def test_compacted_model_saves_and_loads_with_new_widths(tmp_path):
    model = make_cnn("batch_norm_deep")
    apply_masks(model, masks_from_widths(model, widths_from_keep_ratios(model, [0.5] * 6)))
    small = compact(model)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.conv_channels == [2, 3, 4, 2] and loaded.config.hidden_sizes == [4, 3]
    inputs = cnn_inputs(model)
    assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5)


def test_cnn_macs_match_torch_flop_counter():
    for name in CNN_CONFIGS:
        model = make_cnn(name)
        apply_masks(model, random_masks(model, torch.Generator().manual_seed(2)))
        small = compact(model)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            small(**cnn_inputs(small, batch=1))
        assert counter.get_total_flops() == compute_flops(model) == 2 * compute_macs(small)


def _unrolled_lstm_logits(model, input_ids):
    """The LSTM model written with explicit per-step matmuls, so FlopCounterMode sees every multiply-add."""
    hidden = model.embeddings(input_ids)  # (1, T, E)
    for lstm in model.lstm_layers:
        h = torch.zeros(1, lstm.hidden_size)
        c = torch.zeros(1, lstm.hidden_size)
        outputs = []
        for t in range(hidden.shape[1]):
            gates = nn.functional.linear(hidden[:, t], lstm.weight_ih_l0) + nn.functional.linear(h, lstm.weight_hh_l0)
            gates = gates + lstm.bias_ih_l0 + lstm.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        hidden = torch.stack(outputs, dim=1)  # (1, T, H)
    hidden = hidden[:, -1]
    for layer in model.hidden_layers:
        hidden = torch.relu(layer(hidden))
    return model.classifier(hidden)


def test_lstm_macs_match_torch_flop_counter():
    model = make_lstm()
    apply_masks(model, random_masks(model, torch.Generator().manual_seed(4)))
    small = compact(model)
    input_ids = torch.randint(1, 40, (1, small.config.max_seq_length))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        logit = _unrolled_lstm_logits(small, input_ids)
    assert torch.allclose(logit[0, 0], small(input_ids=input_ids).logits[0, 1], atol=1e-5)
    assert counter.get_total_flops() == 2 * compute_macs(model) == 2 * compute_macs(small, seq_len=12)
    assert compute_macs(small, seq_len=3) < compute_macs(small)


def test_importance_criteria():
    model = make_cnn()
    conv = get_prunable_groups(model)[0]
    with torch.no_grad():
        model.conv_blocks[0].conv.weight.zero_()
        model.conv_blocks[0].conv.bias.zero_()
        for channel in range(conv.width):
            model.conv_blocks[0].conv.weight[channel, 0, 0, 0] = float(channel + 1) * (-1) ** channel
    assert torch.equal(unit_scores(model, conv, "l1"), torch.arange(1.0, 7.0))
    assert torch.equal(unit_scores(model, conv, "l2"), torch.arange(1.0, 7.0) ** 2)
    masks = masks_from_widths(model, {"conv_blocks.0": 2})
    assert masks["conv_blocks.0"].tolist() == [False, False, False, False, True, True]
    random_a = masks_from_widths(model, {"conv_blocks.0": 3}, criterion="random", seed=7)
    random_b = masks_from_widths(model, {"conv_blocks.0": 3}, criterion="random", seed=7)
    assert torch.equal(random_a["conv_blocks.0"], random_b["conv_blocks.0"])
    # other seeds, other units: random ignores the weights (L1 would keep channels 4 and 5 every time)
    drawn = {tuple(masks_from_widths(model, {"conv_blocks.0": 3}, criterion="random", seed=seed)["conv_blocks.0"].tolist())
             for seed in range(6)}
    assert len(drawn) >= 3
    with pytest.raises(ValueError, match="TaylorAccumulator"):
        masks_from_widths(model, {"conv_blocks.0": 3}, criterion="taylor")
    with pytest.raises(ValueError, match="Unknown importance criterion 'l3'"):
        masks_from_widths(model, {"conv_blocks.0": 3}, criterion="l3")


def test_taylor_importance_accumulates_weight_times_grad():
    model = make_lstm().train()
    taylor = TaylorAccumulator()
    for _ in range(2):
        model.zero_grad()
        model(**lstm_inputs(), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        taylor.accumulate(model)
    group = get_prunable_groups(model)[3]  # hidden_layers.0
    layer = model.hidden_layers[0]
    expected = (layer.weight * layer.weight.grad).abs().sum(1) + (layer.bias * layer.bias.grad).abs()
    # the second step's contribution equals `expected`; the first used the same batch, so the mean is the same
    assert torch.allclose(unit_scores(model, group, "taylor", taylor=taylor), expected, atol=1e-6)
    masks = masks_from_widths(model, {"hidden_layers.0": 2}, criterion="taylor", taylor=taylor)
    assert masks["hidden_layers.0"].sum() == 2
    # an fp16 overflow step (inf gradients, skipped by the optimizer too) leaves the scores as they were
    before = {name: score.clone() for name, score in taylor.scores.items()}
    layer.weight.grad[0, 0] = float("inf")
    taylor.accumulate(model)
    assert taylor.steps == 2 and all(torch.equal(taylor.scores[name], score) for name, score in before.items())
    # a round before any finite step (fp16 overflow at the first steps): units ranked by L1, not a crash
    fresh = TaylorAccumulator()
    fresh.accumulate(model)
    assert fresh.steps == 0 and fresh.skipped_steps == 1
    assert torch.equal(unit_scores(model, group, "taylor", taylor=fresh), unit_scores(model, group, "l1"))
    with pytest.raises(RuntimeError, match="No Taylor scores"):  # never fed at all: a usage error, said as such
        unit_scores(model, group, "taylor", taylor=TaylorAccumulator())


def test_rounds_prune_nested_sets():
    model = make_cnn()
    first = masks_from_widths(model, widths_from_keep_ratios(model, [0.5, 0.5, 0.5]))
    apply_masks(model, first)
    second = masks_from_widths(model, widths_from_keep_ratios(model, [0.34, 0.25, 0.3]))
    for name, mask in second.items():
        assert torch.all(first[name] | ~mask), name  # every unit kept now was kept before
    assert masked_widths(model) == {"conv_blocks.0": 3, "conv_blocks.1": 4, "hidden_layers.0": 5}
    # random scores ignore the zeroed weights, so only the rule (masked units rank last) keeps these nested
    for seed in range(4):
        drawn = masks_from_widths(model, widths_from_keep_ratios(model, [0.34, 0.25, 0.3]), criterion="random", seed=seed)
        assert all(torch.all(first[name] | ~mask) for name, mask in drawn.items()), seed
    # a group a later round leaves out keeps its width: nothing an earlier round pruned revives
    third = masks_from_widths(model, {"hidden_layers.0": 2})
    assert {name: int(mask.sum()) for name, mask in third.items()} == {"conv_blocks.0": 3, "conv_blocks.1": 4, "hidden_layers.0": 2}
    assert all(torch.equal(third[name], first[name]) for name in ("conv_blocks.0", "conv_blocks.1"))


def test_masks_hold_after_the_model_is_cast_or_moved():
    # The Trainer (or a user) may cast or move a model after masking: the hooks and enforce_masks follow it.
    model = make_cnn().train()
    masks = random_masks(model, torch.Generator().manual_seed(2))
    apply_masks(model, masks)
    model.to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs = {key: value.bfloat16() for key, value in cnn_inputs(model, 8).items()}
    model(**inputs, labels=torch.randint(0, 2, (8,))).loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.conv_blocks[0].conv.weight.add_(1.0)  # written directly, as weight loading or an EMA would
    enforce_masks(model, optimizer)
    dropped = torch.nonzero(~masks["conv_blocks.0"]).flatten()
    weight = model.conv_blocks[0].conv.weight
    assert weight.dtype == torch.bfloat16 and torch.all(weight[dropped] == 0)
    assert weight[masks["conv_blocks.0"]].abs().min() > 0  # the live units keep what was written
    assert torch.all(optimizer.state[weight]["exp_avg"][dropped] == 0)


def test_onnx_export_takes_any_sequence_length_and_leaves_the_model_alone(tmp_path):
    import onnxruntime

    model = make_lstm().train().to(torch.bfloat16)
    path = export_onnx(model, tmp_path / "model.onnx")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16  # exported from a float32 copy
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = make_lstm().to(torch.bfloat16).float().eval()  # the same weights, as the export saw them
    for length in (5, 12):  # shorter and longer than the export's example (max_seq_length 12)
        inputs = lstm_inputs(batch=3, length=length)
        (logits,) = session.run(None, {name: value.numpy() for name, value in inputs.items()})
        assert torch.allclose(torch.from_numpy(logits), reference(**inputs).logits, atol=1e-4), length


def test_latency_is_measured_on_a_float32_copy():
    model = make_cnn().train().to(torch.bfloat16)
    result = measure_latency(model, batch_size=2, runtime="torch", warmup=0, repeats=1)
    assert result.median_ms > 0
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


def test_pruning_ratios_and_trade_off():
    config = RLPruneCNNConfig()
    widths = {"conv_blocks.0": 16, "conv_blocks.1": 32, "hidden_layers.0": 256}
    ratios = pruning_ratios(config, widths)
    assert ratios["units_removed"] == pytest.approx(0.5)
    assert ratios["macs_removed"] == pytest.approx(1 - compute_macs(config, widths=widths) / 28_152_832)
    assert 0 < ratios["params_removed"] < 1
    assert trade_off_score(0.8, 2_000_000_000) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        trade_off_score(0.8, 0)


def test_bad_input_errors():
    model = make_cnn()
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        widths_from_keep_ratios(model, [1.2, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        widths_from_keep_ratios(model, [0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 prunable groups"):
        widths_from_keep_ratios(model, [0.5])
    with pytest.raises(KeyError, match="conv_blocks.9"):
        widths_from_keep_ratios(model, {"conv_blocks.9": 0.5})
    with pytest.raises(ValueError, match="expected \\(6,\\)"):
        apply_masks(model, {"conv_blocks.0": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="at least one unit"):
        apply_masks(model, {"conv_blocks.0": torch.zeros(6, dtype=torch.bool)})
    with pytest.raises(TypeError, match="cannot prune a Linear"):
        compact(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="cannot count the cost of a BertConfig"):
        compute_macs(BertConfig())
    with pytest.raises(ValueError, match="Width 7"):
        masks_from_widths(model, {"conv_blocks.0": 7})


def test_a_model_loaded_through_remote_code_first_is_named_with_the_fix(tmp_path):
    """Loaded with trust_remote_code before hf_rlprune is imported, a model is transformers' copy of our class."""
    RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[3, 4], hidden_sizes=[5], image_size=8)).save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        import transformers
        model = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
        from hf_rlprune.pruning import compute_macs, export_onnx
        for call in (lambda: compute_macs(model), lambda: compute_macs(model.config), lambda: export_onnx(model, sys.argv[1] + "/m.onnx")):
            try:
                call()
                raise SystemExit("accepted")
            except TypeError as error:
                print(error)
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = result.stdout.strip().splitlines()
    assert len(messages) == 3 and all("Import hf_rlprune before loading the model" in message for message in messages)


def test_example_inputs_of_a_one_word_vocabulary():
    # the inputs that latency measurement and ONNX export run on: ids avoid the pad id 0 where the vocabulary allows
    from hf_rlprune.pruning.latency import example_inputs

    for vocab_size in (1, 2):
        ids = example_inputs(RLPruneLSTMConfig(vocab_size=vocab_size, max_seq_length=5), batch_size=3)["input_ids"]  # (B, T)
        assert ids.shape == (3, 5) and int(ids.max()) == vocab_size - 1 and int(ids.min()) == min(1, vocab_size - 1)
