"""Reward evaluation: accuracy on the reward split of a candidate allocation, after a short recovery.

Accuracy measured right after masking ranks allocations badly (a policy it picks loses to uniform pruning once
both are fine-tuned), so each candidate is masked on a scratch copy of the live model, trained for
`recovery_steps` on a fixed set of training batches, and only then measured. Every candidate in a round sees the
same weights, the same recovery batches and the same reward batches, so rewards are comparable and deterministic.
"""

import contextlib
import math

import torch
from torch import nn

from .pruning import TaylorAccumulator, apply_masks, get_masks, masks_from_widths, remove_masks


def move_to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@torch.no_grad()
def batched_accuracy(model: nn.Module, batches: list[dict], autocast_dtype=None) -> float:
    """Fraction of correct argmax predictions over pre-collated batches already on the model's device."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long), 0
    autocast = _autocast(model, autocast_dtype)
    with autocast:
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            predictions = model(**inputs).logits.argmax(dim=-1)  # (B,)
            correct = correct.to(predictions.device) + (predictions == batch["labels"]).sum()
            total += batch["labels"].numel()
    model.train(was_training)
    return float(correct) / max(total, 1)  # one device sync per evaluation, not per batch


def _autocast(model, dtype):
    device = next(model.parameters()).device
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


class RewardEvaluator:
    """`evaluate(widths) -> accuracy` for PruningEnv, on a scratch copy of the model frozen at the round's start.

    Args:
        reward_batches: collated batches of the reward split (moved to the device once).
        recovery_batches: collated training batches used for the short recovery (moved to the device once).
        recovery_steps: optimizer steps of recovery per candidate (0 measures right after masking).
        recovery_lr: Adam learning rate of the recovery.
        importance: criterion that picks which units a width keeps.
    """

    def __init__(
        self,
        reward_batches: list[dict],
        recovery_batches: list[dict] | None = None,
        recovery_steps: int = 0,
        recovery_lr: float = 1e-3,
        importance: str = "l1",
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ):
        if not reward_batches:
            raise ValueError("The reward split is empty: give at least one batch of held-out training examples.")
        if recovery_steps < 0:
            raise ValueError(f"recovery_steps = {recovery_steps} must be >= 0.")
        self.reward_batches_cpu = reward_batches
        self.recovery_batches_cpu = recovery_batches or []
        self.recovery_steps, self.recovery_lr = recovery_steps, recovery_lr
        self.importance, self.seed, self.autocast_dtype = importance, seed, autocast_dtype
        self.evaluations = 0
        self._scratch = None
        self._device = None

    def begin_round(self, model: nn.Module, taylor: TaylorAccumulator | None = None, recovery_batches: list[dict] | None = None) -> None:
        """Freeze the live model's weights and masks as this round's starting point (and its recovery batches)."""
        device = next(model.parameters()).device
        if self._device != device:
            self._device = device
            self.reward_batches = [move_to_device(b, device) for b in self.reward_batches_cpu]
            self.recovery_batches = [move_to_device(b, device) for b in self.recovery_batches_cpu]
        if recovery_batches is not None:
            self.recovery_batches = [move_to_device(b, device) for b in recovery_batches]
        if self.recovery_steps and not self.recovery_batches:
            raise ValueError("recovery_steps > 0 needs recovery batches (training batches).")
        self._snapshot = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self._masks = get_masks(model)
        self._taylor = taylor
        if self._scratch is None or self._scratch.config.to_dict() != model.config.to_dict():
            self._scratch = type(model)(model.config).to(device)
        self._scratch.train(model.training)

    def masked_copy(self, widths: dict[str, int]) -> nn.Module:
        """The scratch model with the round's weights, masked to `widths` (nested inside the round's masks)."""
        scratch = self._scratch
        remove_masks(scratch)
        scratch.load_state_dict(self._snapshot)
        if self._masks:
            apply_masks(scratch, self._masks)
        masks = masks_from_widths(scratch, widths, self.importance, taylor=self._taylor, seed=self.seed)
        apply_masks(scratch, masks)
        return scratch

    def __call__(self, widths: dict[str, int]) -> float:
        model = self.masked_copy(widths)
        devices = [self._device] if self._device.type == "cuda" else []
        # Every candidate gets the same dropout stream: comparable rewards, and the same decisions after a resume.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            if self.recovery_steps:
                self._recover(model)
        self.evaluations += 1
        return batched_accuracy(model, self.reward_batches, self.autocast_dtype)

    def _recover(self, model: nn.Module) -> None:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.recovery_lr)
        batches = self.recovery_batches
        repeats = math.ceil(self.recovery_steps / len(batches))
        schedule = (batches * repeats)[: self.recovery_steps]
        autocast = _autocast(model, self.autocast_dtype)
        for batch in schedule:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
