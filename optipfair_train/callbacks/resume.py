"""Resuming a Trainer run that :class:`~optipfair_train.callbacks.PruningCallback` pruned.

``Trainer.train(resume_from_checkpoint=...)`` loads the checkpoint's weights into the model the script
built (the unpruned one) inside ``train()``, before any callback event runs, so a checkpoint saved after
a pruning event does not fit (``size mismatch ... [90, 64] ... [128, 64]``). A ``PruningCallback`` given
the trainer (``PruningCallback(trainer, ...)``) therefore wraps the trainer's checkpoint loading:

1. before the weights load, the model is cut to the checkpoint's shapes: the DEPTH events recorded in the
   checkpoint's ``config.pruning_history`` are replayed (which blocks went), then every layer's MLP width
   and head counts are cut to the ones in its ``config.json``; the checkpoint's weights then fill them,
   and the optimizer the Trainer builds next has the shapes of the saved optimizer state;
2. the callback's progress is restored: the original size (measured on the model the script built,
   before the cut), the events already done (from ``pruning_callback.json``, which the callback writes
   into every checkpoint), so later events prune to the same targets and the logs continue; a
   :class:`~optipfair_train.callbacks.GradientImportanceCallback` given as ``importance=`` continues from
   the scores it saved in the checkpoint.

Nothing changes before every check passed: a checkpoint whose shapes the model cannot be cut to, or whose
size is not what the schedule gives at the checkpoint's step (a changed schedule), is refused with a
message naming the checkpoint. A PEFT (LoRA) model cannot be resumed past a pruning event this way: the
Trainer's checkpoint holds only the adapter, not the pruned base weights.

Example:
    >>> trainer.add_callback(PruningCallback(trainer, target=30, step=100))  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig

from ..arch import get_adapter, unwrap_model
from ..pruning.heads import HeadPlan, apply_head_plan
from ..pruning.surgery import drop_optimizer_parameters, remove_layers
from ..pruning.targets import units_to_remove
from ..pruning.width import apply_width_plan
from .importance import GradientImportanceCallback
from .schedule import PruningEvent, PruningSchedule
from .stats import model_structure

if TYPE_CHECKING:
    from .pruning import PruningCallback

__all__ = [
    "PROGRESS_FILE",
    "CheckpointLayout",
    "read_layout",
    "cut_to_checkpoint",
    "install_resume_hook",
    "resumed_at",
    "save_progress",
]

logger = logging.getLogger(__name__)

PROGRESS_FILE = "pruning_callback.json"


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _checkpoint_step(checkpoint: Path) -> int:
    path = checkpoint / "trainer_state.json"
    if not path.exists():
        return 0
    return int(json.loads(path.read_text()).get("global_step", 0))


@dataclass
class CheckpointLayout:
    """The shapes of the model saved in a checkpoint, read from its ``config.json``."""

    history: list[dict[str, Any]]  # its whole config.pruning_history
    new_events: list[dict[str, Any]]  # the events this model has not had
    num_layers: int
    widths: list[int]  # per layer, after the recorded DEPTH events
    query_heads: list[int]
    kv_heads: list[int]


def read_layout(model: torch.nn.Module, checkpoint: str | os.PathLike) -> CheckpointLayout:
    """Read and check the shapes of ``checkpoint``'s model against ``model`` (nothing is changed).

    Raises:
        ValueError: the checkpoint's model is not a cut of this one (other history, wider layers, other
            layer count).

    Example:
        >>> read_layout(model, "out/checkpoint-300").widths  # doctest: +SKIP
        [90, 90, 90, 90]
    """
    checkpoint = Path(checkpoint)
    adapter = get_adapter(model)
    saved = AutoConfig.from_pretrained(checkpoint)
    own = list(getattr(adapter.config, "pruning_history", None) or [])
    history = list(getattr(saved, "pruning_history", None) or [])
    if history[: len(own)] != own:
        raise ValueError(
            f"{checkpoint}: its config.pruning_history does not start with this model's own pruning "
            "history, so it was not trained from this model: build the model the run started from."
        )
    new = history[len(own) :]
    kept = list(range(adapter.num_layers))  # original indices of the blocks left after each DEPTH event
    for event in new:
        if event.get("pruning_type") == "DEPTH":
            drop = set(event.get("removed_layers") or [])
            if not drop or max(drop) >= len(kept):
                raise ValueError(
                    f"{checkpoint}: a recorded DEPTH event removes blocks {sorted(drop)} of {len(kept)}."
                )
            kept = [k for i, k in enumerate(kept) if i not in drop]
    n = saved.num_hidden_layers
    if len(kept) != n:
        raise ValueError(
            f"{checkpoint}: its model has {n} blocks; this model has {adapter.num_layers} and the recorded "
            f"DEPTH events leave {len(kept)}."
        )
    widths = (
        getattr(saved, "layer_intermediate_sizes", None)
        or [getattr(saved, adapter.family.intermediate_key)] * n
    )
    n_q = getattr(saved, "layer_num_attention_heads", None) or [saved.num_attention_heads] * n
    n_kv = (
        getattr(saved, "layer_num_key_value_heads", None)
        or [getattr(saved, "num_key_value_heads", None) or saved.num_attention_heads] * n
    )
    layout = CheckpointLayout(history, new, n, [], list(n_q), list(n_kv))
    for i, k in enumerate(kept):
        have_width = adapter.mlp(k).intermediate_size
        have_q, have_kv, _ = adapter.head_counts(k)
        width = have_width if widths[i] is None else widths[i]  # None: an unpruned GPT-2 (n_inner unset)
        if width > have_width or n_q[i] > have_q or n_kv[i] > have_kv:
            raise ValueError(
                f"{checkpoint}: block {i} is wider there (MLP {width}, heads {n_q[i]}/{n_kv[i]}) than in this "
                f"model (MLP {have_width}, heads {have_q}/{have_kv}): build the model the run started from."
            )
        layout.widths.append(width)
    return layout


def cut_to_checkpoint(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike,
    optimizer: Any | None = None,
    check: Callable[[CheckpointLayout], None] | None = None,
) -> CheckpointLayout:
    """Cut ``model`` in place to the shapes of the model saved in ``checkpoint`` (values are not loaded).

    Replays the checkpoint's recorded DEPTH events the model has not had, then cuts every layer's MLP
    width and head counts to the checkpoint's and copies its ``pruning_history``. ``check`` (if given)
    sees the layout before anything changes and may raise. Blocks removed here also leave ``optimizer``.

    Raises:
        ValueError: see :func:`read_layout`.

    Example:
        >>> cut_to_checkpoint(model, "out/checkpoint-300").num_layers  # doctest: +SKIP
        4
    """
    model = unwrap_model(model)
    layout = read_layout(model, checkpoint)
    if check is not None:
        check(layout)
    adapter = get_adapter(model)
    for event in layout.new_events:
        if event.get("pruning_type") == "DEPTH":
            drop = sorted(set(event["removed_layers"]))
            params = [p for i in drop for p in adapter.layers[i].parameters()]
            remove_layers(adapter, drop)
            if optimizer is not None:
                drop_optimizer_parameters(optimizer, params)
    width_plan, head_plan = {}, {}
    for i in range(layout.num_layers):
        if layout.widths[i] < adapter.mlp(i).intermediate_size:
            width_plan[i] = torch.arange(layout.widths[i])
        if (layout.query_heads[i], layout.kv_heads[i]) != adapter.head_counts(i)[:2]:
            head_plan[i] = HeadPlan(torch.arange(layout.query_heads[i]), torch.arange(layout.kv_heads[i]))
    if width_plan:
        apply_width_plan(model, width_plan)
    if head_plan:
        apply_head_plan(model, head_plan)
    adapter.config.pruning_history = layout.history
    if layout.new_events:
        logger.info(
            "%s: cut the model to the checkpoint's shapes (%d pruning events)",
            checkpoint,
            len(layout.new_events),
        )
    return layout


def _saved_units(callback: PruningCallback, layout: CheckpointLayout) -> int | None:
    """The checkpoint's size in ``callback``'s units (None: its pruned layers are not uniform)."""
    if callback.pruning_type == "DEPTH":
        return layout.num_layers
    layers = callback.layer_indices if callback.layer_indices is not None else range(layout.num_layers)
    if callback.pruning_type == "ATTENTION":
        if callback.head_granularity == "group":
            sizes = {layout.kv_heads[i] for i in layers}
        else:
            sizes = {layout.query_heads[i] // layout.kv_heads[i] for i in layers}
    else:
        sizes = {layout.widths[i] for i in layers}
    return sizes.pop() if len(sizes) == 1 else None


def _expected_progress(schedule: PruningSchedule, original: int, step: int) -> tuple[list[PruningEvent], int]:
    """The events that pruned up to ``step`` and the units they leave, decided as the callback decides."""
    done, units = [], original
    for event in schedule.events:
        if event.step > step:
            break
        if units_to_remove(units, original, event.target) > 0:
            units = original - units_to_remove(original, original, event.target)
            done.append(event)
    return done, units


def _restore(
    callbacks: list[PruningCallback], model: torch.nn.Module, checkpoint: Path, optimizer: Any
) -> None:
    step = _checkpoint_step(checkpoint)
    if _is_peft(model) and any(e.step <= step for cb in callbacks for e in cb.schedule.events):
        raise ValueError(
            f"Cannot resume from {checkpoint}: a LoRA (PEFT) Trainer checkpoint holds only the adapter, not "
            "the pruned base weights. Save the pruned model (save_pruned_model) and train the rest from it, "
            "with only the remaining pruning events scheduled."
        )
    # measured on the model the script built, before it is cut
    original = [(cb._units(model), model_structure(model)["parameters"]) for cb in callbacks]
    progress = []

    def check(layout: CheckpointLayout) -> None:
        for cb, (units, _) in zip(callbacks, original, strict=True):
            done, left = _expected_progress(cb.schedule, units, step)
            saved = _saved_units(cb, layout)
            if saved != left:
                raise ValueError(
                    f"{checkpoint}: the model there has {saved} {cb.pruning_type} units, but this callback's "
                    f"schedule leaves {left} of {units} after step {step}: resume with the model and schedule "
                    "the run was started with. Nothing was changed."
                )
            progress.append(done)

    cut_to_checkpoint(model, checkpoint, optimizer, check=check)
    saved_path = checkpoint / PROGRESS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else []
    for k, (cb, (units, parameters), done) in enumerate(zip(callbacks, original, progress, strict=True)):
        records = saved[k]["events_done"] if k < len(saved) else []
        if len(records) != len(done):  # no progress file (killed before it was written): rebuild
            records = [{"step": e.step, "target": e.target} for e in done]
        cb.original_units, cb.original_parameters = units, parameters
        cb.events_done = records
        cb.resumed_step = step
        if isinstance(cb.importance, GradientImportanceCallback):  # its scores so far, saved on save
            cb.importance.resume_from(checkpoint)
        logger.info(
            "resuming %s at step %d: %d of %d pruning events done",
            type(cb).__name__,
            step,
            len(done),
            len(cb.schedule.events),
        )


def install_resume_hook(trainer: Any, callback: PruningCallback) -> None:
    """Make ``trainer``'s checkpoint loading cut the model to the checkpoint's shapes first (module doc).

    Installed once per trainer; every ``PruningCallback`` given the trainer registers with it.

    Example:
        >>> install_resume_hook(trainer, pruning_callback)  # doctest: +SKIP
    """
    callbacks = trainer.__dict__.get("_pruning_callbacks")
    if callbacks is None:
        callbacks = trainer._pruning_callbacks = []
        load = trainer._load_from_checkpoint

        def load_cut_to_checkpoint(resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> Any:
            _restore(
                callbacks,
                trainer.model if model is None else model,
                Path(resume_from_checkpoint),
                trainer.optimizer,
            )
            return load(resume_from_checkpoint, model)

        trainer._load_from_checkpoint = load_cut_to_checkpoint
    if callback not in callbacks:
        callbacks.append(callback)


def resumed_at(callback: PruningCallback, step: int) -> bool:
    """True when ``callback`` was restored from a checkpoint at ``step`` (its progress is already set)."""
    return getattr(callback, "resumed_step", None) == step and step > 0


def save_progress(callback: PruningCallback, args: Any, state: Any) -> None:
    """Write the callback's progress into the checkpoint just saved (``on_save``), for a later resume.

    Example:
        >>> save_progress(pruning_callback, args, state)  # doctest: +SKIP
    """
    if not state.is_world_process_zero or callback.trainer is None:
        return
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    if not folder.is_dir():
        return
    callbacks = callback.trainer.__dict__.get("_pruning_callbacks") or [callback]
    if callback is not callbacks[0]:
        return  # the first registered callback writes everyone's progress
    progress = [{"events_done": cb.events_done} for cb in callbacks]
    tmp = folder / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(progress, default=str))
    os.replace(tmp, folder / PROGRESS_FILE)
