"""Weights & Biases tracking of the rounds: per-round scalars, bias heatmaps, pruning and summary tables.

One W&B run per output folder: its id is kept in state.json, so a resumed run continues the same run;
the healing Trainers log their per-step curves (``train/*``, the probe's ``bias/*``) into it too.
Per round (``round`` is the x-axis of every ``round/*`` key): the healed model's scalars as
``round/<metric>`` and the pruned model's as ``round/pruned/<metric>``; images ``round/bias_heatmap``
(component x layer of the healed model), ``round/stereoset_bias_types`` and ``round/layer_heatmap``
(every stage so far); tables ``round/pruning`` (this round's pruning events) and ``round/summary``.

Example:
    >>> tracker = RoundTracker(config, state, Path("out"), is_main=True)  # doctest: +SKIP
    >>> tracker.log_round(0, state["baseline"], state)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from ..bias.figures import figure_to_rgb
from .card import STAGE_KEYS
from .config import PipelineConfig
from .figures import component_layer_heatmap, stage_figures, stages

__all__ = ["RoundTracker"]

# the card's stage numbers, plus the normalised activation difference (the card leaves it out: alone it
# cannot carry a fairness claim, but the dashboard plots it)
_SUMMARY_COLUMNS = ["stage", *STAGE_KEYS, "bias/activation_normalized_difference"]

_PRUNING_COLUMNS = [
    "round",
    "pruning_type",
    "method",
    "pruning_percentage",
    "parameters_before",
    "parameters_after",
    "removed_layers",
    "intermediate_sizes",
    "kept_kv_heads",
]


def _cell(value: Any) -> Any:
    """A table cell: lists (per-layer sizes, removed layers) as text, so every row has one type."""
    return ", ".join(map(str, value)) if isinstance(value, list) else value


class RoundTracker:
    """Logs each finished round to W&B when ``report_to == "wandb"`` (main process only); else a no-op.

    ``state`` gets ``wandb_run_id`` (the caller saves it).
    """

    def __init__(self, config: PipelineConfig, state: dict[str, Any], out: Path, is_main: bool):
        self.run = None
        if config.run.report_to != "wandb" or not is_main:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = state.setdefault("wandb_run_id", uuid.uuid4().hex[:8])
        self.run = wandb.run or wandb.init(
            project="optipfair-train",
            name=config.run.run_name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config.to_dict(),
        )
        self.run.define_metric("round")
        self.run.define_metric("round/*", step_metric="round")

    def log_round(self, k: int, metrics: dict, state: dict[str, Any], record: dict | None = None) -> None:
        """Log round ``k`` (0 = the unpruned baseline) with the history so far in ``state``.

        Example:
            >>> tracker.log_round(1, record["healed"], state, record)  # doctest: +SKIP
        """
        if self.run is None:
            return
        import wandb

        def numbers(m: dict, prefix: str) -> dict:
            return {f"{prefix}{name}": v for name, v in m.items() if isinstance(v, (int, float))}

        payload = {"round": k, **numbers(metrics, "round/")}
        if record is not None:
            payload.update(numbers(record["pruned"], "round/pruned/"))
        images = {f"round/{name}": figure for name, figure in stage_figures(state).items()}
        heatmap = component_layer_heatmap(metrics, f"Normalised activation difference, round {k}")
        if heatmap is not None:
            images["round/bias_heatmap"] = heatmap
        payload.update({key: wandb.Image(figure_to_rgb(figure)) for key, figure in images.items()})
        rows = [[name] + [m.get(c) for c in _SUMMARY_COLUMNS[1:]] for name, m in stages(state)]
        payload["round/summary"] = wandb.Table(columns=_SUMMARY_COLUMNS, data=rows)
        if record is not None:
            payload["round/pruning"] = wandb.Table(
                columns=_PRUNING_COLUMNS,
                data=[[k] + [_cell(e.get(c)) for c in _PRUNING_COLUMNS[1:]] for e in record["events"]],
            )
        self.run.log(payload)

    def finish(self) -> None:
        """End the W&B run (if one was started)."""
        if self.run is not None:
            self.run.finish()
