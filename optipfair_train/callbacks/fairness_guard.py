"""``FairnessGuardCallback``: warn, stop or mark a checkpoint when a bias metric regresses.

The guard reads a metric from the Trainer's logs (``on_log``), so it works with any source that logs
through the Trainer: :class:`~optipfair_train.callbacks.BiasProbeCallback` (``bias/score``,
``bias/activation_mean_difference``, per-type scores, ...) or the user's own ``trainer.log``. The
baseline is the first value seen (the probe at train begin) unless one is given.

Badness is the distance from an ideal value: ``|value - ideal|`` with ``ideal = 50`` for behavioural
scores (no preference) and ``0`` for activation differences. A value *regresses* when its badness
exceeds the baseline's by more than ``threshold`` **and**, noise-aware, the confidence intervals of
value and baseline do not overlap (``<metric>_ci_low`` / ``<metric>_ci_high`` in the same logs; when
they are missing only the threshold decides, and a warning says so once). After ``patience``
consecutive regressions the guard fires: a warning, a ``fairness_guard/fired`` scalar with the
regression, and as configured ``control.should_training_stop`` and/or ``control.should_save`` (the
saved checkpoint then gets a ``fairness_guard.json`` describing the regression).

Example:
    >>> guard = FairnessGuardCallback(metric="bias/score", threshold=5.0, stop_training=True)
    >>> guard.badness(60.0), guard.badness(45.0)
    (10.0, 5.0)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .base import ReportingCallback

__all__ = ["FairnessGuardCallback", "GUARD_FILE"]

logger = logging.getLogger(__name__)

GUARD_FILE = "fairness_guard.json"


class FairnessGuardCallback(ReportingCallback):
    """Watch a bias metric in the Trainer's logs against its value at train begin (or a given baseline).

    Args:
        trainer: the Trainer (so the guard's own scalars reach the ``report_to`` backends).
        metric: the logged key to watch (default ``"bias/score"``).
        ideal: the unbiased value; default 50 for keys containing ``score``, else 0.
        threshold: how much farther from ``ideal`` than the baseline (in the metric's units) counts
            as a regression.
        baseline / baseline_ci: a fixed baseline value and its ``(low, high)`` interval; default: the
            first logged value and its interval.
        require_ci_separation: also require non-overlapping intervals (noise-aware rule).
        patience: consecutive regressions before firing.
        stop_training: set ``control.should_training_stop`` when firing.
        save_checkpoint: set ``control.should_save`` when firing and mark that checkpoint with
            ``fairness_guard.json``.

    Attributes:
        baseline, baseline_ci: the reference in use.
        events: one record per firing: ``step``, ``value``, ``ci``, ``baseline``, ``regression``.
        fired: True once the guard fired.

    Example:
        >>> FairnessGuardCallback(metric="bias/activation_mean_difference").ideal
        0.0
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        metric: str = "bias/score",
        ideal: float | None = None,
        threshold: float = 0.0,
        baseline: float | None = None,
        baseline_ci: tuple[float, float] | None = None,
        require_ci_separation: bool = True,
        patience: int = 1,
        stop_training: bool = False,
        save_checkpoint: bool = False,
    ):
        super().__init__(trainer)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a logged key such as 'bias/score', got {metric!r}.")
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"threshold must be a non-negative number, got {threshold!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        if baseline_ci is not None:
            if baseline is None:
                raise ValueError("baseline_ci needs baseline.")
            if len(baseline_ci) != 2 or not baseline_ci[0] <= baseline <= baseline_ci[1]:
                raise ValueError(
                    f"baseline_ci must be (low, high) around baseline {baseline}, got {baseline_ci!r}."
                )
        self.metric = metric
        self.ideal = float(
            ideal if ideal is not None else (50.0 if "score" in metric.rsplit("/", 1)[-1] else 0.0)
        )
        self.threshold = float(threshold)
        self._given_baseline = (baseline, tuple(baseline_ci) if baseline_ci is not None else None)
        self.baseline: float | None = baseline
        self.baseline_ci: tuple[float, float] | None = self._given_baseline[1]
        self.require_ci_separation = require_ci_separation
        self.patience = patience
        self.stop_training = stop_training
        self.save_checkpoint = save_checkpoint
        self.events: list[dict[str, Any]] = []
        self.fired = False
        self._strikes = 0
        self._warned_no_ci = False
        self._pending_mark: dict[str, Any] | None = None
        self._state: Any = None

    def badness(self, value: float) -> float:
        """Distance of ``value`` from the ideal (larger = more biased).

        Example:
            >>> FairnessGuardCallback().badness(41.5)
            8.5
        """
        return abs(float(value) - self.ideal)

    def _interval(self, logs: dict[str, Any]) -> tuple[float, float] | None:
        low, high = logs.get(f"{self.metric}_ci_low"), logs.get(f"{self.metric}_ci_high")
        return (float(low), float(high)) if low is not None and high is not None else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs):
        if not logs or self.metric not in logs:
            return
        if state is not self._state:
            # a new train() call (the Trainer makes a new TrainerState): start from the given baseline.
            # Not done in on_train_begin: a probe registered before the guard logs its train-begin
            # value before the guard's own on_train_begin would run.
            self._state = state
            self.baseline, self.baseline_ci = self._given_baseline
            self._strikes = 0
        value = float(logs[self.metric])
        ci = self._interval(logs)
        if self.baseline is None:
            self.baseline, self.baseline_ci = value, ci
            logger.info("fairness guard baseline %s = %.4g (interval %s)", self.metric, value, ci)
            return
        regression = self.badness(value) - self.badness(self.baseline)
        separated = True
        if self.require_ci_separation:
            if ci is None or self.baseline_ci is None:
                if not self._warned_no_ci:
                    logger.warning(
                        "fairness guard: no %s_ci_low/_ci_high in the logs; deciding on the threshold alone.",
                        self.metric,
                    )
                    self._warned_no_ci = True
            else:
                separated = ci[1] < self.baseline_ci[0] or ci[0] > self.baseline_ci[1]
        if regression > self.threshold and separated:
            self._strikes += 1
        else:
            self._strikes = 0
            return
        if self._strikes < self.patience:
            return
        self._fire(args, state, control, value, ci, regression)

    def _fire(self, args: Any, state: Any, control: Any, value: float, ci, regression: float) -> None:
        self._strikes = 0
        self.fired = True
        event = {
            "step": state.global_step,
            "metric": self.metric,
            "value": value,
            "ci": list(ci) if ci else None,
            "baseline": self.baseline,
            "baseline_ci": list(self.baseline_ci) if self.baseline_ci else None,
            "ideal": self.ideal,
            "regression": regression,
            "threshold": self.threshold,
            "stopped_training": self.stop_training,
        }
        self.events.append(event)
        logger.warning(
            "FAIRNESS GUARD at step %d: %s = %.4g %s moved %.4g farther from %.4g than the baseline %.4g %s%s",
            state.global_step,
            self.metric,
            value,
            list(ci) if ci else "",
            regression,
            self.ideal,
            self.baseline,
            list(self.baseline_ci) if self.baseline_ci else "",
            "; stopping training" if self.stop_training else "",
        )
        if self.stop_training:
            control.should_training_stop = True
        if self.save_checkpoint:
            control.should_save = True
            self._pending_mark = event
        self.log_scalars(args, state, {"fairness_guard/fired": 1.0, "fairness_guard/regression": regression})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs):
        if self._pending_mark is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, GUARD_FILE), "w", encoding="utf-8") as f:
                json.dump(self._pending_mark, f, indent=2)
            logger.warning("fairness guard: marked %s", folder)
            self._pending_mark = None
