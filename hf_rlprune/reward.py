"""Reward evaluation: accuracy on the reward split of a candidate allocation, after its refit and any recovery.

Accuracy measured right after masking ranks allocations badly (a policy it picks loses to uniform pruning once
both are fine-tuned), so each candidate is masked on a scratch copy of the live model; with `refit_ridge` set (the
callback's default) its pruned layers' consumers are refitted by ridge least squares to the unpruned model's outputs;
it may then be trained for `recovery_steps` on a fixed set of training batches; only then is it measured. Every
candidate in a round sees the same weights, the same training batches and the same reward batches, so rewards are
comparable and deterministic.

Candidates are evaluated several at a time: masked sub-networks share the dense shapes, so their weights stack
along a new leading dimension and `torch.func.vmap` trains and measures all of them in one pass per batch (convs
become grouped convs, linears batched matmuls). Adam is elementwise, so one Adam over the stacked weights is K
independent recoveries. torch has no vmap rule for its fused recurrent kernel (`aten::lstm`): `batched_lstm`
supplies one, running K stacked LSTMs as one block-diagonal LSTM. Other recurrent layers (GRU, several layers in
one module, bidirectional) are evaluated one candidate at a time, on the same code path otherwise.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from .batched_lstm import is_stackable_lstm, stackable_lstms
from .pruning import TaylorAccumulator, apply_masks, get_masks, mask_multipliers, masks_from_widths, remove_masks
from .pruning.refit import batch_norms, recalibrate_batch_norm, refit_consumers, reference_outputs


def supports_stacked_candidates(model: nn.Module) -> bool:
    """Whether several masked copies of `model` can be trained and measured in one vmapped pass: every recurrent
    layer must be one `batched_lstm` has a batching rule for (torch has none)."""
    return all(is_stackable_lstm(module) for module in model.modules() if isinstance(module, nn.RNNBase))


def take_batches(loader, count: int) -> list:
    """The first `count` batches of `loader`, starting it again as often as needed: a recovery schedule's batches."""
    if count > 0 and len(loader) == 0:
        raise ValueError(f"The training data gives no batch ({len(loader.dataset)} rows, batch size {loader.batch_size}); "
                         "lower the batch size.")
    batches = []
    while len(batches) < count:
        batches += [batch for _, batch in zip(range(count - len(batches)), loader)]  # range first: no extra batch drawn
    return batches


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
    """The Trainer's mixed precision (accelerate's autocast, on a CPU too), so candidates run as the model trains."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


@dataclass(frozen=True)
class CandidateRepair:
    """What is done to each masked candidate before its reward is measured, in this order.

    Args:
        refit_ridge: when set, the pruned layers' consumers are refitted by ridge least squares to the round model's
            outputs on `refit_batches` training batches (`pruning.refit`), so recovery starts from the closest fit of
            the unpruned function rather than from plain masking; the value is the ridge strength relative to the mean
            eigenvalue of the inputs' Gram matrix. None: no refit.
        refit_batches: training batches the refit is fitted on.
        bn_recalibration_batches: when > 0, the batch-norm running statistics are recomputed on this many training
            batches after masking and refit (`pruning.refit.recalibrate_batch_norm`); 0 keeps the round's statistics.
            Models without batch norm are unaffected (nothing runs).
        recovery_steps: Adam steps of recovery training (0 measures right after the above).
        recovery_lr: learning rate of the recovery.
    """

    refit_ridge: float | None = None
    refit_batches: int = 4
    bn_recalibration_batches: int = 0
    recovery_steps: int = 0
    recovery_lr: float = 1e-3

    def __post_init__(self):
        for name in ("refit_batches", "bn_recalibration_batches", "recovery_steps"):  # counts that slice batch lists
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.recovery_steps < 0:
            raise ValueError(f"recovery_steps = {self.recovery_steps} must be >= 0.")
        if self.refit_ridge is not None and (self.refit_ridge < 0 or self.refit_batches < 1):
            raise ValueError(f"refit_ridge = {self.refit_ridge} must be >= 0 and refit_batches = {self.refit_batches} >= 1.")
        if self.bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches = {self.bn_recalibration_batches} must be >= 0 (0: keep the round's "
                             "batch-norm statistics).")

    @property
    def training_batches(self) -> int:
        """Training batches a round needs: the refit's calibration, batch-norm recalibration, recovery steps."""
        return max(self.refit_batches if self.refit_ridge is not None else 0, self.bn_recalibration_batches, self.recovery_steps)


class RewardEvaluator:
    """`evaluate(widths) -> accuracy` for PruningEnv, on a scratch copy of the model frozen at the round's start.

    Args:
        reward_batches: collated batches of the reward split (moved to the device once).
        recovery_batches: collated training batches the repair uses (moved to the device once); `begin_round` can
            give each round its own.
        repair: the refit, batch-norm recalibration and recovery each candidate gets before it is measured.
        importance: criterion that picks which units a width keeps.
        seed: seeds every candidate's dropout stream (the same for all) and random importance.
        autocast_dtype: the Trainer's mixed precision, so candidates run as the model trains.
        candidates_per_pass: most candidates trained and measured together in one vmapped pass (memory grows with
            it: K copies of the weights, Adam moments and activations); 1 evaluates them one at a time.
        stack_candidates: use the vmapped pass; default on CUDA only. A GPU is underused by one small model and
            gains several times; on a CPU one candidate already fills the cores, and the stacked (grouped) convs
            measured about 1.5x slower per candidate than one at a time (2 cores, the reference CNN); and under vmap
            torch's CPU autocast leaves linears in float32, so a stacked pass there ignores bf16/fp16.
    """

    def __init__(
        self,
        reward_batches: list[dict],
        recovery_batches: list[dict] | None = None,
        repair: CandidateRepair | None = None,
        importance: str = "l1",
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
        candidates_per_pass: int = 8,
        stack_candidates: bool | None = None,
    ):
        if not reward_batches:
            raise ValueError("The reward split is empty: give at least one batch of held-out training examples.")
        if candidates_per_pass < 1:
            raise ValueError(f"candidates_per_pass = {candidates_per_pass} must be >= 1.")
        self.repair = repair or CandidateRepair()
        self.candidates_per_pass, self.stack_candidates = int(candidates_per_pass), stack_candidates
        self.reward_batches_cpu = reward_batches
        self.recovery_batches_cpu = recovery_batches or []
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
        if self.repair.training_batches and not self.recovery_batches:
            needs = (f"recovery_steps = {self.repair.recovery_steps}" if self.repair.recovery_steps else
                     f"refit_ridge = {self.repair.refit_ridge}" if self.repair.refit_ridge is not None else
                     f"bn_recalibration_batches = {self.repair.bn_recalibration_batches}")
            raise ValueError(f"{needs} needs recovery batches (training batches); pass recovery_batches.")
        self._snapshot = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self._masks = get_masks(model)
        self._taylor = taylor
        if self._scratch is None or self._scratch.config.to_dict() != model.config.to_dict():
            self._scratch = type(model)(model.config).to(device)
        self._scratch.train(model.training)
        if self.repair.refit_ridge is not None:  # what every candidate's consumers are refitted to: this round's model
            # measured on the scratch copy, as the candidates are: the live model may run under a Trainer's autocast
            self._calibration = self.recovery_batches[: self.repair.refit_batches]
            scratch = self._load_round()
            scratch.eval()
            self._reference = reference_outputs(scratch, self._calibration)
            scratch.train(model.training)

    def _load_round(self) -> nn.Module:
        """The scratch model reset to the round's weights and masks."""
        scratch = self._scratch
        remove_masks(scratch)
        scratch.load_state_dict(self._snapshot)
        if self._masks:
            apply_masks(scratch, self._masks)  # nested ranking: units the round already pruned stay pruned
        return scratch

    def _refit(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
        """Refit the consumers of the masked groups of `model` (in eval mode: no dropout) to the round's model;
        the names of the parameters changed."""
        was_training = model.training
        model.eval()
        names = refit_consumers(model, masks, self._calibration, self._reference, ridge=self.repair.refit_ridge)
        model.train(was_training)
        return names

    def refitted_tensors(self, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        """The parameters the refit changes for the allocation `widths` (masked as `masked_copy` masks it), and the
        batch-norm statistics the recalibration recomputes when it is on, on the CPU: what the trained model takes
        when this allocation is applied, so training continues from the weights the candidate's recovery started
        from (with no recovery steps, the model its reward was measured on)."""
        if self.repair.refit_ridge is None:
            raise RuntimeError("refitted_tensors needs refit_ridge to be set.")
        scratch, names = self._masked(widths)
        tensors = {name: scratch.get_parameter(name) for name in names}
        if self.repair.bn_recalibration_batches:
            norms = {id(norm) for norm in batch_norms(scratch)}
            tensors.update({name: buffer for name, buffer in scratch.named_buffers()
                            if id(scratch.get_submodule(name.rpartition(".")[0])) in norms})
        return {name: value.detach().cpu().clone() for name, value in tensors.items()}

    def masked_copy(self, widths: dict[str, int]) -> nn.Module:
        """The scratch model with the round's weights, masked to `widths` (nested inside the round's masks), its
        consumers refitted when `refit_ridge` is set and its batch-norm statistics recomputed when
        `bn_recalibration_batches` is."""
        return self._masked(widths)[0]

    def _masked(self, widths: dict[str, int], masks: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, list[str]]:
        """`masked_copy` (masked with `masks` when the caller already has them for `widths`), and the names of the
        parameters its refit changed (none without refit)."""
        scratch = self._load_round()
        if masks is None:
            masks = masks_from_widths(scratch, widths, self.importance, taylor=self._taylor, seed=self.seed)
        apply_masks(scratch, masks)
        names = self._refit(scratch, masks) if self.repair.refit_ridge is not None else []
        if self.repair.bn_recalibration_batches:
            calibration = self.recovery_batches[: self.repair.bn_recalibration_batches]
            recalibrate_batch_norm(scratch, calibration, _autocast(scratch, self.autocast_dtype))
        return scratch, names

    def __call__(self, widths: dict[str, int]) -> float:
        return self.evaluate_batch([widths])[0]

    def evaluate_batch(self, candidates: list[dict[str, int]]) -> list[float]:
        """Reward-split accuracy of each candidate allocation after its recovery, `candidates_per_pass` at a time."""
        if self._scratch is None:
            raise RuntimeError("Call begin_round(model) before evaluating candidates.")
        stack = self.stack_candidates if self.stack_candidates is not None else self._device.type == "cuda"
        stacked = stack and self.candidates_per_pass > 1 and supports_stacked_candidates(self._scratch)
        chunk = self.candidates_per_pass if stacked else 1
        accuracies = []
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            devices = [self._device] if self._device.type == "cuda" else []
            # Every candidate gets the same dropout stream: comparable rewards, and the same decisions after a resume.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                accuracies += self._evaluate_stacked(part) if stacked else [self._evaluate_one(part[0])]
            self.evaluations += len(part)
        return accuracies

    def _evaluate_one(self, widths: dict[str, int]) -> float:
        model = self.masked_copy(widths)
        if self.repair.recovery_steps:
            self._recover(model)
        return batched_accuracy(model, self.reward_batches, self.autocast_dtype)

    def _recovery_schedule(self) -> list[dict]:
        batches = self.recovery_batches
        repeats = math.ceil(self.repair.recovery_steps / len(batches))
        return (batches * repeats)[: self.repair.recovery_steps]

    def _evaluate_stacked(self, candidates: list[dict[str, int]]) -> list[float]:
        """Train and measure K masked copies at once: weights stacked to (K, ...), one vmapped forward per batch."""
        with stackable_lstms(self._scratch):
            return self._evaluate_stacked_pass(candidates)

    def _evaluate_stacked_pass(self, candidates: list[dict[str, int]]) -> list[float]:
        base = self._load_round()
        candidate_masks = [masks_from_widths(base, widths, self.importance, taylor=self._taylor, seed=self.seed) for widths in candidates]
        multipliers = [mask_multipliers(base, masks) for masks in candidate_masks]
        # (K, *broadcastable shape) per masked tensor: every candidate masks every group, so all share the same names
        stacked_multipliers = {name: torch.stack([factors[name] for factors in multipliers]) for name in multipliers[0]}
        count = len(candidates)
        if self.repair.refit_ridge is None and not self.repair.bn_recalibration_batches:
            params = {  # (K, *shape); frozen parameters stay frozen, as on the one-at-a-time path
                name: param.detach().unsqueeze(0).repeat(count, *[1] * param.dim()).requires_grad_(param.requires_grad)
                for name, param in base.named_parameters()
            }
            buffers = {}
            for name, buffer in base.named_buffers():
                stacked = buffer.detach().unsqueeze(0).repeat(count, *[1] * buffer.dim())  # (K, *shape)
                buffers[name] = stacked * stacked_multipliers[name] if name in stacked_multipliers and buffer.is_floating_point() else stacked
        else:  # each candidate's own refitted weights and recalibrated statistics, stacked
            states = []
            for widths, masks in zip(candidates, candidate_masks):
                masked, _ = self._masked(widths, masks)  # the scratch model itself: copy before the next candidate
                states.append({name: value.detach().clone() for name, value in [*masked.named_parameters(), *masked.named_buffers()]})
            base = self._load_round()
            params = {name: torch.stack([state[name] for state in states]).requires_grad_(param.requires_grad)
                      for name, param in base.named_parameters()}
            buffers = {name: torch.stack([state[name] for state in states]) for name, _ in base.named_buffers()}

        def forward(params, buffers, factors, batch):
            # Masked weights as weight * 0/1: their gradients are zero, so Adam never moves them.
            effective = {name: value * factors[name] if name in factors else value for name, value in params.items()}
            return functional_call(base, (effective, buffers), args=(), kwargs=batch)

        param_factors = {name: factor for name, factor in stacked_multipliers.items() if name in params}
        autocast = _autocast(base, self.autocast_dtype)
        if self.repair.recovery_steps:
            base.train()
            optimizer = torch.optim.Adam([value for value in params.values() if value.requires_grad], lr=self.repair.recovery_lr)
            losses = vmap(lambda p, b, f, batch: forward(p, b, f, batch).loss, in_dims=(0, 0, 0, None), randomness="same")
            for batch in self._recovery_schedule():
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = losses(params, buffers, param_factors, batch).sum()  # (K,) -> (): gradients stay per candidate
                loss.backward()
                optimizer.step()

        base.eval()
        logits_of = vmap(lambda p, b, f, inputs: forward(p, b, f, inputs).logits, in_dims=(0, 0, 0, None), randomness="same")
        correct, total = torch.zeros(count, dtype=torch.long, device=self._device), 0
        with torch.no_grad(), autocast:
            for batch in self.reward_batches:
                inputs = {key: value for key, value in batch.items() if key != "labels"}
                predictions = logits_of(params, buffers, param_factors, inputs).argmax(dim=-1)  # (K, B)
                correct += (predictions == batch["labels"].view(1, -1)).sum(dim=1)
                total += batch["labels"].numel()
        return [float(value) / max(total, 1) for value in correct.cpu()]

    def _recover(self, model: nn.Module) -> None:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.repair.recovery_lr)
        autocast = _autocast(model, self.autocast_dtype)
        for batch in self._recovery_schedule():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
