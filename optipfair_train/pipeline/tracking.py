"""Weights & Biases tracking of the rounds: per-round scalars, bias figures, tables, healing curves, verdict.

One W&B run per output folder: its id is kept in state.json, so a resumed run continues the same run.
The key vocabulary (sections are the first part of a key; no key is both a value and a prefix):

- ``round``: x-axis of the per-round keys; ``pipeline/step``: x-axis of the healing curves, a step that
  continues across rounds (round K's step s is ``(K-1) * heal_steps + s``), so rounds do not overlap;
- ``healed/<metric>`` and ``pruned/<metric>`` each round (round 0 holds the base model under both), with
  the stage metrics named as in :func:`wandb_metric_name`: ``parameters``, ``perplexity/heal_domain``
  (held-out text of the healing domain), ``perplexity/general`` (general text no healing saw),
  ``stereoset/ss`` / ``stereoset/lms`` / ``stereoset/icat`` (``_ci_low`` / ``_ci_high``), the paired
  ``stereoset/ss_change`` / ``stereoset/icat_change`` vs the base, ``stereoset/num_items``,
  ``bias/activation_normalized_difference`` (and ``_ci_*``), CrowS-Pairs ``bias/score`` when measured;
  with ``reference_run``, the paired changes vs that run's same stage, ``reference/stereoset/ss_change``
  (lms, icat, ``_ci_*``, ``ss_change_by/<type>``), ``reference/zeroshot/accuracy_change``,
  ``reference/perplexity_ratio`` (:mod:`.reference`);
- a breakdown of a value ``X`` is ``X_by/<part>``: StereoSet per bias type ``<stage>/stereoset/ss_by/race``
  (and ``lms_by``, ``icat_by``, ``num_items_by``, ``ss_ci_low_by``...), ``bias/score_by/gender``,
  ``bias/activation_mean_difference_by/mlp_output``; the callbacks use the same metric names;
- ``figures/<name>``: images (``figures/bias_heatmap``, ``figures/stereoset_bias_types``,
  ``figures/layer_heatmap``); ``tables/summary`` (every stage so far) and ``tables/pruning``;
- ``heal/<name>``: the healing Trainer's logs (``heal/loss``, ``heal/learning_rate``, ``heal/grad_norm``,
  a probe's ``heal/bias/score`` ...) on ``pipeline/step``;
- at the end: ``speed/<prefill|decode>/<base|final>_tokens_per_second`` and ``speed/<...>/ratio``, and the
  verdict's numbers ``verdict/*`` (:func:`~optipfair_train.pipeline.verdict.wandb_summary`) in the summary.

Example:
    >>> tracker = RoundTracker(config, state, Path("out"), is_main=True)  # doctest: +SKIP
    >>> tracker.log_round(0, state.baseline, state)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..bias.figures import figure_to_rgb
from .card import STAGE_KEYS
from .config import PipelineConfig
from .evaluate import LAYERS_KEY
from .figures import component_layer_heatmap, stage_figures, stages
from .run_state import RunState

__all__ = ["HealCurve", "RoundTracker", "stage_scalars", "wandb_metric_name"]

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


def wandb_metric_name(name: str) -> str:
    """A stage metric's W&B name: the healing-domain perplexity says so; everything else keeps its name.

    Example:
        >>> wandb_metric_name("perplexity"), wandb_metric_name("perplexity/general")
        ('perplexity/heal_domain', 'perplexity/general')
    """
    return "perplexity/heal_domain" if name == "perplexity" else name


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unnest(scalars: dict[str, float]) -> dict[str, float]:
    """A breakdown of a value ``X`` logged as ``X/part`` (``bias/score/gender`` beside ``bias/score``)
    becomes ``X_by/part``: W&B cannot show one key as both a value and a section."""
    return {
        (f"{k.rsplit('/', 1)[0]}_by/{k.rsplit('/', 1)[1]}" if k.rsplit("/", 1)[0] in scalars else k): v
        for k, v in scalars.items()
    }


def stage_scalars(metrics: dict, stage: str) -> dict[str, float]:
    """One stage's scalars under its W&B keys, ``<stage>/<metric>`` (breakdowns as ``X_by/<part>``).

    Example:
        >>> stage_scalars({"perplexity": 9.5, "stereoset/ss": 55.0, "stereoset/ss/race": 60.0}, "healed")
        {'healed/perplexity/heal_domain': 9.5, 'healed/stereoset/ss': 55.0, 'healed/stereoset/ss_by/race': 60.0}
    """
    return _unnest({f"{stage}/{wandb_metric_name(k)}": v for k, v in metrics.items() if _number(v)})


def _cell(value: Any) -> Any:
    """A table cell: lists (per-layer sizes, removed layers) as text, so every row has one type."""
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _summary_table(state: RunState) -> tuple[list[str], list[list[Any]]]:
    """The stage table (W&B names), without the columns no stage has a value for."""
    keys = [*STAGE_KEYS, "bias/activation_normalized_difference"]
    named = stages(state)
    keys = [k for k in keys if any(m.get(k) is not None for _, m in named)]
    return ["stage", *map(wandb_metric_name, keys)], [[name] + [m.get(k) for k in keys] for name, m in named]


class HealCurve(TrainerCallback):
    """Forwards a healing Trainer's logs to the pipeline's W&B run as ``heal/*`` on ``pipeline/step``
    and keeps the loss curve (``losses``: ``[step, loss]`` of this round, read at the end from the
    Trainer's history, so a resumed round has its whole curve) for the report.

    Example:
        >>> curve = HealCurve(run=None, first_step=60)
        >>> curve.losses
        []
    """

    def __init__(self, run: Any | None, first_step: int):
        self.run, self.first_step = run, first_step
        self.losses: list[list[float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not state.is_world_process_zero:
            return
        numbers = {f"heal/{k}": float(v) for k, v in (logs or {}).items() if _number(v) and k != "epoch"}
        if numbers:
            self.run.log({**_unnest(numbers), "pipeline/step": self.first_step + state.global_step})

    def on_train_end(self, args, state, control, **kwargs):
        self.losses = [[h["step"], h["loss"]] for h in state.log_history if _number(h.get("loss"))]


class RoundTracker:
    """Logs each finished round to W&B when ``report_to == "wandb"`` (main process only); else a no-op.

    ``state`` gets ``wandb_run_id`` (the caller saves it).
    """

    def __init__(self, config: PipelineConfig, state: RunState, out: Path, is_main: bool):
        self.run = None
        self.heal_steps = config.heal.heal_steps
        if config.run.report_to != "wandb" or not is_main:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        if state.wandb_run_id is None:
            state.wandb_run_id = uuid.uuid4().hex[:8]
        run_id = state.wandb_run_id
        self.run = wandb.run or wandb.init(
            project="optipfair-train",
            name=config.run.run_name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config.to_dict(),
        )
        self.run.define_metric("round")
        self.run.define_metric("pipeline/step")
        for section in ("healed", "pruned", "figures", "tables"):
            self.run.define_metric(f"{section}/*", step_metric="round")
        self.run.define_metric("heal/*", step_metric="pipeline/step")

    def heal_curve(self, k: int) -> HealCurve:
        """The callback for round ``k``'s healing Trainer (its steps continue the earlier rounds')."""
        return HealCurve(self.run, (k - 1) * self.heal_steps)

    def log_round(self, k: int, metrics: dict, state: RunState, record: dict | None = None) -> None:
        """Log round ``k`` (0 = the unpruned baseline) with the history so far in ``state``.

        Example:
            >>> tracker.log_round(1, record["healed"], state, record)  # doctest: +SKIP
        """
        if self.run is None:
            return
        import wandb

        pruned = record["pruned"] if record is not None else metrics  # round 0: the base is both
        payload = {"round": k, **stage_scalars(metrics, "healed"), **stage_scalars(pruned, "pruned")}
        images = {f"figures/{name}": figure for name, figure in stage_figures(state).items()}
        heatmap = component_layer_heatmap(metrics, f"Normalised activation difference, round {k}")
        if heatmap is not None:
            images["figures/bias_heatmap"] = heatmap
        if k > 0 and (state.baseline or {}).get(LAYERS_KEY):
            change = component_layer_heatmap(metrics, f"Round {k} minus base", base=state.baseline)
            if change is not None:
                images["figures/bias_heatmap_change"] = change
        payload.update({key: wandb.Image(figure_to_rgb(figure)) for key, figure in images.items()})
        columns, rows = _summary_table(state)
        payload["tables/summary"] = wandb.Table(columns=columns, data=rows)
        if record is not None:
            payload["tables/pruning"] = wandb.Table(
                columns=_PRUNING_COLUMNS,
                data=[[k] + [_cell(e.get(c)) for c in _PRUNING_COLUMNS[1:]] for e in record["events"]],
            )
        self.run.log(payload)

    def finish(self, card: dict[str, Any] | None = None) -> None:
        """End the W&B run (if one was started), with the speed and the verdict in its summary."""
        if self.run is None:
            return
        if card is not None:
            from .verdict import wandb_summary

            summary = wandb_summary(card)
            for part in ("prefill", "decode"):
                m = (card.get("speed") or {}).get(part)
                if m:
                    summary |= {
                        f"speed/{part}/base_tokens_per_second": m["base_tokens_per_second"],
                        f"speed/{part}/final_tokens_per_second": m["final_tokens_per_second"],
                        f"speed/{part}/ratio": m["ratio"],
                    }
            self.run.summary.update(summary)
        self.run.finish()
