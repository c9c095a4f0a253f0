"""Off-policy knowledge distillation: a ``Trainer`` whose loss mixes KL to the teacher with cross-entropy.

The loss is ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE`` averaged over the
tokens that have a label (padding excluded). It is a per-batch mean, so the Trainer must divide it by
the gradient-accumulation steps itself (``loss_is_scaled_for_ga = False``): without that, an update
with gradient accumulation 2 is twice too large (FIELD-NOTES).

Example:
    >>> trainer = DistillationTrainer(teacher=teacher, model=student, args=args,
    ...                               train_dataset=dataset, temperature=2.0, alpha=0.9)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

__all__ = ["distillation_loss", "DistillationTrainer"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Mean over labelled next-token positions of the mixed KD + CE loss (causal LM shift applied).

    Example:
        >>> logits = torch.zeros(1, 3, 5)
        >>> float(distillation_loss(logits, logits, torch.tensor([[1, 2, 3]]), alpha=1.0))
        0.0
    """
    student = student_logits[:, :-1].float()
    teacher = teacher_logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    if not keep.any():
        return student.sum() * 0.0
    s, t = student[keep], teacher[keep]
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="none",
        )
        .sum(-1)
        .mean()
        * temperature**2
    )
    ce = F.cross_entropy(s, target[keep])
    return alpha * kl + (1 - alpha) * ce


class DistillationTrainer(Trainer):
    """A ``Trainer`` that distils ``teacher`` into the model being trained (full-parameter or LoRA)."""

    # compute_loss returns a per-batch mean: let the Trainer divide by gradient-accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args, teacher: torch.nn.Module, temperature: float = 2.0, alpha: float = 0.9, **kwargs
    ):
        super().__init__(*args, **kwargs)
        # the teacher only runs forward passes, on the device the Trainer puts the student on
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss
