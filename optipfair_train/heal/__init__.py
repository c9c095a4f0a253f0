"""Healing a pruned model: LoRA (PEFT), distillation from the unpruned teacher, or SFT.

Example:
    >>> from optipfair_train.heal import DistillationTrainer, add_lora, text_dataset  # doctest: +SKIP
"""

from .distill import DistillationTrainer, distillation_loss, topk_distillation_loss
from .fair_loss import (
    ItemCycle,
    check_fairness_loss_settings,
    fairness_gradients,
    fairness_loss,
    preference_gaps,
)
from .lora import add_lora, lora_target_modules
from .sft import SFT_FORMATS, sft_dataset
from .teacher_cache import (
    TeacherCache,
    TeacherCacheMismatch,
    add_example_ids,
    build_teacher_cache,
    save_teacher_cache,
    teacher_fingerprint,
)
from .teacher_text import sample_teacher_text
from .text import lm_dataset, text_dataset

__all__ = [
    "DistillationTrainer",
    "distillation_loss",
    "topk_distillation_loss",
    "ItemCycle",
    "check_fairness_loss_settings",
    "fairness_gradients",
    "fairness_loss",
    "preference_gaps",
    "TeacherCache",
    "TeacherCacheMismatch",
    "add_example_ids",
    "build_teacher_cache",
    "teacher_fingerprint",
    "sample_teacher_text",
    "save_teacher_cache",
    "add_lora",
    "lora_target_modules",
    "SFT_FORMATS",
    "sft_dataset",
    "lm_dataset",
    "text_dataset",
]
