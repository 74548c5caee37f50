"""Knowledge distillation while pruning: the pruned student learns from the labels and from the dense teacher's
softened predictions (Hinton et al., 2015), which carry what the dense model knew about every class.

A `Trainer` subclass, because a `TrainerCallback` cannot change the loss. Use it in place of `Trainer` with
`RLPruneCallback` as usual; the callback's reward (accuracy on the reward split) is unchanged.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch; logits (B, C).

    The T^2 keeps the gradient's scale independent of T, so `alpha` means the same at any temperature."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is (1 - alpha) * the model's own loss + alpha * distillation_loss from `teacher`.

    Args:
        teacher: the dense model (or any model with the same labels). It is frozen in place: eval mode, no
            gradients, moved to the training device. Pass a copy if you still train the original.
        alpha: weight of the distillation term in [0, 1]; 0 is plain fine-tuning.
        temperature: softening temperature T > 0 of both distributions.
    """

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0, **kwargs):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha = {alpha} must be in [0, 1] (0: no distillation).")
        if not temperature > 0:
            raise ValueError(f"distillation temperature = {temperature} must be > 0 (4 is a common choice).")
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None:
            raise ValueError("label_smoothing_factor > 0 and distillation both soften the targets; set label_smoothing_factor=0 "
                             "or use the plain Trainer.")
        if teacher is self.model:
            raise ValueError("teacher is the model being trained, and freezing it would stop training: pass a frozen copy, "
                             "teacher=copy.deepcopy(model).")
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        # compute_loss returns a mean over the micro-batch (no num_items_in_batch): the Trainer divides by the
        # gradient-accumulation steps, whatever the model's forward accepts
        self.loss_is_scaled_for_ga = False
        self.alpha, self.temperature = float(alpha), float(temperature)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("DistillationTrainer needs labels in every batch: the loss mixes the model's own loss with distillation.")
        outputs = model(**inputs)
        loss = outputs.loss
        if self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(**{key: value for key, value in inputs.items() if key != "labels"}).logits
            loss = (1 - self.alpha) * loss + self.alpha * distillation_loss(outputs.logits, teacher_logits, self.temperature)
        return (loss, outputs) if return_outputs else loss
