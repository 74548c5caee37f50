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

import contextlib
import functools

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


def _pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's zero padding as F.pad takes it, (left, right, top, bottom). For padding="same" torch puts
    d * (k - 1) // 2 before and the rest after, which is uneven for even kernels."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"Cannot refit a conv with padding_mode={conv.padding_mode!r}; refit knows zero padding.")
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (before_h, after_h), (before_w, after_w) = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                                                    for k, d in zip(conv.kernel_size, conv.dilation)]
        return (before_w, after_w, before_h, after_h)
    pad_h, pad_w = conv.padding
    return (pad_w, pad_w, pad_h, pad_h)


@functools.lru_cache(maxsize=64)
def _row_subset(total: int, max_rows: int, seed: int) -> torch.Tensor:
    """A seeded random subset of `max_rows` of `total` rows, sorted: the same rows for every model on the same
    calibration batch (reference and masked rows pair up); random, not strided, so no image column or token
    position is favoured. Cached: every candidate of a search draws it again."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values


def _conv_patches(conv: nn.Conv2d, inputs: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
    """im2col rows (R, C * kh * kw) of `inputs` (N, C, H, W) for the conv's output positions `chosen` (flat indices over
    N * out_h * out_w; None: all). Gathers only the chosen patches: unfolding every patch first costs k*k copies of
    the whole activation."""
    padded = F.pad(inputs, _pads(conv))  # (N, C, H + top + bottom, W + left + right)
    if chosen is None:
        patches = F.unfold(padded, conv.kernel_size, conv.dilation, 0, conv.stride)  # (N, C*k*k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N*L, C*k*k)
    (kernel_h, kernel_w), (dilation_h, dilation_w), (stride_h, stride_w) = conv.kernel_size, conv.dilation, conv.stride
    out_h, out_w = _conv_output_size(conv, inputs)
    image, position = chosen // (out_h * out_w), chosen % (out_h * out_w)  # (R,), (R,)
    top = (position // out_w) * stride_h  # (R,)
    left = (position % out_w) * stride_w  # (R,)
    taps_h = torch.arange(kernel_h, device=inputs.device) * dilation_h
    taps_w = torch.arange(kernel_w, device=inputs.device) * dilation_w
    patches = padded[image[:, None, None], :, (top[:, None] + taps_h)[:, :, None], (left[:, None] + taps_w)[:, None, :]]  # (R, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(len(chosen), -1)  # (R, C*kh*kw): unfold's feature order


def _conv_output_size(conv: nn.Conv2d, inputs: torch.Tensor) -> tuple[int, int]:
    """(out_h, out_w) of `conv` on `inputs` (N, C, H, W)."""
    left, right, top, bottom = _pads(conv)
    return tuple((inputs.shape[2 + axis] + padding - conv.dilation[axis] * (conv.kernel_size[axis] - 1) - 1) // conv.stride[axis] + 1
                 for axis, padding in ((0, top + bottom), (1, left + right)))


def _rows(module: nn.Module, inputs: torch.Tensor, mask: torch.Tensor | None, max_rows: int, seed: int) -> torch.Tensor:
    """The consumer's input as float64 rows of features, in the order of `_linear_map`'s columns: (N, in) for dense,
    (real tokens, in) for an LSTM (padding dropped), (N * L, C * k * k) patches for a conv; over `max_rows`, the
    seeded random subset `_row_subset`."""
    if isinstance(module, nn.Conv2d):
        out_h, out_w = _conv_output_size(module, inputs)
        total = inputs.shape[0] * out_h * out_w  # patches: one per image and output position
        chosen = _row_subset(total, max_rows, seed).to(inputs.device) if total > max_rows else None
        return _conv_patches(module, inputs, chosen).double()  # half precision under autocast; TF32 too coarse
    if inputs.dim() == 3 and mask is not None and mask.shape == inputs.shape[:2]:
        rows = inputs[mask.to(inputs.device).bool()]  # (real tokens, in): padding never reaches the prediction
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])  # (N[*T], in)
    if rows.shape[0] > max_rows:
        rows = rows[_row_subset(rows.shape[0], max_rows, seed).to(rows.device)]
    return rows.double()


def _kept_columns(module: nn.Module, group: PrunableGroup, slice_, keep: torch.Tensor) -> torch.Tensor:
    units = torch.nonzero(keep.cpu()).flatten()
    columns = slice_.indices(units)  # along the weight's dim 1
    if isinstance(module, nn.Conv2d):  # each input channel owns k*k consecutive patch features
        taps = module.weight[0, 0].numel()
        columns = (columns[:, None] * taps + torch.arange(taps)[None, :]).reshape(-1)
    return columns


def _calibration_batch(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The model inputs of `batches` as one batch (labels dropped), so each refit is one forward: token tensors of
    different lengths are right-padded (the models take right padding; the attention mask marks it)."""
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if "attention_mask" not in batches[0] and "input_ids" in batches[0]:
        # padding, the batches' own or added here, must not count as tokens: mark it as the model marks its pad tokens
        batches = [{**batch, "attention_mask": (batch["input_ids"] != pad_token_id).long() if pad_token_id is not None
                    else torch.ones_like(batch["input_ids"])} for batch in batches]
    merged = {}
    for key in batches[0]:
        if key == "labels":
            continue
        values = [batch[key] for batch in batches]
        if isinstance(values[0], list):  # per-example extras a collator may add (ids, say), which the model ignores
            merged[key] = [item for value in values for item in value]
            continue
        if not torch.is_tensor(values[0]) or values[0].dim() == 0:  # per-batch settings (a flag, a scale): the first's
            merged[key] = values[0]
            continue
        length = max(value.shape[1] for value in values) if values[0].dim() == 2 else None
        if length is not None and any(value.shape[1] != length for value in values):
            fill = (pad_token_id or 0) if key == "input_ids" else 0
            values = [F.pad(value, (0, length - value.shape[1]), value=fill) for value in values]  # (B, T) -> (B, length)
        merged[key] = torch.cat(values)
    return merged


def _forward_with_input_hooks(model: nn.Module, batch: dict, module_names: list[str], on_input) -> None:
    """One forward of `model` on `batch` in which `on_input(name, module, input)` runs as each named module receives
    its input, before the module runs (so it may change that module's weights); the forward stops as soon as
    `on_input` returns True (nothing further is needed)."""
    def hook(module, args, name):
        if on_input(name, module, args[0].detach()):
            raise _Captured

    handles = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: hook(module, args, name))
               for name in module_names]
    try:
        with torch.no_grad():
            model(**batch)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()


def reference_outputs(model: nn.Module, batches: list[dict], max_rows: int = MAX_ROWS) -> dict[str, torch.Tensor]:
    """Per consumer tensor name, the rows of its linear map's output on `batches` in `model` (the reference)."""
    consumers = [slice_.name for group in get_prunable_groups(model) for slice_ in group.consumers]
    modules = {name: _module_and_param(model, name) for name in consumers}
    module_names = sorted({module_name for module_name, _, _ in modules.values()})
    batch = _calibration_batch(model, batches)
    inputs: dict[str, torch.Tensor] = {}

    def capture(name, module, tensor):
        if name in inputs:  # a module called twice: its first input, as refit_consumers fits on
            return False
        inputs[name] = _rows(module, tensor, batch.get("attention_mask"), max_rows, seed=0)
        return len(inputs) == len(module_names)

    _forward_with_input_hooks(model, batch, module_names, capture)
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
                    ridge: float = 0.01, max_rows: int = MAX_ROWS) -> list[str]:
    """Refit, in place and in forward order, the consumer of every group of the masked `model` to `reference`
    (`reference_outputs` of the unpruned model on the same `batches`). Masked weights stay zero. Returns the names
    of the parameters it changed (consumer weights and biases).

    One forward over the calibration batches: each consumer is refitted as it receives its input, before it runs,
    so what reaches the next consumer already went through the refitted ones."""
    if ridge < 0:
        raise ValueError(f"ridge = {ridge} must be >= 0 (0: plain least squares).")
    planned: dict[str, list[tuple[PrunableGroup, object, torch.Tensor]]] = {}  # module name -> its slices to refit
    upstream_pruned = False
    for group in get_prunable_groups(model):
        keep = masks[group.name].bool() if group.name in masks else torch.ones(group.width, dtype=torch.bool)
        upstream_pruned = upstream_pruned or not bool(keep.all())
        if upstream_pruned:  # before the first pruned group every consumer already reproduces the reference
            for slice_ in group.consumers:
                planned.setdefault(_module_and_param(model, slice_.name)[0], []).append((group, slice_, keep))
    if not planned:
        return []
    batch = _calibration_batch(model, batches)
    updated_names, done = [], set()

    def refit_module(module_name, module, inputs):
        if module_name in done:  # a module called twice in one forward is fitted on its first input
            return False
        done.add(module_name)
        rows = _rows(module, inputs, batch.get("attention_mask"), max_rows, seed=0)
        for group, slice_, keep in planned[module_name]:
            updated_names.extend(_refit_slice(model, module_name, module, group, slice_, keep, rows, reference[slice_.name], ridge))
        enforce_masks(model)  # the consumer may produce a masked group itself: its pruned units stay dead
        return len(done) == len(planned)

    _forward_with_input_hooks(model, batch, list(planned), refit_module)
    if done != set(planned):
        raise RuntimeError(f"The forward never reached {sorted(set(planned) - done)}; cannot refit consumers the model does not run.")
    return updated_names


def _refit_slice(model, module_name, module, group, slice_, keep, rows, target, ridge) -> list[str]:
    """Move one consumer tensor's kept columns (and its bias) to the ridge fit of `target` from `rows`."""
    param_name = slice_.name.rpartition(".")[2]
    weight, bias = _linear_map(module, param_name)
    columns = _kept_columns(module, group, slice_, keep).to(weight.device)
    if rows.shape[0] != target.shape[0]:
        raise ValueError(f"{slice_.name}: {rows.shape[0]} calibration rows against {target.shape[0]} in the "
                         "reference; compute reference_outputs on the same batches.")
    residual = target - (rows @ weight.T + (bias if bias is not None else 0.0))  # what the masking lost
    delta, bias_delta = _ridge_update(rows.index_select(1, columns), residual, ridge, fit_bias=bias is not None)
    param = getattr(module, param_name)
    updated = param.detach().flatten(1).clone()  # (out, in features)
    updated[:, columns] += delta.to(updated.dtype)
    param.copy_(updated.view_as(param))
    if bias is None:
        return [slice_.name]
    bias_name = param_name.replace("weight", "bias") if isinstance(module, nn.LSTM) else "bias"
    getattr(module, bias_name).add_(bias_delta.to(getattr(module, bias_name).dtype))  # `bias` above is a float64 copy
    return [slice_.name, f"{module_name}.{bias_name}"]


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's batch norms that keep running statistics (what `recalibrate_batch_norm` recomputes)."""
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: list[dict], autocast=None) -> int:
    """Recompute every batch norm's running mean and variance as the masked (and refitted) `model`'s own statistics
    on `batches` (adaptive BN, as in EagleEye): masking shifts the distribution each norm sees, and the dense model's
    stale statistics then dominate the accuracy a candidate is ranked by. Only the norms run in training mode (dropout
    stays off); the statistics are plain averages over the batches (momentum None). Returns how many norms were
    recalibrated (0: the model has none, and nothing ran)."""
    norms = batch_norms(model)
    if not norms:
        return 0
    was_training, momenta = model.training, [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: every batch counts the same
        norm.train()
    try:
        with autocast or contextlib.nullcontext():
            for batch in batches:
                model(**{key: value for key, value in batch.items() if key != "labels"})
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    enforce_masks(model)  # pruned channels' statistics stay zero, as masking left them
    return len(norms)
