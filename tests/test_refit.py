import copy

import pytest
import torch

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.pruning import apply_masks, get_masks, get_prunable_groups
from hf_rlprune.pruning.refit import (
    _calibration_batch,
    _conv_patches,
    _rows,
    recalibrate_batch_norm,
    refit_consumers,
    reference_outputs,
)
from hf_rlprune.reward import CandidateRepair, RewardEvaluator
from tests.test_reward import CANDIDATES, counting_batches, quadrant_batches, train_counting_lstm, train_quadrant_cnn


def cnn_with_twin_units(use_batch_norm):
    """Each group has a unit that duplicates another (conv channel 1 = 0, conv channel 3 = 2, neuron 5 = 4): pruning
    the twin loses information the consumer can get back exactly by doubling the original's weights."""
    torch.manual_seed(0)
    config = RLPruneCNNConfig(conv_channels=[8, 16], hidden_sizes=[32], num_labels=4, image_size=16, dropout=0.0,
                              use_batch_norm=use_batch_norm)
    model = RLPruneCNNForImageClassification(config)
    with torch.no_grad():
        for module, original, twin in ((model.conv_blocks[0], 0, 1), (model.conv_blocks[1], 2, 3)):
            for tensor in [module.conv.weight, module.conv.bias] + ([module.norm.weight, module.norm.bias, module.norm.running_mean,
                                                                       module.norm.running_var] if use_batch_norm else []):
                tensor[twin] = tensor[original]
        dense = model.hidden_layers[0]
        dense.weight[5], dense.bias[5] = dense.weight[4], dense.bias[4]
    return model.eval()


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in batch.items() if k != "labels"}).logits for batch in batches])


def twin_masks(model, group, twin):
    width = {g.name: g.width for g in get_prunable_groups(model)}[group]
    keep = torch.ones(width, dtype=torch.bool)
    keep[twin] = False
    return {group: keep}


@pytest.mark.parametrize("use_batch_norm", [False, True])
@pytest.mark.parametrize("group, twin", [("conv_blocks.0", 1), ("conv_blocks.1", 3), ("hidden_layers.0", 5)],
                         ids=["conv-to-conv", "conv-to-flattened-dense", "dense-to-classifier"])
def test_refit_restores_an_exactly_recoverable_function(use_batch_norm, group, twin):
    model = cnn_with_twin_units(use_batch_norm)
    batches = quadrant_batches(3, 32, seed=1)
    reference, expected = reference_outputs(model, batches), logits(model, batches)
    masks = twin_masks(model, group, twin)
    apply_masks(model, masks)
    lost = (logits(model, batches) - expected).abs().max()
    refit_consumers(model, masks, batches, reference, ridge=0.0)
    assert lost > 1e-2 and (logits(model, batches) - expected).abs().max() < 1e-4 * lost.clamp(min=1) + 1e-5
    if group != "conv_blocks.1":  # with fewer rows (96) than inputs (960) the flattened dense fit is not unique
        held_out = quadrant_batches(2, 32, seed=9)  # an exact refit generalizes: the twin really was redundant
        assert torch.allclose(logits(model, held_out), logits(cnn_with_twin_units(use_batch_norm), held_out), atol=1e-4)
    assert get_masks(model)[group].equal(masks[group])
    for name, param in model.named_parameters():  # the masked units stay exactly zero
        if name.startswith(group) and param.dim() >= 1:
            assert torch.all(param[twin] == 0)


def test_refit_of_an_lstm_input_projection():
    torch.manual_seed(0)
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20, embedding_dim=8, lstm_hidden_sizes=[6], hidden_sizes=[4])).eval()
    with torch.no_grad():
        model.embeddings.weight[:, 3] = model.embeddings.weight[:, 2]  # embedding dimension 3 duplicates 2
    batches = counting_batches(2, 16, seed=1)
    reference, expected = reference_outputs(model, batches), logits(model, batches)
    masks = twin_masks(model, "embeddings", 3)
    apply_masks(model, masks)
    refit_consumers(model, masks, batches, reference, ridge=0.0)
    assert torch.allclose(logits(model, batches), expected, atol=1e-5)
    assert torch.all(model.embeddings.weight[:, 3] == 0)


def test_the_ridge_pulls_towards_the_current_weights():
    trained = cnn_with_twin_units(False)
    batches = quadrant_batches(2, 16, seed=1)  # 32 rows, 16 * 16 features into the dense layer: the dual form
    reference = reference_outputs(trained, batches)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:6] = True
    changes = []
    for ridge in (0.0, 0.1, 10.0):
        model = copy.deepcopy(trained)
        apply_masks(model, {"conv_blocks.1": keep})
        before = model.hidden_layers[0].weight.detach().clone()
        refit_consumers(model, {"conv_blocks.1": keep}, batches, reference, ridge=ridge)
        changes.append(float((model.hidden_layers[0].weight.detach() - before).norm()))
        if ridge == 0.0:  # more inputs than rows: the calibration outputs are matched exactly
            rows = torch.cat([model.conv_blocks[1](model.conv_blocks[0](b["pixel_values"])).flatten(1) for b in batches])
            assert torch.allclose(model.hidden_layers[0](rows).double(), reference["hidden_layers.0.weight"], atol=1e-3)
    assert changes[0] > changes[1] > changes[2] > 0
    with pytest.raises(ValueError, match="ridge = -1"):
        refit_consumers(model, {"conv_blocks.1": keep}, batches, reference, ridge=-1)
    with pytest.raises(ValueError, match="same batches"):
        refit_consumers(model, {"conv_blocks.1": keep}, batches[:1], reference)


def test_refitted_rewards_stacked_and_one_at_a_time():
    trained_cnn = train_quadrant_cnn()

    def evaluator(per_pass, ridge, steps=0):
        return RewardEvaluator(quadrant_batches(4, 64, seed=2), quadrant_batches(4, 32, seed=3),
                               repair=CandidateRepair(refit_ridge=ridge, recovery_steps=steps, recovery_lr=3e-3),
                               candidates_per_pass=per_pass, stack_candidates=True)

    rewards = {}
    for key in [(1, None), (1, 0.1), (4, 0.1), (4, None)]:
        reward = evaluator(*key)
        reward.begin_round(trained_cnn)
        rewards[key] = reward.evaluate_batch(CANDIDATES)
    assert rewards[(4, 0.1)] == pytest.approx(rewards[(1, 0.1)], abs=1 / 256 + 1e-9)
    assert rewards[(1, 0.1)][0] == rewards[(1, None)][0]  # nothing pruned: nothing refitted
    assert sum(rewards[(1, 0.1)][1:3]) > sum(rewards[(1, None)][1:3])  # the refit recovers pruned accuracy
    live = train_quadrant_cnn()

    def wrapped_forward(*args, **kwargs):  # e.g. a Trainer's autocast wrapper: the reference must not come from here
        raise AssertionError("the live model ran")

    live.forward = wrapped_forward
    reward = evaluator(1, 0.1)
    reward.begin_round(live)
    assert reward.evaluate_batch(CANDIDATES) == rewards[(1, 0.1)]
    with pytest.raises(ValueError, match="refit_ridge = 0.1 needs recovery batches"):
        RewardEvaluator(quadrant_batches(1, 8, seed=2), repair=CandidateRepair(refit_ridge=0.1)).begin_round(trained_cnn)
    with pytest.raises(ValueError, match="refit_ridge = -0.5"):
        CandidateRepair(refit_ridge=-0.5)



def test_calibration_rows_are_a_random_subset_of_positions():
    # A strided subset of (image, row, column)-ordered patches can land on one image column; the subset is random.
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    inputs = torch.zeros(4, 2, 8, 8)
    inputs[:, 0] = torch.arange(8.0)  # channel 0 holds each pixel's column index
    rows = _rows(conv, inputs, None, max_rows=32, seed=0)  # 256 patches, a stride of 8 would keep column 0 only
    assert rows.shape == (32, 18) and rows.dtype == torch.float64
    centre_columns = rows[:, 4]  # channel 0, centre tap
    assert len(set(centre_columns.tolist())) >= 5
    assert torch.equal(rows, _rows(conv, inputs, None, max_rows=32, seed=0))  # seeded: reference and candidate pair up


def test_lstm_calibration_batches_of_different_lengths_drop_padding():
    torch.manual_seed(0)
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20, embedding_dim=8, lstm_hidden_sizes=[6], hidden_sizes=[4])).eval()
    with torch.no_grad():
        model.embeddings.weight[:, 3] = model.embeddings.weight[:, 2]
    batches = counting_batches(1, 16, seed=1, steps=12) + counting_batches(1, 16, seed=2, steps=7)
    reference = reference_outputs(model, batches)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert reference["lstm_layers.0.weight_ih_l0"].shape[0] == real_tokens  # padded positions are not fitted
    expected = [logits(model, [batch]) for batch in batches]
    masks = twin_masks(model, "embeddings", 3)
    apply_masks(model, masks)
    refit_consumers(model, masks, batches, reference, ridge=0.0)
    for batch, before in zip(batches, expected):
        assert torch.allclose(logits(model, [batch]), before, atol=1e-5)


def test_refit_with_few_calibration_rows_still_restores_a_conv():
    model = cnn_with_twin_units(False)
    batches = quadrant_batches(3, 32, seed=1)
    reference, expected = reference_outputs(model, batches, max_rows=150), logits(model, batches)
    masks = twin_masks(model, "conv_blocks.0", 1)
    apply_masks(model, masks)
    refit_consumers(model, masks, batches, reference, ridge=0.0, max_rows=150)  # 150 of 24,576 patches, 63 features
    assert torch.allclose(logits(model, batches), expected, atol=1e-4)


def test_refitted_lstm_rewards_stacked_and_one_at_a_time():
    # The refit runs inside the stacked pass's block-diagonal LSTM context; it must give the one-at-a-time rewards.
    model = train_counting_lstm()
    candidates = [{"lstm_layers.0": 16}, {"lstm_layers.0": 4, "embeddings": 3}, {"hidden_layers.0": 2},
                  {"lstm_layers.0": 6, "embeddings": 4, "hidden_layers.0": 3}]
    rewards = {}
    for per_pass, ridge in [(1, None), (1, 0.01), (4, 0.01)]:
        reward = RewardEvaluator(counting_batches(4, 64, seed=2), counting_batches(4, 32, seed=3),
                                 repair=CandidateRepair(refit_ridge=ridge, recovery_steps=3, recovery_lr=3e-3),
                                 candidates_per_pass=per_pass, stack_candidates=True)
        reward.begin_round(model)
        rewards[per_pass, ridge] = reward.evaluate_batch(candidates)
    assert rewards[4, 0.01] == pytest.approx(rewards[1, 0.01], abs=1 / 256 + 1e-9)
    assert rewards[1, 0.01] != rewards[1, None]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 0, 1), (5, 1, "same", 2), ((3, 1), (1, 2), (1, 0), 1),
                                                             (2, 1, "same", 1), ((4, 3), 1, "same", (1, 2))])
def test_gathered_patches_are_the_unfolded_rows(kernel, stride, padding, dilation):
    # The refit gathers only the sampled patches; they must be exactly unfold's rows at those positions, and both
    # must be what the conv multiplies (padding="same" with an even kernel pads unevenly, as torch does).
    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation).double()
    inputs = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    everything = _conv_patches(conv, inputs, None)  # (N * L, C * k * k), via unfold
    outputs = conv(inputs).permute(0, 2, 3, 1).reshape(-1, 4)  # (N * out_h * out_w, out channels)
    assert torch.allclose(everything @ conv.weight.flatten(1).T + conv.bias, outputs, atol=1e-10)
    chosen = torch.tensor([0, 5, everything.shape[0] // 2, everything.shape[0] - 1])
    assert torch.equal(_conv_patches(conv, inputs, chosen), everything[chosen])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_refit_of_a_cnn_with_an_even_kernel():
    # RLPruneCNNConfig takes padding="same" with an even kernel; the default reward refits it.
    torch.manual_seed(0)
    model = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[4, 8], hidden_sizes=[8], kernel_size=2, image_size=8)).eval()
    batches = [{"pixel_values": torch.randn(16, 3, 8, 8)}]
    reference, expected = reference_outputs(model, batches), logits(model, batches)
    masks = {"conv_blocks.0": torch.tensor([True, True, False, True])}
    apply_masks(model, masks)
    lost = (logits(model, batches) - expected).abs().mean()
    assert refit_consumers(model, masks, batches, reference, ridge=0.01)[:2] == ["conv_blocks.1.conv.weight", "conv_blocks.1.conv.bias"]
    assert (logits(model, batches) - expected).abs().mean() < 0.5 * lost  # the fit is of the conv as torch pads it


def test_calibration_batches_of_different_lengths_are_right_padded():
    short = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]]), "labels": torch.tensor([1])}
    long = {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([0])}
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20, embedding_dim=4, lstm_hidden_sizes=[3],
                                                                   hidden_sizes=[2], pad_token_id=3))
    merged = _calibration_batch(model, [short, long])
    assert set(merged) == {"input_ids", "attention_mask"}
    assert merged["input_ids"].tolist() == [[5, 6, 3], [7, 8, 9]]
    assert merged["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 0]]


def test_calibration_batches_without_a_mask_mark_the_added_padding():
    # The model derives its mask from pad_token_id; the padding the merge adds must be marked the same way.
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20, embedding_dim=4, lstm_hidden_sizes=[3],
                                                                   hidden_sizes=[2], pad_token_id=3))
    short, long = {"input_ids": torch.tensor([[5, 3]])}, {"input_ids": torch.tensor([[7, 8, 9]])}
    merged = _calibration_batch(model, [short, long])
    assert merged["input_ids"].tolist() == [[5, 3, 3], [7, 8, 9]]
    assert merged["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("second_length", [7, 12], ids=["different-lengths", "same-length"])
def test_reference_and_refit_without_masks_match_the_masked_batches(second_length):
    # Refitting on mask-less batches gives what the same batches with their masks give: their own padding (and any
    # the merge adds) is dropped, as the model drops its pad tokens.
    torch.manual_seed(0)
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=20, embedding_dim=8, lstm_hidden_sizes=[6],
                                                                   hidden_sizes=[4], pad_token_id=0)).eval()
    batches = counting_batches(1, 16, seed=1, steps=12) + counting_batches(1, 16, seed=2, steps=second_length)
    unmasked = [{key: value for key, value in batch.items() if key != "attention_mask"} for batch in batches]
    masks = twin_masks(model, "embeddings", 3)
    refitted = {}
    for name, calibration in (("masked", batches), ("unmasked", unmasked)):
        copy_ = copy.deepcopy(model)
        reference = reference_outputs(copy_, calibration)
        apply_masks(copy_, masks)
        refit_consumers(copy_, masks, calibration, reference, ridge=0.01)
        refitted[name] = copy_.lstm_layers[0].weight_ih_l0.detach()
    assert torch.allclose(refitted["masked"], refitted["unmasked"], atol=1e-6)


def test_batch_norm_recalibration_holds_the_masked_models_own_statistics():
    model = train_quadrant_cnn().eval()  # batch norm after each conv, dropout 0.3 before the classifier
    masks = {"conv_blocks.0": torch.tensor([True, False] * 4), "conv_blocks.1": torch.arange(16) < 10}
    apply_masks(model, masks)
    batches = quadrant_batches(3, 32, seed=4)
    # what each norm sees when every norm normalizes by its batch: per-batch mean and unbiased variance, averaged
    seen = {name: [] for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    probe = copy.deepcopy(model).train()
    handles = [probe.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: seen[name].append(args[0]))
               for name in seen]
    with torch.no_grad():
        for batch in batches:
            probe(pixel_values=batch["pixel_values"])
    for handle in handles:
        handle.remove()
    momenta = {name: model.get_submodule(name).momentum for name in seen}
    assert len(seen) == 2 and recalibrate_batch_norm(model, batches) == 2
    assert not model.training  # left in the mode it was in
    for name, inputs in seen.items():
        norm = model.get_submodule(name)
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)  # (C,)
        variance = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in inputs]).mean(0)  # (C,), unbiased per batch
        assert torch.allclose(norm.running_mean, mean, atol=1e-5) and torch.allclose(norm.running_var, variance, atol=1e-5)
        assert norm.momentum == momenta[name] and not norm.training
        pruned = ~masks[name.removesuffix(".norm")]
        assert torch.all(norm.running_mean[pruned] == 0) and torch.all(norm.running_var[pruned] == 0)
    # dropout was off: the statistics do not depend on the random stream
    again = copy.deepcopy(model)
    torch.manual_seed(123)
    recalibrate_batch_norm(again, batches)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), again.buffers()))
    plain = RLPruneCNNForImageClassification(RLPruneCNNConfig(conv_channels=[4], hidden_sizes=[8], num_labels=4, image_size=16))
    before = copy.deepcopy(plain.state_dict())
    assert recalibrate_batch_norm(plain, batches) == 0  # no norm: nothing runs, nothing changes
    assert all(torch.equal(value, before[name]) for name, value in plain.state_dict().items())


def test_batch_norm_recalibrated_rewards_stacked_and_one_at_a_time():
    trained_cnn = train_quadrant_cnn()

    def evaluator(per_pass, norm_batches, ridge=None):
        return RewardEvaluator(quadrant_batches(4, 64, seed=2), quadrant_batches(4, 32, seed=3), candidates_per_pass=per_pass,
                               stack_candidates=True, repair=CandidateRepair(refit_ridge=ridge, bn_recalibration_batches=norm_batches))

    rewards = {}
    for key in [(1, 0), (1, 3), (4, 3), (1, 3, 0.1), (4, 3, 0.1)]:
        reward = evaluator(*key)
        reward.begin_round(trained_cnn)
        rewards[key] = reward.evaluate_batch(CANDIDATES)
    assert rewards[(4, 3)] == pytest.approx(rewards[(1, 3)], abs=1 / 256 + 1e-9)
    assert rewards[(4, 3, 0.1)] == pytest.approx(rewards[(1, 3, 0.1)], abs=1 / 256 + 1e-9)
    assert sum(rewards[(1, 3)][1:3]) > sum(rewards[(1, 0)][1:3])  # fresh statistics recover pruned accuracy
    with pytest.raises(ValueError, match="bn_recalibration_batches = 2 needs recovery batches"):
        RewardEvaluator(quadrant_batches(1, 8, seed=2), repair=CandidateRepair(bn_recalibration_batches=2)).begin_round(trained_cnn)
    with pytest.raises(ValueError, match="bn_recalibration_batches = -1"):
        CandidateRepair(bn_recalibration_batches=-1)
