"""The pipeline's teacher: loading it, the text it writes, and its cached top-k logits.

Everything here lives in ``output_dir/teacher-cache`` and is built once: the main process computes
(one teacher pass instead of one per rank on shared cores), the other ranks wait and read the same
files, and a resumed run reuses them.

Example:
    >>> teacher = load_teacher(config, tokenizer)  # doctest: +SKIP
    >>> blocks = write_teacher_text(config, teacher or model, tokenizer, out / "teacher-cache", state)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState

from ..heal import add_example_ids, build_teacher_cache, sample_teacher_text
from ..heal.teacher_cache import TeacherCache
from ..models import load_model_and_tokenizer
from .config import TEACHER_TEXT, PipelineConfig
from .faults import crash_point

__all__ = ["load_teacher", "write_teacher_text", "cache_teacher_logits"]


def load_teacher(config: PipelineConfig, tokenizer) -> torch.nn.Module | None:
    """The distillation teacher for ``kd`` / ``kd_lora`` (``teacher_model_path``, else the unpruned
    model), or ``None`` for other heal methods; refused when its vocabulary differs from the student's.

    Example:
        >>> load_teacher(load_config(None, ["--heal_method", "lora"]), tokenizer) is None  # doctest: +SKIP
        True
    """
    if config.heal.heal_method not in ("kd", "kd_lora"):
        return None
    teacher_path = config.heal.teacher_model_path or config.model.model_path
    teacher, teacher_tokenizer = load_model_and_tokenizer(teacher_path, dtype=config.model.dtype)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The teacher {teacher_path!r} uses a different tokenizer from the student "
            f"{config.model.model_path!r}; distillation needs the same vocabulary."
        )
    return teacher


def write_teacher_text(
    config: PipelineConfig, writer: torch.nn.Module, tokenizer, folder: Path, distributed: PartialState
) -> dict[str, torch.Tensor]:
    """``calibration_data`` / ``heal_data: teacher``: token blocks sampled from ``writer`` (the teacher,
    or the unpruned model), keyed ``"calibration"`` / ``"heal"`` for whichever asks for teacher text.

    The healing blocks' top-k logits are saved with them as the distillation cache. When both ask for
    the same number and length of blocks they share one file (same seed, same text).

    Example:
        >>> blocks = write_teacher_text(config, model, tokenizer, Path("out/teacher-cache"), PartialState())  # doctest: +SKIP
        >>> blocks["heal"].shape  # doctest: +SKIP
        torch.Size([240, 128])
    """
    d, h = config.data, config.heal
    wanted: dict[str, tuple[int, int]] = {}  # what -> (blocks, tokens per block)
    if d.calibration_data == TEACHER_TEXT:
        wanted["calibration"] = (d.num_calibration_samples, d.calibration_seq_len)
    if d.heal_data == TEACHER_TEXT and h.heal_method != "none":
        wanted["heal"] = (h.sequences_per_round(distributed.num_processes), d.heal_seq_len)
    if not wanted:
        return {}
    settings = dict(
        k=h.kd_top_k or 64, temperature=h.kd_temperature, special_ids=set(tokenizer.all_special_ids),
        seed=config.run.seed,
    )  # fmt: skip
    if distributed.is_main_process:
        for count, length in wanted.values():
            sample_teacher_text(
                writer, folder, count, length, show_progress=config.run.show_progress, **settings
            )
        crash_point("teacher-text")
    distributed.wait_for_everyone()
    return {what: sample_teacher_text(writer, folder, *sizes, **settings) for what, sizes in wanted.items()}


def cache_teacher_logits(
    config: PipelineConfig, teacher: torch.nn.Module, heal_dataset, folder: Path, distributed: PartialState
) -> tuple[object, TeacherCache]:
    """``kd`` / ``kd_lora`` with ``kd_top_k``: the teacher's top-k logits on the healing set, read from
    ``folder`` or computed once; returns the healing set with the example ids the cache is indexed by,
    and the cache.

    Example:
        >>> heal_dataset, cache = cache_teacher_logits(config, teacher, dataset, folder, PartialState())  # doctest: +SKIP
    """
    heal_dataset = add_example_ids(heal_dataset)
    h = config.heal
    settings = dict(k=h.kd_top_k, temperature=h.kd_temperature)
    if distributed.is_main_process:
        build_teacher_cache(teacher, heal_dataset, folder, show_progress=config.run.show_progress, **settings)
        crash_point("teacher-cache")
    distributed.wait_for_everyone()
    return heal_dataset, build_teacher_cache(teacher, heal_dataset, folder, **settings)
