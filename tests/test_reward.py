import pytest
import torch

from hf_rlprune import RLPruneCNNConfig, RLPruneCNNForImageClassification, RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune.pruning import apply_masks, get_masks, masks_from_widths
from hf_rlprune.reward import CandidateRepair, RewardEvaluator, supports_stacked_candidates, take_batches

CANDIDATES = [
    {"conv_blocks.0": 8, "conv_blocks.1": 16, "hidden_layers.0": 32},  # the round's model, unpruned further
    {"conv_blocks.0": 3, "conv_blocks.1": 16, "hidden_layers.0": 8},
    {"conv_blocks.0": 6, "conv_blocks.1": 4, "hidden_layers.0": 32},
    {"conv_blocks.0": 1, "conv_blocks.1": 1, "hidden_layers.0": 1},
]


def quadrant_batches(num_batches, batch_size, seed):
    """A learnable 4-class task: the label is the signs of the mean of two image regions."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        pixels = torch.randn(batch_size, 3, 16, 16, generator=generator)  # (B, C, H, W)
        labels = 2 * (pixels[:, 0, :8, :8].mean((1, 2)) > 0).long() + (pixels[:, 1, 8:, 8:].mean((1, 2)) > 0).long()  # (B,)
        pixels[:, 0, :8, :8] += (2 * (labels // 2) - 1)[:, None, None].float()  # make the signal easy to see
        pixels[:, 1, 8:, 8:] += (2 * (labels % 2) - 1)[:, None, None].float()
        batches.append({"pixel_values": pixels, "labels": labels})
    return batches


@pytest.fixture
def trained_cnn():
    return train_quadrant_cnn()


def train_quadrant_cnn():
    torch.manual_seed(0)
    config = RLPruneCNNConfig(conv_channels=[8, 16], hidden_sizes=[32], num_labels=4, image_size=16, use_batch_norm=True, dropout=0.3)
    model = RLPruneCNNForImageClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in quadrant_batches(30, 32, seed=1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model


def evaluator(candidates_per_pass, recovery_steps=6):
    # stacking is on for CUDA by default; forced here so that CPU tests exercise it
    return RewardEvaluator(quadrant_batches(4, 64, seed=2), quadrant_batches(3, 32, seed=3),
                           repair=CandidateRepair(recovery_steps=recovery_steps, recovery_lr=3e-3), candidates_per_pass=candidates_per_pass, stack_candidates=True, seed=0)


def test_stacked_candidates_match_one_at_a_time(trained_cnn):
    # BN (batched running stats), dropout (one stream for all) and Adam (elementwise) must all stay per candidate.
    one_at_a_time, stacked = evaluator(1), evaluator(4)
    for reward in (one_at_a_time, stacked):
        reward.begin_round(trained_cnn)
    expected = one_at_a_time.evaluate_batch(CANDIDATES)
    got = stacked.evaluate_batch(CANDIDATES)
    assert got == pytest.approx(expected, abs=1 / 256 + 1e-9)  # at most one of 256 predictions may flip on rounding
    assert expected[0] > 0.8 and expected[3] < expected[0]  # a real task: width matters
    assert one_at_a_time.evaluations == stacked.evaluations == len(CANDIDATES)
    # a candidate's reward does not depend on which others share its pass, nor on the chunking
    assert stacked.evaluate_batch(CANDIDATES[2:3]) == pytest.approx(got[2:3], abs=1e-9)
    chunked = evaluator(3)
    chunked.begin_round(trained_cnn)
    assert chunked.evaluate_batch(CANDIDATES) == pytest.approx(got, abs=1 / 256 + 1e-9)


def test_recovery_trains_each_candidate_and_leaves_the_live_model_alone(trained_cnn):
    before = {name: value.clone() for name, value in trained_cnn.state_dict().items()}
    no_recovery, recovery = evaluator(4, recovery_steps=0), evaluator(4, recovery_steps=30)
    for reward in (no_recovery, recovery):
        reward.begin_round(trained_cnn)
    assert sum(recovery.evaluate_batch(CANDIDATES[1:])) > sum(no_recovery.evaluate_batch(CANDIDATES[1:]))
    for name, value in trained_cnn.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_candidates_nest_inside_the_rounds_masks(trained_cnn):
    # Units the live model already pruned stay pruned: keeping 4 of the 4 alive equals the round's model itself.
    apply_masks(trained_cnn, masks_from_widths(trained_cnn, {"conv_blocks.0": 4}))
    reward = evaluator(4, recovery_steps=0)
    reward.begin_round(trained_cnn)
    same, wider_than_alive = reward.evaluate_batch([{"conv_blocks.0": 4}, {"conv_blocks.0": 8}])
    assert same == wider_than_alive
    # Random importance ignores the zeroed weights: only the round's masks, re-applied to every candidate, keep it nested.
    round_mask = get_masks(trained_cnn)["conv_blocks.0"]
    random_order = RewardEvaluator(quadrant_batches(1, 64, seed=2), importance="random")
    random_order.begin_round(trained_cnn)
    for seed in range(5):
        random_order.seed = seed
        kept = get_masks(random_order.masked_copy({"conv_blocks.0": 3}))["conv_blocks.0"]
        assert int(kept.sum()) == 3 and not torch.any(kept & ~round_mask), seed


def counting_batches(num_batches, batch_size, seed, vocab_size=20, steps=12):
    """A learnable sequence task with right padding: is token 3 more frequent than token 4?"""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(4, steps + 1, (batch_size,), generator=generator)  # (B,)
        attention_mask = (torch.arange(steps)[None] < lengths[:, None]).long()  # (B, T)
        input_ids = torch.randint(3, vocab_size, (batch_size, steps), generator=generator) * attention_mask
        labels = ((input_ids == 3).sum(1) > (input_ids == 4).sum(1)).long()  # (B,)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def train_counting_lstm(pooling="last"):
    """A small LSTM trained on the counting task (both dropouts on, so stacked passes must share their stream)."""
    torch.manual_seed(0)
    config = RLPruneLSTMConfig(vocab_size=20, embedding_dim=8, lstm_hidden_sizes=[16], hidden_sizes=[8], dropout=0.2,
                               embedding_dropout=0.2, pooling=pooling)
    model = RLPruneLSTMForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in counting_batches(150, 32, seed=1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_stacked_lstm_candidates_match_one_at_a_time(pooling):
    # The block-diagonal LSTM rule (batched_lstm) stacks LSTM candidates; dropout and the padding gather stay exact.
    model = train_counting_lstm(pooling)
    assert supports_stacked_candidates(model)
    candidates = [{"lstm_layers.0": 16}, {"lstm_layers.0": 4, "embeddings": 3}, {"hidden_layers.0": 2},
                  {"lstm_layers.0": 1, "embeddings": 1, "hidden_layers.0": 1}]
    rewards = []
    for per_pass in (1, 4, 3):
        reward = RewardEvaluator(counting_batches(4, 64, seed=2), counting_batches(3, 32, seed=3),
                                 repair=CandidateRepair(recovery_steps=6, recovery_lr=3e-3), candidates_per_pass=per_pass, stack_candidates=True)
        reward.begin_round(model)
        rewards.append(reward.evaluate_batch(candidates))
    assert rewards[0][0] > 0.8 and rewards[0][3] < rewards[0][0]  # a real task: width matters
    assert rewards[1] == pytest.approx(rewards[0], abs=1 / 256 + 1e-9)  # at most one of 256 predictions may flip on rounding
    assert rewards[2] == pytest.approx(rewards[1], abs=1 / 256 + 1e-9)


def test_evaluator_errors_name_the_fix(trained_cnn):
    with pytest.raises(ValueError, match="candidates_per_pass"):
        evaluator(0)
    with pytest.raises(RuntimeError, match="begin_round"):
        evaluator(2).evaluate_batch(CANDIDATES)
    assert supports_stacked_candidates(trained_cnn)


def test_candidates_are_stacked_on_cuda_only_by_default(trained_cnn, monkeypatch):
    # On a CPU one candidate already fills the cores and the stacked pass measured slower: one at a time there.
    reward = RewardEvaluator(quadrant_batches(1, 16, seed=2), quadrant_batches(1, 16, seed=3), repair=CandidateRepair(recovery_steps=1),
                             candidates_per_pass=4)
    reward.begin_round(trained_cnn)

    def refuse(candidates):
        raise AssertionError("stacked on CPU")

    monkeypatch.setattr(reward, "_evaluate_stacked", refuse)
    assert len(reward.evaluate_batch(CANDIDATES)) == 4 and reward.evaluations == 4


def test_candidates_run_in_the_trainers_precision_on_cpu_too(trained_cnn):
    # A Trainer with bf16 on a CPU trains under CPU autocast: its candidates' recovery and reward must run so too.
    # (One at a time, the CPU default: under vmap torch's CPU autocast leaves linears in float32.)
    reward = RewardEvaluator(quadrant_batches(1, 16, seed=2), quadrant_batches(1, 16, seed=3), repair=CandidateRepair(recovery_steps=1),
                             autocast_dtype=torch.bfloat16, candidates_per_pass=2)
    reward.begin_round(trained_cnn)
    seen = []  # the candidates are the scratch copy
    reward._scratch.classifier.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    reward.evaluate_batch(CANDIDATES[:2])
    assert seen and set(seen) == {torch.bfloat16}  # recovery steps and reward batches alike


def test_take_batches_restarts_the_loader_and_names_an_empty_one():
    loader = torch.utils.data.DataLoader(list(range(5)), batch_size=2, drop_last=True)  # 2 batches per pass
    assert [batch.tolist() for batch in take_batches(loader, 5)] == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]
    assert take_batches(loader, 0) == []
    with pytest.raises(ValueError, match="no batch.*lower the batch size"):
        take_batches(torch.utils.data.DataLoader(list(range(3)), batch_size=4, drop_last=True), 1)
