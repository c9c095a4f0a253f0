"""LoRA adapters for healing, on whatever projections the pruned model still has.

Example:
    >>> peft_model = add_lora(model, r=16, alpha=32)  # doctest: +SKIP
    >>> healed = peft_model.merge_and_unload()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model

__all__ = ["lora_target_modules", "add_lora"]


def lora_target_modules(model: torch.nn.Module, wanted: Sequence[str]) -> list[str]:
    """The names of ``wanted`` that exist as module names in ``model`` (in the order given)."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    if not found:
        raise ValueError(
            f"None of the LoRA target modules {list(wanted)} exist in {type(model).__name__}; "
            f"its module names include {sorted(present)[:20]}."
        )
    return found


def add_lora(
    model: torch.nn.Module,
    r: int = 16,
    alpha: int = 32,
    target_modules: Sequence[str] = (
        "gate_proj",
        "up_proj",
        "down_proj",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ),
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (only the adapters train).

    Example:
        >>> add_lora(model, r=8, alpha=16, target_modules=["gate_proj", "up_proj"])  # doctest: +SKIP
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        target_modules=lora_target_modules(model, target_modules),
    )
    return get_peft_model(model, config)
