"""Importance criteria: one score per unit of a group; the lowest-scoring units are pruned first.

Scores come from the unit's producer slices (its own weights), so they are comparable within a group only.
"""

import logging

import torch
from torch import nn

from .groups import PrunableGroup, get_prunable_groups

IMPORTANCE_CRITERIA = ("l1", "l2", "taylor", "random")

logger = logging.getLogger(__name__)


def _unit_view(tensor: torch.Tensor, group: PrunableGroup, slice_) -> torch.Tensor:
    """Rearrange a producer tensor to (units, everything else) so per-unit reductions are one call."""
    moved = tensor.detach().movedim(slice_.dim, 0)  # (D, ...)
    moved = moved.reshape(slice_.repeats, group.width, slice_.block, -1)  # (R, U, block, rest)
    return moved.permute(1, 0, 2, 3).reshape(group.width, -1).float()  # (U, R * block * rest)


def magnitude_scores(model: nn.Module, group: PrunableGroup, p: int) -> torch.Tensor:
    """Sum over the unit's weights (batch-norm statistics excluded) of |w|^p; L1 for p=1, squared L2 for p=2."""
    tensors = dict(model.named_parameters())
    scores = torch.zeros(group.width, device=next(model.parameters()).device)
    for slice_ in group.producers:
        if slice_.name in tensors:  # parameters only: running statistics say nothing about importance
            scores += _unit_view(tensors[slice_.name], group, slice_).abs().pow(p).sum(dim=1)
    return scores


class TaylorAccumulator:
    """First-order Taylor importance |w * dL/dw| summed over the unit's weights, accumulated over steps.

    Call `accumulate(model)` after each backward pass (the callback does it before every optimizer step).
    """

    def __init__(self):
        self.scores: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped_steps = 0  # with non-finite gradients
        self._warned = False

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add this step's scores; a step with non-finite gradients (an fp16 overflow, which the optimizer skips too)
        is skipped, so one overflow cannot turn every score into inf or nan."""
        params = dict(model.named_parameters())
        step_scores = {}
        for group in get_prunable_groups(model):
            total = None
            for slice_ in group.producers:
                param = params.get(slice_.name)
                if param is None or param.grad is None:
                    continue
                contribution = _unit_view(param * param.grad, group, slice_).abs().sum(dim=1)
                total = contribution if total is None else total + contribution
            if total is not None:
                step_scores[group.name] = total
        if not all(bool(torch.isfinite(total).all()) for total in step_scores.values()):
            self.skipped_steps += 1
            return
        for name, total in step_scores.items():
            self.scores[name] = total if name not in self.scores else self.scores[name] + total
        self.steps += 1

    def group_scores(self, group: PrunableGroup) -> torch.Tensor:
        if group.name not in self.scores:
            raise RuntimeError(
                f"No Taylor scores for {group.name!r}: call TaylorAccumulator.accumulate(model) after backward "
                "passes before pruning with importance='taylor'."
            )
        return self.scores[group.name] / max(self.steps, 1)


def unit_scores(
    model: nn.Module,
    group: PrunableGroup,
    criterion: str = "l1",
    taylor: TaylorAccumulator | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance of each unit of `group` under `criterion`; shape (group.width,)."""
    if criterion == "l1":
        return magnitude_scores(model, group, p=1)
    if criterion == "l2":
        return magnitude_scores(model, group, p=2)
    if criterion == "taylor":
        if taylor is None:
            raise ValueError("importance='taylor' needs a TaylorAccumulator fed with gradients during training.")
        if taylor.steps == 0 and taylor.skipped_steps > 0:  # e.g. a round at the first step, which overflowed in fp16
            if not taylor._warned:
                logger.warning("No finite Taylor scores yet: all %d steps so far had non-finite gradients (fp16 overflow); "
                               "ranking units by their L1 norm until one has.", taylor.skipped_steps)
                taylor._warned = True
            return magnitude_scores(model, group, p=1)
        return taylor.group_scores(group)
    if criterion == "random":
        return torch.rand(group.width, generator=generator)
    raise ValueError(f"Unknown importance criterion {criterion!r}; choose one of {IMPORTANCE_CRITERIA}.")
