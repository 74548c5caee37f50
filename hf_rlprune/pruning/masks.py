"""Masks while training: a pruned unit's weights are zeroed and its gradients cut, so its output is exactly zero,
it gets no update, and the optimizer's moments (zeroed too) never revive it. Parameter shapes never change, so the
Trainer's optimizer, DDP and mixed precision keep working; `compact` removes the units physically at the end.
"""

import torch
from torch import nn

from .groups import check_supported, get_prunable_groups
from .importance import TaylorAccumulator, unit_scores

_MASKS_ATTR = "_rlprune_masks"
_HOOKS_ATTR = "_rlprune_hook_handles"
_MULTIPLIERS_ATTR = "_rlprune_multipliers"


def widths_from_keep_ratios(model_or_config, keep_ratios) -> dict[str, int]:
    """Kept units per group for keep ratios in (0, 1] (a dict by group name, or a list in group order)."""
    groups = get_prunable_groups(model_or_config)
    if not isinstance(keep_ratios, dict):
        keep_ratios = list(keep_ratios)
        if len(keep_ratios) != len(groups):
            raise ValueError(f"Got {len(keep_ratios)} keep ratios for {len(groups)} prunable groups {[g.name for g in groups]}.")
        keep_ratios = {group.name: ratio for group, ratio in zip(groups, keep_ratios)}
    by_name = {group.name: group for group in groups}
    unknown = sorted(set(keep_ratios) - set(by_name))
    if unknown:
        raise KeyError(f"Unknown prunable group(s) {unknown}; this model's groups are {list(by_name)}.")
    widths = {}
    for name, ratio in keep_ratios.items():
        ratio = float(ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"Keep ratio {ratio} for group {name!r} is outside (0, 1]; 1 keeps every unit.")
        widths[name] = max(1, int(round(ratio * by_name[name].width)))  # at least one unit survives
    return widths


def masks_from_widths(
    model: nn.Module,
    widths: dict[str, int],
    criterion: str = "l1",
    taylor: TaylorAccumulator | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that keep the `widths[name]` most important units of each group.

    Units already masked on the model rank below every live unit, so successive rounds prune a nested sequence.
    """
    check_supported(model)
    groups = {group.name: group for group in get_prunable_groups(model)}
    unknown = sorted(set(widths) - set(groups))
    if unknown:
        raise KeyError(f"Unknown prunable group(s) {unknown}; this model's groups are {list(groups)}.")
    current = get_masks(model)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, group in groups.items():
        # a group left out keeps its current width: rounds stay nested, nothing an earlier round pruned revives
        width = int(widths[name]) if name in widths else int(current[name].sum()) if name in current else group.width
        if not 1 <= width <= group.width:
            raise ValueError(f"Width {width} for group {name!r} must be in [1, {group.width}].")
        scores = unit_scores(model, group, criterion, taylor=taylor, generator=generator).float().cpu()
        if name in current:
            scores = torch.where(current[name].cpu(), scores, torch.full_like(scores, -float("inf")))
        # stable sort so ties (e.g. all-zero units) break by index, deterministically
        order = torch.sort(scores, descending=True, stable=True).indices
        keep = torch.zeros(group.width, dtype=torch.bool)
        keep[order[:width]] = True
        masks[name] = keep
    return masks


def validate_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    groups = {group.name: group for group in get_prunable_groups(model)}
    for name, mask in masks.items():
        if name not in groups:
            raise KeyError(f"Mask for unknown group {name!r}; this model's groups are {list(groups)}.")
        if mask.dim() != 1 or mask.numel() != groups[name].width:
            raise ValueError(
                f"Mask for {name!r} has shape {tuple(mask.shape)}; expected ({groups[name].width},), one entry per unit."
            )
        if not bool(mask.bool().any()):
            raise ValueError(f"Mask for {name!r} removes every unit; at least one unit must be kept.")


def _slice_multiplier(param: torch.Tensor, slice_, mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor broadcastable to `param` that zeroes the slices of the masked units."""
    dropped = torch.nonzero(~mask, as_tuple=False).flatten().to(param.device)
    vector = torch.ones(param.shape[slice_.dim], device=param.device, dtype=param.dtype)
    vector[slice_.indices(dropped)] = 0
    shape = [1] * param.dim()
    shape[slice_.dim] = -1
    return vector.view(shape)


@torch.no_grad()
def mask_multipliers(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter or buffer name, the 0/1 tensor (broadcastable to it) that zeroes the units `masks` prune."""
    check_supported(model)
    validate_masks(model, masks)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    multipliers: dict[str, torch.Tensor] = {}
    for group in get_prunable_groups(model):
        if group.name not in masks:
            continue
        mask = masks[group.name].bool().cpu()
        for slice_ in group.producers:
            factor = _slice_multiplier(tensors[slice_.name], slice_, mask)
            multipliers[slice_.name] = factor * multipliers[slice_.name] if slice_.name in multipliers else factor
    return multipliers


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Mask `model` in place (replacing earlier masks): zero pruned units' weights and cut their gradients."""
    multipliers = mask_multipliers(model, masks)
    remove_masks(model)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    handles = []
    params = dict(model.named_parameters())
    for name, factor in multipliers.items():
        tensors[name].mul_(factor)
        if name in params and params[name].requires_grad:  # a frozen parameter gets no gradient to cut
            # the factor follows the gradient: the model may be moved or cast after masking (e.g. by the Trainer)
            handles.append(params[name].register_hook(lambda grad, factor=factor: grad * factor.to(grad.device, grad.dtype)))
    setattr(model, _MASKS_ATTR, {name: mask.bool().cpu().clone() for name, mask in masks.items()})
    setattr(model, _HOOKS_ATTR, handles)
    setattr(model, _MULTIPLIERS_ATTR, multipliers)


def remove_masks(model: nn.Module) -> None:
    """Stop masking (pruned weights stay zero until trained)."""
    for handle in getattr(model, _HOOKS_ATTR, []):
        handle.remove()
    for attr in (_MASKS_ATTR, _HOOKS_ATTR, _MULTIPLIERS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-masks applied to `model` (group name -> bool tensor); empty when it is not masked."""
    return dict(getattr(model, _MASKS_ATTR, {}))


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-zero masked weights and the optimizer's per-parameter state (Adam moments) for them.

    Gradient hooks already keep masked weights at zero; this guards against anything that writes weights directly
    (weight loading, EMA, an optimizer with state from before masking).
    """
    multipliers = getattr(model, _MULTIPLIERS_ATTR, {})
    if not multipliers:
        return
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, factor in multipliers.items():
        tensors[name].mul_(factor.to(tensors[name].device, tensors[name].dtype))
    if optimizer is None:
        return
    by_param = {id(tensors[name]): factor for name, factor in multipliers.items()}
    for param, state in optimizer.state.items():
        factor = by_param.get(id(param))
        if factor is None:
            continue
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(factor.to(value.device, value.dtype))


def masked_widths(model: nn.Module) -> dict[str, int]:
    """Units alive per group: the mask's count where masked, the full width otherwise."""
    masks = get_masks(model)
    return {group.name: int(masks[group.name].sum()) if group.name in masks else group.width for group in get_prunable_groups(model)}

