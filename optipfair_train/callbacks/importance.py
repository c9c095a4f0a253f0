"""Taylor importance from the gradients the training already computes.

:class:`GradientImportanceCallback` calls :meth:`TaylorImportance.accumulate` in ``on_pre_optimizer_step``:
after the backward passes of all gradient-accumulation micro-batches (and, under DDP, after their
all-reduce, so every rank accumulates the same scores) and after gradient clipping, before the
optimizer step and ``zero_grad``. The cost is a multiply-add per weight per accumulated step
(``every_n_steps`` thins it further); no extra forward or backward pass.

A :class:`~optipfair_train.callbacks.PruningCallback` given ``importance=`` this callback prunes with
the ``taylor`` scorer and resets the scores after each event (the old scores describe units that
changed); :attr:`GradientImportanceCallback.importance` can also be handed to the next
``prune_model(..., neuron_selection_method="taylor", gradient_importance=...)`` call.

Example:
    >>> grads = GradientImportanceCallback()
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[grads])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> prune_model(model, neuron_selection_method="taylor", gradient_importance=grads.importance)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..pruning.taylor import TaylorImportance

__all__ = ["GradientImportanceCallback", "IMPORTANCE_FILE"]

logger = logging.getLogger(__name__)

IMPORTANCE_FILE = "gradient_importance.pt"  # the scores so far, in every checkpoint (for a resume)


class GradientImportanceCallback(TrainerCallback):
    """Accumulate first-order Taylor importance per MLP neuron, attention head and block during training.

    Args:
        every_n_steps: accumulate on every n-th optimizer step (1 = every step).
        start_step: first optimizer step (``global_step`` before the step) to accumulate on.

    Attributes:
        importance: the :class:`~optipfair_train.pruning.taylor.TaylorImportance` (None before training).
        available: False when the MLP weights carry no gradient (e.g. frozen under LoRA); then nothing
            is accumulated and a warning says why.
        total_seconds: wall time spent accumulating (its whole cost to training).

    Example:
        >>> cb = GradientImportanceCallback(every_n_steps=2)
        >>> cb.every_n_steps
        2
    """

    def __init__(self, every_n_steps: int = 1, start_step: int = 0):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.importance: TaylorImportance | None = None
        self.available = True
        self._model: torch.nn.Module | None = None
        self._shape: tuple = ()
        self.total_seconds = 0.0
        self._resume_from: Path | None = None

    def reset(self, model: torch.nn.Module | None = None) -> None:
        """Start accumulating from zero (call after the model's structure changed).

        Example:
            >>> cb.reset(model)  # doctest: +SKIP
        """
        model = model if model is not None else self._model
        if model is not None:
            self._model = model
            self.importance = TaylorImportance(model)
            self._shape = self._structure()

    def _structure(self) -> tuple:
        adapter = self.importance.adapter
        return (
            adapter.num_layers,
            tuple(adapter.intermediate_sizes()),
            tuple(adapter.head_counts(i)[0] for i in range(adapter.num_layers)),
        )

    @property
    def num_batches(self) -> int:
        """Optimizer steps accumulated since the last reset."""
        return self.importance.batches if self.importance is not None else 0

    @property
    def ready(self) -> bool:
        """True once at least one step's gradients were accumulated."""
        return self.num_batches > 0

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Continue from the scores saved in ``checkpoint`` at the next train begin (a resumed run).

        :class:`~optipfair_train.callbacks.PruningCallback` calls it when the Trainer resumes.

        Example:
            >>> cb.resume_from("out/checkpoint-300")  # doctest: +SKIP
        """
        self._resume_from = Path(checkpoint)

    def on_train_begin(self, args: Any, state: Any, control: Any, model=None, **kwargs):
        self.reset(model)
        self.available = True
        if self._resume_from is not None:
            self._load(self._resume_from / IMPORTANCE_FILE)
            self._resume_from = None

    def _load(self, path: Path) -> None:
        if not path.exists():
            logger.warning("%s is missing: gradient importance starts again from the resume.", path)
            return
        saved = torch.load(path, weights_only=True)
        imp = self.importance
        widths = imp.adapter.intermediate_sizes()
        if any(v.numel() != widths[i] for i, v in saved["neurons"].items()) or (
            saved["blocks"] is not None and saved["blocks"].numel() != imp.adapter.num_layers
        ):
            logger.warning(
                "%s does not fit the model: gradient importance starts again from the resume.", path
            )
            return
        imp.batches, imp.neurons, imp.heads, imp.blocks = (
            saved["batches"],
            saved["neurons"],
            saved["heads"],
            saved["blocks"],
        )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.importance is None or not state.is_world_process_zero or not folder.is_dir():
            return
        imp = self.importance
        tmp = folder / f".{IMPORTANCE_FILE}.tmp"
        torch.save(
            {"batches": imp.batches, "neurons": imp.neurons, "heads": imp.heads, "blocks": imp.blocks}, tmp
        )
        os.replace(tmp, folder / IMPORTANCE_FILE)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs):
        if not self.available or self.importance is None:
            return
        step = state.global_step  # steps completed so far; this is step ``step + 1``
        if step < self.start_step or (step - self.start_step) % self.every_n_steps:
            return
        start = time.perf_counter()
        if self._structure() != self._shape:  # pruned by someone else since the last reset
            logger.info("model structure changed at step %d: gradient importance restarts", step)
            self.reset()
        seen = self.importance.accumulate()
        self.total_seconds += time.perf_counter() - start
        if not seen:
            self.available = False
            logger.warning(
                "Gradient importance is unavailable: the MLP weights have no gradient (frozen, e.g. "
                "under LoRA). Use an activation-based scorer with calibration data instead."
            )
