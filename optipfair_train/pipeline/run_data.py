"""The data a pipeline run reads from its config: calibration blocks, the healing set and the fairness
loss's and the bias vector's StereoSet build items.

Teacher-written text (``calibration_data`` / ``heal_data: teacher``) is not read here: the unpruned
model writes it once the run has loaded it (:mod:`.teacher`), so those parts come back as ``None``.

Example:
    >>> data = load_run_data(load_config("configs/demo.yaml"), tokenizer, num_processes=1)  # doctest: +SKIP
    >>> data.calibration is None  # the demo calibrates on teacher-written text  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..bias.counterfactual import augment_counterfactual
from ..data import calibration_dataloader, load_texts
from ..heal import sft_dataset, text_dataset
from .config import TEACHER_TEXT, PipelineConfig
from .healing import fairness_build_items

__all__ = ["RunData", "load_run_data"]


@dataclass
class RunData:
    """What :func:`load_run_data` read; ``None`` where the run has nothing to read (or the teacher writes it)."""

    calibration: list | None = None
    heal_dataset: Any = None
    fairness_items: list | None = None
    bias_vector_items: list | None = None


def load_run_data(config: PipelineConfig, tokenizer, num_processes: int) -> RunData:
    """Read the run's calibration blocks, healing set (``num_processes`` ranks share one round's
    sequences) and fairness build items, as the config names them.

    Example:
        >>> load_run_data(config, tokenizer, 1).heal_dataset  # doctest: +SKIP
    """
    d, h, out = config.data, config.heal, RunData()
    if d.calibration_data != TEACHER_TEXT:
        out.calibration = list(
            calibration_dataloader(
                tokenizer,
                load_texts(d.calibration_data, split="calibration"),
                num_samples=d.num_calibration_samples,
                seq_len=d.calibration_seq_len,
            )
        )
    sequences = h.sequences_per_round(num_processes)
    if h.heal_method in ("sft", "sft_lora"):  # the user's own examples, formatted by TRL
        out.heal_dataset = sft_dataset(d.heal_data, num_examples=sequences)
    elif h.heal_method != "none" and d.heal_data != TEACHER_TEXT:
        texts = load_texts(d.heal_data, split="calibration")
        if h.counterfactual_augmentation:  # the same number of sequences, half of them swapped
            texts = augment_counterfactual(texts)
        out.heal_dataset = text_dataset(tokenizer, texts, seq_len=d.heal_seq_len, num_sequences=sequences)
    if h.fairness_loss_weight > 0:  # build-half items only; the stage probes judge the held-out half
        out.fairness_items = fairness_build_items(d.stereoset_data, config.run.seed, h.fairness_loss_items)
    if h.bias_vector_strength > 0:  # build-half items as well
        out.bias_vector_items = fairness_build_items(d.stereoset_data, config.run.seed, h.bias_vector_items)
    return out
