"""Weights & Biases tracking of the rounds: per-round scalars, a bias trajectory figure, summary tables.

One W&B run per output folder: its id is kept in state.json, so a resumed run continues the same run.

Example:
    >>> tracker = RoundTracker(config, state, Path("out"), is_main=True)  # doctest: +SKIP
    >>> tracker.log_round(0, state["baseline"], state)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from ..callbacks.base import figure_to_rgb
from .config import PipelineConfig

__all__ = ["RoundTracker"]

_SUMMARY_COLUMNS = [
    "round",
    "parameters",
    "perplexity",
    "bias/activation_mean_difference",
    "bias/score",
    "bias/score_ci_low",
    "bias/score_ci_high",
]


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

        from ..bias import trajectory_figure

        scalars = {
            f"round/{name}": value for name, value in metrics.items() if isinstance(value, (int, float))
        }
        history = [state["baseline"]] + [r["healed"] for r in state["rounds"]]
        figure = trajectory_figure(
            list(range(len(history))),
            {"activation mean difference": [h.get("bias/activation_mean_difference", 0.0) for h in history]},
            xlabel="round",
            ylabel="bias",
            title="Bias across rounds",
        )
        rows = [[i] + [h.get(c) for c in _SUMMARY_COLUMNS[1:]] for i, h in enumerate(history)]
        payload = {
            "round": k,
            **scalars,
            "round/bias_trajectory": wandb.Image(figure_to_rgb(figure)),
            "round/summary": wandb.Table(columns=_SUMMARY_COLUMNS, data=rows),
        }
        if record is not None:
            payload["round/pruning"] = wandb.Table(
                columns=["pruning_type", "method", "parameters_before", "parameters_after"],
                data=[
                    [e["pruning_type"], e["method"], e["parameters_before"], e["parameters_after"]]
                    for e in record["events"]
                ],
            )
        self.run.log(payload)

    def finish(self) -> None:
        """End the W&B run (if one was started)."""
        if self.run is not None:
            self.run.finish()
