"""Physical surgery: turn a masked model into a smaller model of the same class whose config records the widths."""

import torch
from torch import nn

from .groups import check_supported, config_with_widths, get_prunable_groups
from .masks import get_masks, validate_masks


@torch.no_grad()
def compact(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A new, physically smaller copy of `model` keeping the units in `masks` (default: the masks applied to it).

    The copy is a plain model of the same class: `save_pretrained` / `from_pretrained` (also with
    `trust_remote_code`) need no pruning code, and its outputs equal the masked model's.
    """
    check_supported(model)
    masks = get_masks(model) if masks is None else masks
    validate_masks(model, masks)
    groups = get_prunable_groups(model)
    kept_units = {
        group.name: torch.nonzero(masks[group.name].bool().cpu()).flatten() if group.name in masks else torch.arange(group.width)
        for group in groups
    }
    # (tensor name, dim) -> indices to keep along that dim
    selections: dict[tuple[str, int], torch.Tensor] = {}
    for group in groups:
        for slice_ in group.producers + group.consumers + group.internal:
            selections[(slice_.name, slice_.dim)] = slice_.indices(kept_units[group.name])

    new_config = config_with_widths(model.config, {name: len(units) for name, units in kept_units.items()})
    reference = next(model.parameters())
    small = type(model)(new_config).to(device=reference.device, dtype=reference.dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        for (slice_name, dim), indices in selections.items():
            if slice_name == name:
                tensor = tensor.index_select(dim, indices.to(tensor.device))
        state[name] = tensor.clone()
    small.load_state_dict(state, strict=True)
    small.train(model.training)
    return small
