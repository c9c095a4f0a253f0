"""Figures and tables of :class:`~optipfair_train.callbacks.BiasProbeCallback`: the per-layer mean
difference bars and heatmap, the StereoSet bias-type heatmap and the trajectory of the scores, sent to
W&B / TensorBoard through the callback's reporting helpers.
"""

from __future__ import annotations

import logging
from typing import Any

from ..bias import (
    bias_type_heatmap_figure,
    layer_heatmap_figure,
    mean_difference_figure,
    parse_layer_key,
    trajectory_figure,
)
from .base import wandb_active

__all__ = ["LAYER_TABLE_COLUMNS", "ProbeMediaMixin"]

logger = logging.getLogger(__name__)

LAYER_TABLE_COLUMNS = [
    "step",
    "layer_key",
    "component",
    "layer",
    "mean_difference",
    "ci_low",
    "ci_high",
    "normalized_difference",
    "normalized_ci_low",
    "normalized_ci_high",
]


class ProbeMediaMixin:
    """The media half of ``BiasProbeCallback`` (it reads the callback's probe history and prefix)."""

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
            figures[f"{p}layer_heatmap"] = layer_heatmap_figure(
                {f"step {s}": h for s, h in self._layer_history}, ylabel="step"
            )
            rows = [
                [
                    state.global_step,
                    key,
                    *parse_layer_key(key),
                    e["mean_difference"],
                    *e["mean_difference_ci"],
                    e["normalized_difference"],
                    *e["normalized_difference_ci"],
                ]
                for key, e in layer_metrics.items()
            ]
            self.log_table(args, state, f"{p}layers", LAYER_TABLE_COLUMNS, rows)
        if self._type_history:
            figures[f"{p}stereoset_bias_types"] = bias_type_heatmap_figure(
                {f"step {s}": h for s, h in self._type_history}, ylabel="step"
            )
        trajectory = self._trajectory_figure()
        if trajectory is not None:
            figures[f"{p}trajectory"] = trajectory
        sent = self.log_figures(args, state, figures)
        logger.debug("bias figures sent to %s", sent)

    def _trajectory_figure(self):
        p = self.prefix
        if "stereoset" in self.probes:
            keys, reference = ["stereoset/ss", "stereoset/lms", "stereoset/icat"], 50.0
        elif "behaviour" in self.probes:
            keys, reference = [f"{p}score"], 50.0
        else:
            keys, reference = [f"{p}activation_normalized_difference"], None
        points = [(h["step"], h["scalars"]) for h in self.history if keys[0] in h["scalars"]]
        if not points:
            return None
        steps = [s for s, _ in points]
        series = {k: [s[k] for _, s in points] for k in keys}
        bands = {
            k: ([s[f"{k}_ci_low"] for _, s in points], [s[f"{k}_ci_high"] for _, s in points])
            for k in keys
            if all(f"{k}_ci_low" in s for _, s in points)
        }
        return trajectory_figure(
            steps,
            series,
            bands,
            xlabel="step",
            ylabel="score",
            title="Bias during training",
            reference=reference,
        )
