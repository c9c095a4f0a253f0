"""``BiasProbeCallback``: bias probes during training, logged on the Trainer's step axis.

At train begin, every ``every_n_steps`` optimizer steps, after each evaluation and at train end, the
callback runs the bias package's probes on a fixed sample of prompt pairs:

- the behavioural score (:func:`~optipfair_train.bias.behavioural_bias_score`: percent of pairs whose
  first, stereotyped sentence the model prefers, 50 = no preference, with a bootstrap interval and
  a score per bias type);
- activation differences (:func:`~optipfair_train.bias.probe_activation_bias`: mean |Δ activation|
  per layer and component, streamed, with intervals).

Their scalars (:func:`~optipfair_train.bias.summary_scalars`, keys ``bias/score``,
``bias/score_ci_low``, ``bias/activation_mean_difference``, ...) go through ``trainer.log`` to every
``report_to`` backend; when W&B is active the mean-difference bars, a heatmap of the per-layer
differences over the probes so far, and the trajectory of the score are logged as ``wandb.Image``
and the per-layer values as a ``wandb.Table`` (figures also go to TensorBoard when it is a backend).

A probe runs in eval mode under ``torch.no_grad`` and restores the model's mode; it touches neither
gradients nor the global random state (sampling and bootstraps use their own seeded generators), so a
run with the probe trains exactly like one without. Under DDP every rank probes the same weights and
gets the same numbers (so decisions based on them agree); media are written by the main process.

Cost: one forward pass over ``2 x sample_size`` short sentences per probe and per probe kind. On the
demo model one behavioural probe of the 8 built-in pairs costs about 0.3 of a training step (batch
2 x 128 tokens), the activation probe about 0.25 more. The defaults (behavioural score on the 8
built-in pairs, at train begin and end and after evaluations only) keep the overhead of a 24-step run
under 3% (``bench/bench_callbacks.py``); in long runs add ``every_n_steps``, ``"activation"`` and a
CrowS-Pairs sample for trajectories.

Example:
    >>> probe = BiasProbeCallback(trainer, pairs="crows-pairs:crows_pairs_anonymized.csv",
    ...                           sample_size=64, every_n_steps=200)  # doctest: +SKIP
    >>> trainer.add_callback(probe)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..bias import (
    behavioural_bias_score,
    heatmap_figure,
    load_pairs,
    mean_difference_figure,
    parse_layer_key,
    probe_activation_bias,
    sample_pairs,
    select_layer_keys,
    summary_scalars,
    trajectory_figure,
)
from ..bias.pairs import PromptPair
from .base import ReportingCallback, report_to, wandb_active

__all__ = ["BiasProbeCallback", "PROBES"]

logger = logging.getLogger(__name__)

PROBES = ("behaviour", "activation")
LAYER_TABLE_COLUMNS = ["step", "layer_key", "component", "layer", "mean_difference", "ci_low", "ci_high"]


def _as_pairs(pairs: str | Sequence[Sequence[str]] | None, what: str) -> list[PromptPair]:
    if pairs is None or isinstance(pairs, str):
        loaded = load_pairs(pairs or "default")
    else:
        loaded = [p if isinstance(p, PromptPair) else PromptPair(*p) for p in pairs]
    if not loaded:
        raise ValueError(f"{what}: no prompt pairs.")
    return loaded


class BiasProbeCallback(ReportingCallback):
    """Run bias probes during training and log them through the Trainer (see the module docstring).

    Args:
        trainer: the Trainer / TRL trainer (for ``trainer.log`` and TensorBoard figures).
        tokenizer: defaults to the Trainer's ``processing_class``.
        pairs: prompt pairs or a :func:`~optipfair_train.bias.load_pairs` spec (``"default"``,
            ``"crows-pairs:PATH"``, a file). Sampled once (``sample_size``, ``seed``): every probe sees
            the same pairs, so differences between probes are the model's.
        activation_pairs: pairs for the activation probe (default: ``pairs``).
        sample_size: pairs per probe (None: all).
        probes: which probes to run, from ``("behaviour", "activation")``. Default: the behavioural
            score only (one forward pass per probe); add ``"activation"`` for per-layer metrics, the
            mean-difference / heatmap figures and the per-layer table (a second forward pass).
        every_n_steps: also probe after every n-th optimizer step (None: never in the middle).
        at_train_begin / at_train_end / at_evaluate: when else to probe. A probe is never repeated at
            the same step (e.g. evaluation and train end at the last step).
        layers / components: what the activation probe hooks (see ``select_layer_keys``).
        batch_size: pairs per forward pass.
        n_bootstrap / confidence: bootstrap intervals.
        log_media: log figures and a per-layer table to W&B / TensorBoard when they are backends.
        prefix: scalar key prefix.
        seed: for sampling and bootstraps.

    Attributes:
        history: one record per probe: ``step``, ``scalars``, ``seconds``.
        total_seconds: wall time spent probing.

    Raises:
        ValueError: unknown probe, bad schedule, empty or unknown pair set, bad sample size.

    Example:
        >>> cb = BiasProbeCallback(pairs=[("The man is a nurse.", "The woman is a nurse.")])
        >>> cb.probes, len(cb.pairs)
        (('behaviour',), 1)
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        tokenizer: Any | None = None,
        pairs: str | Sequence[Sequence[str]] | None = "default",
        activation_pairs: str | Sequence[Sequence[str]] | None = None,
        sample_size: int | None = 32,
        probes: Sequence[str] = ("behaviour",),
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
    ):
        super().__init__(trainer)
        probes = tuple(probes)
        unknown = [p for p in probes if p not in PROBES]
        if unknown or not probes:
            raise ValueError(f"Unknown or no probe(s) {unknown or probes}; choose from {', '.join(PROBES)}.")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}.")
        if sample_size is not None and (not isinstance(sample_size, int) or sample_size < 1):
            raise ValueError(f"sample_size must be a positive integer or None, got {sample_size!r}.")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
        self.tokenizer = tokenizer
        self.probes = probes
        self.pairs = sample_pairs(_as_pairs(pairs, "pairs"), sample_size, seed)
        self.activation_pairs = (
            self.pairs
            if activation_pairs is None
            else sample_pairs(_as_pairs(activation_pairs, "activation_pairs"), sample_size, seed)
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
        self._layer_history: list[tuple[int, dict[str, float]]] = []
        self._last_step: int | None = None
        if trainer is not None and "activation" in probes:
            select_layer_keys(trainer.model, layers, self.components)  # raises for a bad selection

    # ---- the probe -----------------------------------------------------------------------------
    def probe(
        self, model: torch.nn.Module, tokenizer: Any
    ) -> tuple[dict[str, float], dict | None, dict | None]:
        """Run the configured probes once; returns ``(scalars, activation_result, behaviour_result)``.

        Example:
            >>> scalars, _, _ = cb.probe(model, tokenizer)  # doctest: +SKIP
        """
        if tokenizer is None:
            raise ValueError(
                "BiasProbeCallback needs a tokenizer: pass tokenizer=... or give the Trainer a processing_class."
            )
        was_training = model.training
        grad_enabled = torch.is_grad_enabled()
        behaviour = activation = None
        try:
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
        scalars = summary_scalars(activation=activation, behaviour=behaviour, prefix=self.prefix)
        return scalars, activation, behaviour

    def _run(self, args: Any, state: Any, model: torch.nn.Module, tokenizer: Any, when: str) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        start = time.perf_counter()
        scalars, activation, behaviour = self.probe(model, self.tokenizer or tokenizer)
        seconds = time.perf_counter() - start
        self.total_seconds += seconds
        self.history.append({"step": state.global_step, "when": when, "scalars": scalars, "seconds": seconds})
        logger.info(
            "bias probe at step %d (%s) in %.2f s: %s",
            state.global_step,
            when,
            seconds,
            ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if "/" not in k[len(self.prefix) :]),
        )
        self.log_scalars(args, state, scalars)
        if activation is not None:
            layer_values = {
                k: v["mean_difference"] for k, v in activation["aggregate"]["layer_metrics"].items()
            }
            self._layer_history.append((state.global_step, layer_values))
        if self.log_media and state.is_world_process_zero and self._media_backend(args):
            self._log_media(args, state, activation)

    def _media_backend(self, args: Any) -> bool:
        return wandb_active(args) or self._tensorboard_writer(args) is not None

    def _log_media(self, args: Any, state: Any, activation: dict | None) -> None:
        figures = {}
        p = self.prefix
        if activation is not None:
            layer_metrics = activation["aggregate"]["layer_metrics"]
            values: dict[str, dict[int, float]] = {}
            errors: dict[str, dict[int, tuple[float, float]]] = {}
            for key, entry in layer_metrics.items():
                component, layer = parse_layer_key(key)
                values.setdefault(component, {})[layer] = entry["mean_difference"]
                errors.setdefault(component, {})[layer] = tuple(entry["mean_difference_ci"])
            figures[f"{p}mean_difference"] = mean_difference_figure(
                values, errors, title=f"Mean activation difference by layer (step {state.global_step})"
            )
            keys = list(layer_metrics)
            steps = [s for s, _ in self._layer_history]
            matrix = np.array([[h.get(k, np.nan) for k in keys] for _, h in self._layer_history])
            figures[f"{p}layer_heatmap"] = heatmap_figure(
                matrix,
                [str(s) for s in steps],
                keys,
                title="Mean activation difference per layer key over training",
                xlabel="layer key",
                ylabel="step",
            )
            rows = [
                [
                    state.global_step,
                    key,
                    *parse_layer_key(key),
                    e["mean_difference"],
                    *e["mean_difference_ci"],
                ]
                for key, e in layer_metrics.items()
            ]
            self.log_table(args, state, f"{p}layers", LAYER_TABLE_COLUMNS, rows)
        trajectory = self._trajectory_figure()
        if trajectory is not None:
            figures[f"{p}trajectory"] = trajectory
        sent = self.log_figures(args, state, figures)
        logger.debug("bias figures sent to %s", sent)

    def _trajectory_figure(self):
        p = self.prefix
        key = f"{p}score" if "behaviour" in self.probes else f"{p}activation_mean_difference"
        points = [(h["step"], h["scalars"]) for h in self.history if key in h["scalars"]]
        if not points:
            return None
        steps = [s for s, _ in points]
        bands = None
        if all(f"{key}_ci_low" in s for _, s in points):
            bands = {key: ([s[f"{key}_ci_low"] for _, s in points], [s[f"{key}_ci_high"] for _, s in points])}
        return trajectory_figure(
            steps,
            {key: [s[key] for _, s in points]},
            bands,
            xlabel="step",
            ylabel=key,
            title="Bias during training",
            reference=50.0 if key == f"{p}score" else None,
        )

    # ---- events --------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs
    ):
        self._last_step = None
        if "activation" in self.probes:
            select_layer_keys(model, self.layers, self.components)
        if self.at_train_begin:
            self._run(args, state, model, processing_class, "train_begin")

    def on_step_end(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._run(args, state, model, processing_class, "step")

    def on_evaluate(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.at_evaluate:
            self._run(args, state, model, processing_class, "evaluate")

    def on_train_end(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.at_train_end:
            self._run(args, state, model, processing_class, "train_end")

    def __repr__(self) -> str:
        return (
            f"BiasProbeCallback(probes={self.probes}, pairs={len(self.pairs)}, every_n_steps={self.every_n_steps}, "
            f"backends={report_to(getattr(self.trainer, 'args', None))})"
        )
