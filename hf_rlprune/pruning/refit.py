"""Refit after masking: each pruned layer's consumer is refitted by ridge least squares so that its outputs on a few
calibration batches match the unpruned model's (the reconstruction step of ThiNet / channel pruning).

Masking a group removes inputs of the next layer (its consumer: a conv, a dense layer, an LSTM's input projection).
The consumer's weights on the kept inputs, and its bias, are moved to the closest fit of the reference outputs:

    min_{dW, db} || (X_kept (W_kept + dW)^T + b + db) - Y_ref ||^2 + ridge * mean_eig(X^T X) * ||dW||^2

X_kept is the masked model's input to the consumer (after the consumers before it were refitted, so errors do not
accumulate), Y_ref the reference model's output of the same linear map. Convs are fitted on their im2col patches.
The ridge is relative (to the mean eigenvalue of the centred Gram matrix) and pulls towards the current weights,
so a consumer with more inputs than calibration rows (a dense layer after a flatten) is corrected, not overfitted.
Recurrent weights (an LSTM's own hidden-to-hidden columns) are not refitted.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .groups import PrunableGroup, get_prunable_groups
from .masks import enforce_masks


MAX_ROWS = 16384  # calibration rows per consumer: conv patches are subsampled to this many


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the consumer's input is known."""


def _module_and_param(model: nn.Module, tensor_name: str) -> tuple[str, nn.Module, str]:
    module_name, _, param_name = tensor_name.rpartition(".")
    return module_name, model.get_submodule(module_name), param_name


def _linear_map(module: nn.Module, param_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer's weight as (out, in features) and its bias: what the rows of `_rows` multiply."""
    if isinstance(module, nn.LSTM):  # the input projection of the gates: weight_ih_l0 and bias_ih_l0
        weight, bias = getattr(module, param_name), getattr(module, param_name.replace("weight", "bias"), None)
        return weight.double(), bias.double() if bias is not None else None
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight.flatten(1).double(), module.bias.double() if module.bias is not None else None
    raise TypeError(f"Cannot refit a {type(module).__name__} consumer; refit knows Linear, Conv2d and LSTM input projections.")


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # symmetric for odd kernels, which "same" with unfold needs
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"Cannot refit a conv with padding='same' and the even kernel {conv.kernel_size}.")
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return conv.padding


def _rows(module: nn.Module, inputs: torch.Tensor, mask: torch.Tensor | None, max_rows: int, seed: int) -> torch.Tensor:
    """One batch's input to the consumer as float64 rows of features, in the order of `_linear_map`'s columns:
    (N, in) for dense, (real tokens, in) for an LSTM (padding dropped), (N * L, C * k * k) patches for a conv. Over
    `max_rows`, a random subset (seeded: the same rows for every model on the same batch, so reference and masked
    rows pair up; random, not strided, so no image column or token position is favoured)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, module.dilation, _padding(module), module.stride)  # (N, C*k*k, L)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N*L, C*k*k)
    elif inputs.dim() == 3 and mask is not None and mask.shape == inputs.shape[:2]:
        rows = inputs[mask.to(inputs.device).bool()]  # (real tokens, in): padding never reaches the prediction
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])  # (N[*T], in)
    if rows.shape[0] > max_rows:
        chosen = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
        rows = rows[chosen.to(rows.device)]
    return rows.double()  # inputs captured under autocast are half precision; TF32 matmuls would be too coarse


def _kept_columns(module: nn.Module, group: PrunableGroup, slice_, keep: torch.Tensor) -> torch.Tensor:
    units = torch.nonzero(keep.cpu()).flatten()
    columns = slice_.indices(units)  # along the weight's dim 1
    if isinstance(module, nn.Conv2d):  # each input channel owns k*k consecutive patch features
        taps = module.weight[0, 0].numel()
        columns = (columns[:, None] * taps + torch.arange(taps)[None, :]).reshape(-1)
    return columns


def _consumer_rows(model: nn.Module, batches: list[dict], module_names: list[str], max_rows: int,
                   stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Rows (`_rows`) of what each named module receives when `model` runs on `batches`, concatenated over batches;
    with `stop_after`, each forward stops once that module's input is known."""
    captured: dict[str, torch.Tensor] = {}
    per_batch = max(1, max_rows // max(1, len(batches)))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}

    def hook(module, args, name):
        captured[name] = args[0].detach()
        if name == stop_after:
            raise _Captured

    handles = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: hook(module, args, name))
               for name in module_names]
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                captured.clear()
                try:
                    model(**{key: value for key, value in batch.items() if key != "labels"})
                except _Captured:
                    pass
                for name in module_names:
                    rows[name].append(_rows(model.get_submodule(name), captured[name], batch.get("attention_mask"), per_batch, seed=index))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in rows.items()}


def reference_outputs(model: nn.Module, batches: list[dict], max_rows: int = MAX_ROWS) -> dict[str, torch.Tensor]:
    """Per consumer tensor name, the rows of its linear map's output on `batches` in `model` (the reference)."""
    consumers = [slice_.name for group in get_prunable_groups(model) for slice_ in group.consumers]
    modules = {name: _module_and_param(model, name) for name in consumers}
    inputs = _consumer_rows(model, batches, sorted({module_name for module_name, _, _ in modules.values()}), max_rows)
    outputs = {}
    with torch.no_grad():
        for name, (module_name, module, param_name) in modules.items():
            weight, bias = _linear_map(module, param_name)
            outputs[name] = inputs[module_name] @ weight.T + (bias if bias is not None else 0.0)  # (rows, out)
    return outputs


def _ridge_update(features: torch.Tensor, residual: torch.Tensor, ridge: float, fit_bias: bool):
    """dW (out, in) and db (out,) minimising ||features dW^T + db - residual||^2 + lambda ||dW||^2."""
    features, residual = features.double(), residual.double()
    if fit_bias:
        feature_mean, residual_mean = features.mean(0), residual.mean(0)
        features, residual = features - feature_mean, residual - residual_mean
    rows, width = features.shape
    strength = ridge * float(features.pow(2).sum()) / width + 1e-12  # ridge x mean eigenvalue of the Gram matrix
    if width <= rows:  # primal: (X^T X + lambda I) dW^T = X^T R
        gram = features.T @ features
        delta = torch.linalg.solve(gram + strength * torch.eye(width, dtype=gram.dtype, device=gram.device), features.T @ residual)
    else:  # dual, when inputs outnumber rows: dW^T = X^T (X X^T + lambda I)^-1 R
        kernel = features @ features.T
        delta = features.T @ torch.linalg.solve(kernel + strength * torch.eye(rows, dtype=kernel.dtype, device=kernel.device), residual)
    bias_delta = residual_mean - feature_mean @ delta if fit_bias else None
    return delta.T, bias_delta


@torch.no_grad()
def refit_consumers(model: nn.Module, masks: dict[str, torch.Tensor], batches: list[dict], reference: dict[str, torch.Tensor],
                    ridge: float = 0.1, max_rows: int = MAX_ROWS) -> None:
    """Refit, in place and in forward order, the consumer of every group of the masked `model` to `reference`
    (`reference_outputs` of the unpruned model on the same `batches`). Masked weights stay zero."""
    if ridge < 0:
        raise ValueError(f"ridge = {ridge} must be >= 0 (0: plain least squares).")
    upstream_pruned = False
    for group in get_prunable_groups(model):
        keep = masks[group.name].bool() if group.name in masks else torch.ones(group.width, dtype=torch.bool)
        upstream_pruned = upstream_pruned or not bool(keep.all())
        if not upstream_pruned:  # nothing before this consumer changed: it already reproduces the reference
            continue
        for slice_ in group.consumers:
            module_name, module, param_name = _module_and_param(model, slice_.name)
            weight, bias = _linear_map(module, param_name)
            columns = _kept_columns(module, group, slice_, keep).to(weight.device)
            rows = _consumer_rows(model, batches, [module_name], max_rows, stop_after=module_name)[module_name]
            if rows.shape[0] != reference[slice_.name].shape[0]:
                raise ValueError(f"{slice_.name}: {rows.shape[0]} calibration rows against {reference[slice_.name].shape[0]} in the "
                                 "reference; compute reference_outputs on the same batches.")
            residual = reference[slice_.name] - (rows @ weight.T + (bias if bias is not None else 0.0))  # what the masking lost
            delta, bias_delta = _ridge_update(rows.index_select(1, columns), residual, ridge, fit_bias=bias is not None)
            param = getattr(module, param_name)
            updated = param.detach().flatten(1).clone()  # (out, in features)
            updated[:, columns] += delta.to(updated.dtype)
            param.copy_(updated.view_as(param))
            if bias is not None:  # `bias` is a float64 copy: update the parameter itself
                bias_param = getattr(module, param_name.replace("weight", "bias") if isinstance(module, nn.LSTM) else "bias")
                bias_param.add_(bias_delta.to(bias_param.dtype))
            enforce_masks(model)  # the consumer may produce a masked group itself: its pruned units stay dead
