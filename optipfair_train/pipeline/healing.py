"""One round's healing: a fresh Trainer (LoRA, distillation, SFT or plain) that resumes from the last
complete checkpoint in ``round-K/heal`` and stops at the first NaN/inf loss.

It needs no ``PipelineConfig``: the healing settings are a :class:`~optipfair_train.pipeline.config.HealConfig`
(the config file's ``heal`` section) and, optionally, a ``RunConfig`` (seed, checkpoint interval,
reporting), so a script or a benchmark heals with the pipeline's own code.

Example:
    >>> heal_config = HealConfig(heal_method="lora", heal_steps=20)  # doctest: +SKIP
    >>> model, tokens = heal(model, tokenizer, heal_config, Path("out"), 2e-4, dataset)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.integrations import TensorBoardCallback

from ..callbacks import BiasProbeCallback, FairnessLossCallback
from ..heal import DistillationTrainer, TeacherCache, add_lora
from ..pruning import load_pruned_model
from .config import LORA_METHODS, DataConfig, HealConfig, RunConfig
from .distributed import unshard
from .faults import crash_point
from .state import CheckpointCompletion, last_complete_checkpoint, remove_checkpoints

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "HealConfig",
    "training_args",
    "tensorboard_dir",
    "heal",
    "fairness_build_items",
    "remove_bias_vector",
]


class NonFiniteLossError(RuntimeError):
    """Healing kept producing NaN/inf losses after every allowed retry."""


class _NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first logged NaN/inf loss (the pipeline then rolls the round back)."""

    def __init__(self):
        self.tripped = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.tripped = True
            control.should_training_stop = True
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.tripped:  # a checkpoint after a NaN must not be resumed from
            raise NonFiniteLossError("non-finite loss before a checkpoint")


def training_args(
    h: HealConfig,
    round_dir: Path,
    learning_rate: float,
    *,
    run: RunConfig | None = None,
    seq_len: int | None = None,
) -> TrainingArguments:
    """The Trainer's arguments for healing in ``round_dir/heal`` (SFTConfig for the SFT methods);
    ``seq_len`` is the SFT methods' maximum length (default the config's ``heal_seq_len``), ``run`` the
    seed / checkpoints / reporting (default ``RunConfig()``).

    Example:
        >>> training_args(HealConfig(heal_steps=30), Path("out/r1"), 2e-4).max_steps
        30
    """
    r = run or RunConfig()
    if h.heal_method in ("sft", "sft_lora"):
        from trl import SFTConfig

        # TRL's own defaults (bf16, gradient checkpointing) are for GPUs; keep the pipeline's settings
        # (bf16 is the config's, set below for every method).
        # Transformers 5.24 renamed gradient_checkpointing to activation_checkpointing.
        checkpointing = (
            "activation_checkpointing"
            if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
            else "gradient_checkpointing"
        )
        arguments_class, extra = (
            SFTConfig,
            {
                "max_length": seq_len or DataConfig().heal_seq_len,
                "packing": False,
                checkpointing: False,
            },
        )
    else:
        arguments_class, extra = TrainingArguments, dict(remove_unused_columns=False)
    return arguments_class(
        **extra,
        output_dir=str(round_dir / "heal"),
        max_steps=h.heal_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=h.per_device_batch_size,
        gradient_accumulation_steps=h.gradient_accumulation_steps,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, h.heal_steps // 10),
        optim="adamw_torch",
        logging_steps=1,
        logging_nan_inf_filter=False,  # the guard must see a NaN loss, not a filtered average
        save_strategy="steps",
        save_steps=r.save_steps,
        save_total_limit=None,  # CheckpointCompletion deletes old checkpoints once a new one is whole
        seed=r.seed,
        data_seed=r.seed,
        # W&B: the pipeline's HealCurve logs the curves on a step that continues across rounds
        report_to=[] if r.report_to in ("none", "wandb") else [r.report_to],
        run_name=r.run_name,
        disable_tqdm=not r.show_progress,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # the tokens healing really used (card, W&B)
        use_cpu=not torch.cuda.is_available(),
        bf16=h.bf16,
    )


def tensorboard_dir(round_dir: Path) -> Path:
    """Where round ``round_dir``'s TensorBoard event files go: ``OUTPUT/runs/round-K``, or
    ``$TENSORBOARD_LOGGING_DIR/round-K`` when the user set that variable.

    Not under ``round-K/heal`` (the Trainer's default), which is deleted when the round is finished.

    Example:
        >>> str(tensorboard_dir(Path("out/round-2")))  # doctest: +SKIP
        'out/runs/round-2'
    """
    root = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return (Path(root).expanduser() if root else round_dir.parent / "runs") / round_dir.name


def fairness_build_items(source: str, seed: int, count: int) -> list:
    """The StereoSet items the fairness loss trains on: ``count`` of the **build** half of
    ``split_items(load_stereoset(source), seed)`` (a seeded sample); the held-out half is never among them.

    Example:
        >>> items = fairness_build_items("default", seed=0, count=1000)  # doctest: +SKIP
    """
    from ..bias import load_stereoset, sample_items, split_items

    build, _ = split_items(load_stereoset(source), seed=seed)
    return sample_items(build, count, seed=seed)


def remove_bias_vector(
    model: torch.nn.Module,
    tokenizer,
    h: HealConfig,
    items: list | None,
    seed: int,
    show_progress: bool = False,
) -> torch.nn.Module:
    """After a round's healing: fit ``model``'s bias vector on StereoSet build ``items`` and subtract
    ``h.bias_vector_strength`` times it from the weights (:mod:`optipfair_train.bias.bias_vector`); the model
    unchanged when the strength is 0. Deterministic for a seed (the fine-tunes run in eval mode in a fixed
    order), so a round resumed after a kill reaches the same weights; every process computes the same.

    Raises:
        ValueError: a strength > 0 without items.

    Example:
        >>> model = remove_bias_vector(model, tokenizer, config.heal, items, seed=0)  # doctest: +SKIP
    """
    if h.bias_vector_strength <= 0:
        return model
    if not items:
        raise ValueError("bias_vector_strength > 0 needs StereoSet build items (fairness_build_items).")
    from ..bias.bias_vector import debias_with_bias_vector

    debias_with_bias_vector(
        model, tokenizer, items, h.bias_vector_strength, epochs=h.bias_vector_epochs,
        learning_rate=h.bias_vector_learning_rate, seed=seed, show_progress=show_progress,
    )  # fmt: skip
    crash_point("bias-vector")  # subtracted in memory, nothing saved yet: a resume must reach the same
    return model


def heal(
    model: torch.nn.Module,
    tokenizer,
    h: HealConfig,
    round_dir: Path,
    learning_rate: float,
    dataset,
    *,
    run: RunConfig | None = None,
    seq_len: int | None = None,
    behaviour_sample_size: int | None = None,
    teacher: torch.nn.Module | None = None,
    teacher_cache: TeacherCache | None = None,
    behaviour_pairs: list | None = None,
    callbacks: list[TrainerCallback] | None = None,
    fairness_items: list | None = None,
) -> tuple[torch.nn.Module, int]:
    """Heal ``model`` with the configured method; returns the healed (LoRA-merged) model and the number
    of (non-padding) tokens healing trained on.

    ``h``: the healing settings (the config file's ``heal`` section); ``run``: seed, checkpoint interval
    and reporting (default ``RunConfig()``); ``seq_len``: the SFT methods' maximum length;
    ``behaviour_sample_size``: pairs the bias probe reads during healing (with ``behaviour_pairs``);
    unset, these two are the config file's defaults. With ``h.fairness_loss_weight > 0`` a
    :class:`~optipfair_train.callbacks.FairnessLossCallback` trains on ``fairness_items`` (StereoSet
    build items, :func:`fairness_build_items`).
    Checkpoints go to ``round_dir/heal`` and a rerun resumes from the last complete one.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the caller rolls back and retries).
        ValueError: ``h.fairness_loss_weight > 0`` without ``fairness_items`` (before any training).

    Example:
        >>> healed, tokens = heal(model, tokenizer, HealConfig(heal_steps=20), Path("out"), 2e-4, data)  # doctest: +SKIP
    """
    run = run or RunConfig()
    if h.heal_method == "none":
        return model, 0
    if h.fairness_loss_weight > 0 and not fairness_items:
        raise ValueError(
            "fairness_loss_weight > 0 needs fairness_items: StereoSet build items (fairness_build_items)."
        )
    if h.heal_method in LORA_METHODS:
        model = add_lora(model, r=h.lora_r, alpha=h.lora_alpha, target_modules=h.lora_target_modules)
    guard = _NonFiniteLossGuard()
    kwargs = dict(
        model=model,
        args=training_args(h, round_dir, learning_rate, run=run, seq_len=seq_len),
        train_dataset=dataset,
        callbacks=[guard, CheckpointCompletion(), *(callbacks or [])],
    )
    if h.heal_method in ("sft", "sft_lora"):
        from trl import SFTTrainer

        trainer = SFTTrainer(processing_class=tokenizer, **kwargs)
    elif h.heal_method in ("kd", "kd_lora"):
        # the cached top-k logits when the pipeline built them (kd_top_k > 0), else the live teacher
        trainer = DistillationTrainer(
            teacher=None if teacher_cache is not None else teacher,
            teacher_cache=teacher_cache,
            temperature=h.kd_temperature,
            alpha=h.kd_alpha,
            data_collator=default_data_collator,
            **kwargs,
        )
    else:
        trainer = Trainer(data_collator=default_data_collator, **kwargs)
    for callback in trainer.callback_handler.callbacks:  # read at its train begin, so set it here
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(tensorboard_dir(round_dir))
    if behaviour_pairs:  # watch fairness while the model recovers, on the Trainer's step axis
        trainer.add_callback(
            BiasProbeCallback(
                trainer,
                tokenizer=tokenizer,
                pairs=behaviour_pairs,
                seed=run.seed,
                sample_size=min(
                    behaviour_sample_size or DataConfig().behaviour_sample_size, len(behaviour_pairs)
                ),
                every_n_steps=max(1, h.heal_steps // 4),
                at_train_begin=False,
                at_train_end=False,
            )
        )
    if h.fairness_loss_weight > 0:  # its items at step s depend on s and the seed only: resumes alike
        # the counterfactual objective's anchor: a LoRA model's base, else a copy taken before any
        # checkpoint is restored (a resumed run anchors on the same model)
        needs_copy = h.fairness_loss_objective == "counterfactual" and h.heal_method not in LORA_METHODS
        FairnessLossCallback(
            fairness_items,
            tokenizer,
            weight=h.fairness_loss_weight,
            batch_size=h.fairness_loss_batch,
            seed=run.seed,
            objective=h.fairness_loss_objective,
            reference=copy.deepcopy(model) if needs_copy else None,
        ).attach(trainer)
    checkpoint = last_complete_checkpoint(round_dir / "heal")
    distributed = PartialState()
    distributed.wait_for_everyone()  # every rank has chosen before the others are deleted
    if distributed.is_main_process:
        remove_checkpoints(round_dir / "heal", keep=checkpoint)
    distributed.wait_for_everyone()
    if checkpoint is not None:
        logger.info("Resuming healing from %s", checkpoint)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLossError:
        guard.tripped = True
    if guard.tripped:
        raise NonFiniteLossError(f"non-finite healing loss at lr={learning_rate:g}")
    tokens = int(trainer.state.num_input_tokens_seen)
    # under FSDP2 the Trainer's model holds 1/world of each weight: gather it into a plain model of the
    # same structure (the round's pruned checkpoint, with the same adapters) before merging and pruning
    model = unshard(trainer.model, lambda: _same_structure(h, round_dir))
    return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model), tokens


def _same_structure(h: HealConfig, round_dir: Path) -> torch.nn.Module:
    """A plain model shaped like the one healing trained: ``round_dir/pruned``, plus LoRA if used."""
    model = load_pruned_model(round_dir / "pruned")
    if h.heal_method in LORA_METHODS:
        model = add_lora(model, r=h.lora_r, alpha=h.lora_alpha, target_modules=h.lora_target_modules)
    return model
