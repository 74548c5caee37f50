import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from hf_rlprune import RLPruneLSTMConfig, RLPruneLSTMForSequenceClassification
from hf_rlprune import batched_lstm
from hf_rlprune.batched_lstm import BlockDiagonalLSTM, _block_diagonal_gates, is_stackable_lstm, stackable_lstms
from hf_rlprune.reward import supports_stacked_candidates

COPIES, BATCH, STEPS, WIDTH, HIDDEN = 3, 4, 7, 5, 6


def lstm_copies(seed=0):
    torch.manual_seed(seed)
    return [nn.LSTM(WIDTH, HIDDEN, batch_first=True) for _ in range(COPIES)]


def stacked_params(lstms):
    names = [name for name, _ in lstms[0].named_parameters()]
    return {name: torch.stack([dict(lstm.named_parameters())[name] for lstm in lstms]).detach().requires_grad_() for name in names}


def apply_rule(params, inputs):
    return BlockDiagonalLSTM.apply(inputs, params["weight_ih_l0"], params["weight_hh_l0"], params["bias_ih_l0"], params["bias_hh_l0"])


@pytest.mark.parametrize("shared_inputs", [False, True])
def test_vmapped_rule_equals_separate_lstms_forward_and_backward(shared_inputs):
    lstms = lstm_copies()
    inputs = torch.randn(BATCH, STEPS, WIDTH) if shared_inputs else torch.randn(COPIES, BATCH, STEPS, WIDTH)
    expected = [lstm(inputs if shared_inputs else inputs[k]) for k, lstm in enumerate(lstms)]
    params = stacked_params(lstms)
    output, h_n, c_n = vmap(apply_rule, in_dims=(0, None if shared_inputs else 0))(params, inputs)  # (K, B, T, H), (K, 1, B, H) x 2
    assert output.shape == (COPIES, BATCH, STEPS, HIDDEN) and h_n.shape == c_n.shape == (COPIES, 1, BATCH, HIDDEN)
    torch.testing.assert_close(output, torch.stack([out for out, _ in expected]))
    torch.testing.assert_close(h_n, torch.stack([h for _, (h, _) in expected]))
    torch.testing.assert_close(c_n, torch.stack([c for _, (_, c) in expected]))
    # gradients reach each copy's own weights only: the off-diagonal blocks are constants
    weights = torch.randn(COPIES, BATCH, STEPS, HIDDEN)
    (output * weights).sum().backward()
    sum((out * weights[k]).sum() for k, (out, _) in enumerate(expected)).backward()
    for name, value in params.items():
        torch.testing.assert_close(value.grad, torch.stack([dict(lstm.named_parameters())[name].grad for lstm in lstms]), msg=name)


def test_unbatched_rule_is_the_lstm_with_correct_gradients():
    lstm = lstm_copies()[0].double()
    inputs = torch.randn(BATCH, STEPS, WIDTH, dtype=torch.double, requires_grad=True)
    params = dict(lstm.named_parameters())
    output, h_n, c_n = apply_rule(params, inputs)
    torch.testing.assert_close(output, lstm(inputs)[0])
    tensors = (inputs, params["weight_ih_l0"], params["weight_hh_l0"], params["bias_ih_l0"], params["bias_hh_l0"])
    assert torch.autograd.gradcheck(lambda *args: BlockDiagonalLSTM.apply(*args), tensors)


def test_context_routes_the_models_lstms_through_the_rule_and_restores_them():
    torch.manual_seed(0)
    model = RLPruneLSTMForSequenceClassification(RLPruneLSTMConfig(vocab_size=30, embedding_dim=8, lstm_hidden_sizes=[6, 5], hidden_sizes=[4]))
    model.eval()
    input_ids = torch.randint(1, 30, (3, 9))
    expected = model(input_ids).logits
    params = {name: value.detach().unsqueeze(0).repeat(2, *[1] * value.dim()) for name, value in model.named_parameters()}  # (2, ...)
    with stackable_lstms(model):
        torch.testing.assert_close(model(input_ids).logits, expected)  # outside vmap: the plain LSTM
        logits = vmap(lambda p: functional_call(model, p, args=(input_ids,)).logits)(params)  # (2, B, 2)
    torch.testing.assert_close(logits, expected.expand(2, -1, -1))
    assert all("forward" not in vars(module) for module in model.modules())  # nn.LSTM.forward is back


def test_context_restores_forward_on_error_and_when_nested():
    lstm = nn.LSTM(WIDTH, HIDDEN, batch_first=True)
    model = nn.Sequential(lstm)
    with pytest.raises(RuntimeError, match="boom"), stackable_lstms(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(lstm)
    with stackable_lstms(model):
        patched = lstm.forward
        with stackable_lstms(model):
            pass
        assert lstm.forward == patched  # the outer context's forward is back
    assert "forward" not in vars(lstm)


def test_unbatched_rule_recomputes_under_the_forwards_autocast(monkeypatch):
    # Outside vmap, backward recomputes the LSTM: it must see the autocast state the forward saw.
    seen = []
    real = batched_lstm._lstm

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args)

    monkeypatch.setattr(batched_lstm, "_lstm", spy)
    lstm = lstm_copies()[0]
    inputs = torch.randn(BATCH, STEPS, WIDTH)
    params = dict(lstm.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):  # the state is recorded, whatever it is
        output = apply_rule(params, inputs)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a different ambient state at backward time
        output.sum().backward()
    assert seen == [False, False]
    assert params["weight_hh_l0"].grad is not None


def test_unsupported_recurrent_layers_are_named():
    assert is_stackable_lstm(nn.LSTM(4, 3, batch_first=True))
    for module in (nn.LSTM(4, 3, num_layers=2, batch_first=True), nn.LSTM(4, 3, bidirectional=True, batch_first=True),
                   nn.LSTM(4, 3), nn.GRU(4, 3, batch_first=True)):
        assert not is_stackable_lstm(module)
        model = nn.Sequential(module)
        assert not supports_stacked_candidates(model)
        with pytest.raises(ValueError, match=type(module).__name__), stackable_lstms(model):
            pass


def test_block_diagonal_weights_are_copied_exactly_under_autocast():
    # Under (CUDA) autocast a matmul-built block diagonal would come out in bf16 beside fp32 biases: cuDNN refuses.
    weights = torch.randn(COPIES, 4 * HIDDEN, WIDTH)  # (K, 4H, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = _block_diagonal_gates(weights)  # (4KH, KD)
    assert wide.dtype == torch.float32 and wide.shape == (4 * COPIES * HIDDEN, COPIES * WIDTH)
    blocks = wide.view(4, COPIES, HIDDEN, COPIES, WIDTH)
    for k in range(COPIES):
        for other in range(COPIES):
            expected = weights[k].view(4, HIDDEN, WIDTH) if k == other else torch.zeros(4, HIDDEN, WIDTH)
            assert torch.equal(blocks[:, k, :, other, :], expected)
