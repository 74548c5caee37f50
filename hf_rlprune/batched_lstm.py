"""A vmap rule for nn.LSTM: K stacked LSTMs run as one block-diagonal LSTM, in one fused (cuDNN) call.

torch has no batching rule for its fused recurrent kernel (`aten::lstm`), so `torch.func.vmap` cannot stack the
masked copies of a model with LSTMs, and a Python loop over time steps is far slower than the fused kernel. K
LSTMs of width H are exactly one LSTM of width K x H whose weights are block-diagonal: unit j of copy k reads only
copy k's inputs and hidden state. The off-diagonal blocks are constant zeros, so gradients reach only each copy's
own weights, and Adam over the stacked weights stays K independent recoveries. The price is K times the MACs of
the K copies (K^2 x one), bought back by one kernel launch per step instead of K; worth it on a GPU only.

Use `with stackable_lstms(model):` around `vmap(functional_call(model, ...))`: inside it, the model's plain LSTMs
run through `BlockDiagonalLSTM`, whose `vmap` staticmethod is the batching rule. Outside vmap the function is the
ordinary LSTM (its backward recomputes the forward, under the same autocast), so the model gives the same results
either way. One level of vmap with ordinary autograd is what RewardEvaluator needs and what is supported; nested
vmap and torch.func.grad over the rule are not.
"""

import contextlib
import types
import warnings

import torch
from torch import nn


def _lstm(inputs, weight_ih, weight_hh, bias_ih, bias_hh):
    """One batch-first LSTM layer from zero state: (B, T, D) -> output (B, T, H), h_n and c_n (1, B, H)."""
    zeros = inputs.new_zeros(1, inputs.shape[0], weight_hh.shape[1])  # (1, B, H)
    with warnings.catch_warnings():
        # cuDNN wants the weights in one flat buffer and copies them when they are not: these are built per call
        warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk of memory.*")
        # args: has_biases, num_layers, dropout, train (cuDNN keeps what backward needs), bidirectional, batch_first
        output, h_n, c_n = torch._VF.lstm(
            inputs, (zeros, zeros), (weight_ih, weight_hh, bias_ih, bias_hh), True, 1, 0.0, torch.is_grad_enabled(), False, True
        )
    return output, h_n, c_n


def _block_diagonal_gates(weights: torch.Tensor) -> torch.Tensor:
    """(K, 4H, D) per-copy gate weights -> (4KH, KD): gate-major as the LSTM expects ([i; f; g; o], each K x H rows),
    copy k's block at rows k*H.. of every gate and columns k*D.."""
    copies, gates_h, width = weights.shape
    hidden = gates_h // 4
    wide = weights.new_zeros(4, copies, hidden, copies, width)  # (gate, copy, unit, copy, input)
    index = torch.arange(copies, device=weights.device)
    # indexing two dims with `index` selects (K, 4, H, D): the diagonal blocks. A copy, not a matmul with an
    # identity, so autocast cannot round the weights.
    wide[:, index, :, index, :] = weights.view(copies, 4, hidden, width)
    return wide.view(4 * copies * hidden, copies * width)


def _interleaved_gate_bias(bias: torch.Tensor) -> torch.Tensor:
    """(K, 4H) -> (4KH), gate-major like the weights' rows."""
    copies, gates_h = bias.shape
    return bias.view(copies, 4, gates_h // 4).transpose(0, 1).reshape(gates_h * copies)


class BlockDiagonalLSTM(torch.autograd.Function):
    """`apply(inputs, weight_ih, weight_hh, bias_ih, bias_hh) -> (output, h_n, c_n)`: a batch-first LSTM layer
    that vmap batches as one block-diagonal LSTM."""

    @staticmethod
    def forward(inputs, weight_ih, weight_hh, bias_ih, bias_hh):
        return _lstm(inputs, weight_ih, weight_hh, bias_ih, bias_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        device_type = inputs[0].device.type
        # the forward ran under the caller's autocast; the recompute in backward must too (the engine runs without it)
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))

    @staticmethod
    def backward(ctx, *output_grads):
        # Only reached outside vmap (inside it, autograd records the block-diagonal call itself): recompute the
        # forward with autograd on and differentiate it, as activation checkpointing does.
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            leaves = [value.detach().requires_grad_(needed) for value, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)]
            outputs = _lstm(*leaves)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = [torch.zeros_like(out) if grad is None else grad for grad, out in zip(output_grads, outputs)]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        return tuple(next(found) if leaf.requires_grad else None for leaf in leaves)

    @staticmethod
    def vmap(info, in_dims, inputs, weight_ih, weight_hh, bias_ih, bias_hh):
        copies = info.batch_size

        def stacked(value, dim):  # (K, ...): a tensor shared by all copies (dim None) is repeated
            return value.movedim(dim, 0) if dim is not None else value.unsqueeze(0).expand(copies, *value.shape)

        inputs, weight_ih, weight_hh, bias_ih, bias_hh = (
            stacked(value, dim) for value, dim in zip((inputs, weight_ih, weight_hh, bias_ih, bias_hh), in_dims)
        )
        _, batch, steps, width = inputs.shape  # (K, B, T, D)
        hidden = weight_hh.shape[-1]
        wide_inputs = inputs.permute(1, 2, 0, 3).reshape(batch, steps, copies * width)  # (B, T, K*D): copy-major features
        output, h_n, c_n = _lstm(
            wide_inputs, _block_diagonal_gates(weight_ih), _block_diagonal_gates(weight_hh),
            _interleaved_gate_bias(bias_ih), _interleaved_gate_bias(bias_hh),
        )
        output = output.view(batch, steps, copies, hidden).permute(2, 0, 1, 3)  # (K, B, T, H)
        h_n, c_n = (state.view(1, batch, copies, hidden).permute(2, 0, 1, 3) for state in (h_n, c_n))  # (K, 1, B, H)
        return (output, h_n, c_n), (0, 0, 0)


def is_stackable_lstm(module: nn.Module) -> bool:
    """Plain LSTMs the rule covers: one layer, one direction, batch first, with biases, no projection."""
    return (
        type(module) is nn.LSTM
        and module.num_layers == 1
        and not module.bidirectional
        and module.batch_first
        and module.bias
        and module.proj_size == 0
    )


def _stackable_forward(self, inputs, hx=None):
    if hx is not None or not torch.is_tensor(inputs) or inputs.dim() != 3:
        raise ValueError("Stacked LSTM candidates need a (batch, time, features) tensor and no initial state; evaluate "
                         "candidates one at a time instead: RewardEvaluator(stack_candidates=False) or candidates_per_pass=1.")
    output, h_n, c_n = BlockDiagonalLSTM.apply(inputs, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)
    return output, (h_n, c_n)


@contextlib.contextmanager
def stackable_lstms(model: nn.Module):
    """Inside this context, `model`'s LSTMs (all must be `is_stackable_lstm`) can run under vmap."""
    lstms = [module for module in model.modules() if isinstance(module, nn.RNNBase)]
    unsupported = [type(module).__name__ for module in lstms if not is_stackable_lstm(module)]
    if unsupported:
        raise ValueError(f"Cannot stack {unsupported}: only one-layer, unidirectional, batch-first LSTMs with biases.")
    previous = [module.__dict__.get("forward") for module in lstms]  # an instance's own forward, if it had one
    for module in lstms:
        module.forward = types.MethodType(_stackable_forward, module)  # an instance attribute shadows nn.LSTM.forward
    try:
        yield model
    finally:
        for module, forward in zip(lstms, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
