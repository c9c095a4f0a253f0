"""``FairnessGuardCallback``: warn, stop or mark a checkpoint when a bias metric regresses.

The guard reads metrics from the Trainer's logs (``on_log``), so it works with any source that logs
through the Trainer: :class:`~optipfair_train.callbacks.BiasProbeCallback` (``stereoset/ss``,
``stereoset/icat``, ``bias/score``, ``bias/activation_normalized_difference``, per-type scores, ...)
or the user's own ``trainer.log``. Each metric's baseline is its first value seen (the probe at train
begin) unless one is given. By default it watches StereoSet's SS and ICAT (the default probe's);
``metric="bias/score"`` watches the CrowS-Pairs-style score as before.

Badness is the distance from an ideal value, ``|value - ideal|``: ideal 50 for SS and behavioural
scores (no preference), 0 for activation differences; for ICAT and LMS (higher is better) the badness
is ``-value``, so a drop is a regression. A value *regresses* when its badness exceeds the baseline's
by more than ``threshold`` **and**, noise-aware, the confidence intervals of value and baseline do not
overlap (``<metric>_ci_low`` / ``<metric>_ci_high`` in the same logs; when they are missing only the
threshold decides, and a warning says so once). After ``patience`` consecutive regressions of a metric
the guard fires: a warning, a ``fairness_guard/fired`` scalar with the regression, and as configured
``control.should_training_stop`` and/or ``control.should_save`` (the saved checkpoint then gets a
``fairness_guard.json`` describing the regression).

With ``reference`` (the per-item StereoSet results of a reference model: a pipeline run's
``stage-items/<stage>.json``, or a :func:`~optipfair_train.bias.stereoset_scores` result) and ``probe``
(the :class:`~optipfair_train.callbacks.BiasProbeCallback` that probes the same items, e.g.
:func:`~optipfair_train.bias.held_out_sample` of the run's seed), every StereoSet probe is also paired
with the reference, item by item (:func:`~optipfair_train.bias.stereoset_change`), and logged with the
pipeline's names: ``reference/stereoset/ss_change`` / ``lms_change`` / ``icat_change`` with
``_ci_low`` / ``_ci_high``, per bias type ``reference/stereoset/ss_change_by/<type>``..., and
``reference/stereoset/num_items``; the last one is kept in ``last_reference_change``.

Example:
    >>> guard = FairnessGuardCallback(threshold=5.0, stop_training=True)
    >>> guard.badness(60.0), guard.badness(45.0), guard.badness(70.0, "stereoset/icat")
    (10.0, 5.0, -70.0)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import ReportingCallback

__all__ = ["FairnessGuardCallback", "GUARD_FILE", "DEFAULT_GUARD_METRICS"]

logger = logging.getLogger(__name__)

GUARD_FILE = "fairness_guard.json"
DEFAULT_GUARD_METRICS = ("stereoset/ss", "stereoset/icat")


def default_ideal(metric: str) -> float | None:
    """The unbiased value of a logged metric; None for higher-is-better scores (ICAT, LMS).

    Example:
        >>> default_ideal("stereoset/ss"), default_ideal("stereoset/icat"), default_ideal("bias/score")
        (50.0, None, 50.0)
    """
    key = metric.lower()
    if "icat" in key or "lms" in key:
        return None
    if key.endswith(("stereoset/ss", "stereoset_ss")) or "score" in key.rsplit("/", 1)[-1]:
        return 50.0
    return 0.0


class FairnessGuardCallback(ReportingCallback):
    """Watch bias metrics in the Trainer's logs against their values at train begin (or given baselines).

    Args:
        trainer: the Trainer (so the guard's own scalars reach the ``report_to`` backends).
        metric: the logged key, or keys, to watch (default: StereoSet SS and ICAT,
            :data:`DEFAULT_GUARD_METRICS`; ``"bias/score"`` for the CrowS-Pairs-style score).
        ideal: the unbiased value (one number for every metric, or a dict per metric; None in a dict
            means higher is better); default from the key (see :func:`default_ideal`).
        threshold: how much worse than the baseline (in the metric's units) counts as a regression.
        baseline / baseline_ci: a fixed baseline value and its ``(low, high)`` interval (one metric
            only); default: the first logged value and its interval.
        require_ci_separation: also require non-overlapping intervals (noise-aware rule).
        patience: consecutive regressions (of one metric) before firing.
        stop_training: set ``control.should_training_stop`` when firing.
        save_checkpoint: set ``control.should_save`` when firing and mark that checkpoint with
            ``fairness_guard.json``.
        reference: per-item StereoSet results of a reference model to pair every probe with (a path
            to a pipeline run's ``stage-items/<stage>.json``, or a mapping with ``items``); needs ``probe``.
        probe: the ``BiasProbeCallback`` whose StereoSet results are paired; it must probe the
            reference's items.

    Attributes:
        metrics: the watched keys; baselines: ``{metric: (value, interval)}`` in use.
        baseline, baseline_ci: the first metric's reference.
        events: one record per firing: ``step``, ``metric``, ``value``, ``ci``, ``baseline``, ``regression``.
        fired: True once the guard fired.
        last_reference_change: the last probe's :func:`~optipfair_train.bias.stereoset_change` vs ``reference``.

    Example:
        >>> FairnessGuardCallback(metric="bias/activation_normalized_difference").ideal
        0.0
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        metric: str | Sequence[str] = DEFAULT_GUARD_METRICS,
        ideal: float | Mapping[str, float | None] | None = None,
        threshold: float = 0.0,
        baseline: float | None = None,
        baseline_ci: tuple[float, float] | None = None,
        require_ci_separation: bool = True,
        patience: int = 1,
        stop_training: bool = False,
        save_checkpoint: bool = False,
        reference: str | os.PathLike | Mapping[str, Any] | None = None,
        probe: Any | None = None,
    ):
        super().__init__(trainer)
        self.reference = _reference_items(reference, probe) if reference is not None else None
        self.probe, self.last_reference_change = probe, None
        self._paired: Any = None
        metrics = (metric,) if isinstance(metric, str) else tuple(metric)
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise ValueError(
                f"metric must be a logged key such as 'stereoset/ss' (or a list), got {metric!r}."
            )
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"threshold must be a non-negative number, got {threshold!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}.")
        if baseline is not None and len(metrics) > 1:
            raise ValueError(f"baseline is for one metric; {len(metrics)} are watched: {metrics}.")
        if baseline_ci is not None:
            if baseline is None:
                raise ValueError("baseline_ci needs baseline.")
            if len(baseline_ci) != 2 or not baseline_ci[0] <= baseline <= baseline_ci[1]:
                raise ValueError(
                    f"baseline_ci must be (low, high) around baseline {baseline}, got {baseline_ci!r}."
                )
        self.metrics = metrics
        self.metric = metrics[0]
        ideals = ideal if isinstance(ideal, Mapping) else {}
        self.ideals: dict[str, float | None] = {
            m: (
                ideals[m]
                if m in ideals
                else (
                    float(ideal) if ideal is not None and not isinstance(ideal, Mapping) else default_ideal(m)
                )
            )
            for m in metrics
        }
        self.threshold = float(threshold)
        given_ci = tuple(baseline_ci) if baseline_ci is not None else None
        self._given = {m: (baseline, given_ci) if m == self.metric else (None, None) for m in metrics}
        self.baselines: dict[str, tuple[float | None, tuple[float, float] | None]] = dict(self._given)
        self.require_ci_separation = require_ci_separation
        self.patience = patience
        self.stop_training = stop_training
        self.save_checkpoint = save_checkpoint
        self.events: list[dict[str, Any]] = []
        self.fired = False
        self._strikes = dict.fromkeys(metrics, 0)
        self._warned_no_ci = False
        self._pending_mark: dict[str, Any] | None = None
        self._state: Any = None

    @property
    def ideal(self) -> float | None:
        """The first metric's ideal value (None: higher is better).

        Example:
            >>> FairnessGuardCallback().ideal
            50.0
        """
        return self.ideals[self.metric]

    @property
    def baseline(self) -> float | None:
        """The first metric's baseline value.

        Example:
            >>> FairnessGuardCallback(metric="bias/score", baseline=52.0).baseline
            52.0
        """
        return self.baselines[self.metric][0]

    @property
    def baseline_ci(self) -> tuple[float, float] | None:
        """The first metric's baseline interval.

        Example:
            >>> FairnessGuardCallback(metric="bias/score", baseline=52.0, baseline_ci=(48.0, 56.0)).baseline_ci
            (48.0, 56.0)
        """
        return self.baselines[self.metric][1]

    def badness(self, value: float, metric: str | None = None) -> float:
        """How biased ``value`` of ``metric`` (default: the first watched) is: larger = worse.

        Example:
            >>> FairnessGuardCallback().badness(41.5)
            8.5
        """
        ideal = self.ideals[metric or self.metric]
        return -float(value) if ideal is None else abs(float(value) - ideal)

    def _interval(self, logs: dict[str, Any], metric: str) -> tuple[float, float] | None:
        low, high = logs.get(f"{metric}_ci_low"), logs.get(f"{metric}_ci_high")
        return (float(low), float(high)) if low is not None and high is not None else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs):
        latest = self.probe.last_stereoset if self.reference is not None else None
        if latest is not None and latest is not self._paired:  # a new probe: pair it once
            self._log_reference_change(args, state)
        if not logs or not any(m in logs for m in self.metrics):
            return
        if state is not self._state:
            # a new train() call (the Trainer makes a new TrainerState): start from the given baselines.
            # Not done in on_train_begin: a probe registered before the guard logs its train-begin
            # value before the guard's own on_train_begin would run.
            self._state = state
            self.baselines = dict(self._given)
            self._strikes = dict.fromkeys(self.metrics, 0)
        for metric in self.metrics:
            if metric in logs:
                self._check(args, state, control, metric, float(logs[metric]), self._interval(logs, metric))

    def _check(self, args: Any, state: Any, control: Any, metric: str, value: float, ci) -> None:
        base, base_ci = self.baselines[metric]
        if base is None:
            self.baselines[metric] = (value, ci)
            logger.info("fairness guard baseline %s = %.4g (interval %s)", metric, value, ci)
            return
        regression = self.badness(value, metric) - self.badness(base, metric)
        separated = True
        if self.require_ci_separation:
            if ci is None or base_ci is None:
                if not self._warned_no_ci:
                    logger.warning(
                        "fairness guard: no %s_ci_low/_ci_high in the logs; deciding on the threshold alone.",
                        metric,
                    )
                    self._warned_no_ci = True
            else:
                separated = ci[1] < base_ci[0] or ci[0] > base_ci[1]
        if not (regression > self.threshold and separated):
            self._strikes[metric] = 0
            return
        self._strikes[metric] += 1
        if self._strikes[metric] >= self.patience:
            self._fire(args, state, control, metric, value, ci, regression)

    def _fire(
        self, args: Any, state: Any, control: Any, metric: str, value: float, ci, regression: float
    ) -> None:
        self._strikes[metric] = 0
        self.fired = True
        base, base_ci = self.baselines[metric]
        ideal = self.ideals[metric]
        event = {
            "step": state.global_step,
            "metric": metric,
            "value": value,
            "ci": list(ci) if ci else None,
            "baseline": base,
            "baseline_ci": list(base_ci) if base_ci else None,
            "ideal": ideal,
            "regression": regression,
            "threshold": self.threshold,
            "stopped_training": self.stop_training,
        }
        self.events.append(event)
        logger.warning(
            "FAIRNESS GUARD at step %d: %s = %.4g %s is %.4g worse (%s) than the baseline %.4g %s%s",
            state.global_step,
            metric,
            value,
            list(ci) if ci else "",
            regression,
            "lower; higher is better" if ideal is None else f"farther from {ideal:g}",
            base,
            list(base_ci) if base_ci else "",
            "; stopping training" if self.stop_training else "",
        )
        if self.stop_training:
            control.should_training_stop = True
        if self.save_checkpoint:
            control.should_save = True
            self._pending_mark = event
        self.log_scalars(args, state, {"fairness_guard/fired": 1.0, "fairness_guard/regression": regression})

    def _log_reference_change(self, args: Any, state: Any) -> None:
        """Pair the probe's new StereoSet result with the reference and log the change (once per probe)."""
        from ..bias import STEREOSET_SCORES, stereoset_change, stereoset_change_scalars

        self._paired = result = self.probe.last_stereoset
        p = self.probe
        change = stereoset_change(self.reference, result, p.confidence, p.n_bootstrap, seed=p.seed)
        self.last_reference_change = change
        scalars = stereoset_change_scalars(change, "reference/stereoset/", STEREOSET_SCORES, by="_by/")
        self.log_scalars(args, state, scalars | {"reference/stereoset/num_items": change["num_items"]})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs):
        if self._pending_mark is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, GUARD_FILE), "w", encoding="utf-8") as f:
                json.dump(self._pending_mark, f, indent=2)
            logger.warning("fairness guard: marked %s", folder)
            self._pending_mark = None


def _reference_items(reference: str | os.PathLike | Mapping[str, Any], probe: Any) -> dict[str, Any]:
    """The reference's StereoSet per-item records (``{"items": [...], "ids": [...]?}``), checked to be the
    probe's items."""
    from ..bias import item_id

    where = "reference"
    if not isinstance(reference, Mapping):
        where = str(reference)
        try:
            reference = json.loads(Path(reference).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(
                f"reference: cannot read {where} ({err}); give a stage-items/<stage>.json file."
            ) from err
    part = reference.get("stereoset", reference) if isinstance(reference, Mapping) else None
    if not isinstance(part, Mapping) or not part.get("items"):
        raise ValueError(
            f"reference: {where} holds no StereoSet per-item results (a pipeline run's "
            "stage-items/<stage>.json, or a stereoset_scores result)."
        )
    items = getattr(probe, "stereoset_items", None)
    if not items:
        raise ValueError("reference needs probe=: the BiasProbeCallback (with its StereoSet probe) to pair.")
    ids = part.get("ids")
    if ids is not None and list(ids) != [item_id(item) for item in items]:
        raise ValueError(
            f"reference: {where} holds other StereoSet items ({len(ids)}) than the probe's ({len(items)}): give "
            "the probe the run's judged items, held_out_sample(items, stereoset_sample_size, seed), and "
            "stereoset_sample_size=None."
        )
    if ids is None and len(part["items"]) != len(items):
        raise ValueError(f"reference: {where} holds {len(part['items'])} items, the probe {len(items)}.")
    return dict(part)
