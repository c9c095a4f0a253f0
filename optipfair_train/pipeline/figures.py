"""The pipeline's figures, from the metrics in ``state.json`` (W&B and report.html show the same ones).

- :func:`component_layer_heatmap`: one stage's normalised activation difference, component x layer
  (with ``vmin`` / ``vmax`` so a group of them shares one colour scale), or its change vs the base;
- :func:`stage_figures`: the StereoSet SS per bias type over every stage so far (each cell with its n
  and interval, cells under :data:`MIN_TYPE_ITEMS` items greyed out) and the per-layer difference over
  the stages, one panel per component (the report draws the trajectories with their intervals itself).

The normalised activation difference of a layer (:data:`ACTIVATION_DIFFERENCE_DEFINITION`) is
``sum |a1 - a2| / sum (|a1| + |a2|) / 2`` over the aligned token positions and features of the two
sentences of a pair that differ only in a demographic term, averaged over the pairs: 0 for identical
activations, at most 2, unchanged when a layer's activations are merely scaled.

Example:
    >>> figures = stage_figures(state)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .evaluate import LAYERS_KEY
from .run_state import RunState

__all__ = [
    "ACTIVATION_DIFFERENCE_DEFINITION",
    "MIN_TYPE_ITEMS",
    "component_layer_heatmap",
    "report_figures",
    "stages",
    "stage_figures",
]

# a bias type's SS from fewer items than this swings by tens of points: greyed out, not coloured
MIN_TYPE_ITEMS = 30
ACTIVATION_DIFFERENCE_DEFINITION = (
    "Normalised activation difference: for two sentences that differ only in a demographic term, "
    "sum |a1 - a2| / sum (|a1| + |a2|) / 2 over the aligned token positions and features of a layer's "
    "output, averaged over the pairs. 0 = the layer sees no difference; at most 2; a layer whose "
    "activations are merely scaled keeps its value, so pruning that shrinks activations does not read "
    "as less bias."
)
_LABEL = "normalised activation difference"


def stages(state: RunState | Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``(name, metrics)`` of the baseline and every finished round's pruned and healed model.

    Example:
        >>> [n for n, _ in stages({"baseline": {}, "rounds": [{"round": 1, "pruned": {}, "healed": {}}]})]
        ['base', 'r1 pruned', 'r1 healed']
    """
    state = RunState.of(state)
    out = [("base", state.baseline or {})]
    for r in state.rounds:
        out += [(f"r{r['round']} pruned", r["pruned"]), (f"r{r['round']} healed", r["healed"])]
    return out


def _component_matrix(layers: Mapping[str, float]) -> tuple[np.ndarray, list[str], list[int]]:
    from ..bias import parse_layer_key

    cells = [(*parse_layer_key(key), value) for key, value in layers.items()]
    components = list(dict.fromkeys(c for c, _, _ in cells))
    indices = sorted({i for _, i, _ in cells})
    matrix = np.full((len(components), len(indices)), np.nan)
    for component, index, value in cells:
        matrix[components.index(component), indices.index(index)] = value
    return matrix, components, indices


def component_layer_heatmap(
    metrics: dict,
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
    base: dict | None = None,
):
    """Heatmap (rows: component, columns: layer) of one stage's ``bias/layers``; None without them.

    With ``base`` (the base model's metrics) it maps the change, this stage minus the base, on a
    diverging scale centred on 0 (``vmax`` its half-width).

    Example:
        >>> component_layer_heatmap({"bias/layers": {"mlp_output_layer_0": 0.2}}, "base").axes[0].get_xlabel()
        'layer'
    """
    from ..bias import heatmap_figure

    layers = metrics.get(LAYERS_KEY) or {}
    if not layers:
        return None
    matrix, components, indices = _component_matrix(layers)
    label, cmap = _LABEL, "viridis"
    if base is not None:
        reference, ref_components, ref_indices = _component_matrix(base.get(LAYERS_KEY) or {})
        shifted = np.full_like(matrix, np.nan)
        for r, component in enumerate(components):
            for c, index in enumerate(indices):
                if component in ref_components and index in ref_indices:
                    value = reference[ref_components.index(component), ref_indices.index(index)]
                    shifted[r, c] = matrix[r, c] - value
        matrix, label, cmap = shifted, "change vs base", "RdBu_r"
        half = (
            vmax
            if vmax is not None
            else float(np.nanmax(np.abs(matrix)))
            if np.isfinite(matrix).any()
            else 1.0
        )
        vmin, vmax = -(half or 1.0), half or 1.0
    return heatmap_figure(
        matrix, components, [str(i) for i in indices], title=title, xlabel="layer", ylabel="component",
        colorbar_label=label, cmap=cmap, vmin=vmin, vmax=vmax, token_rows=False,
    )  # fmt: skip


def _by_type(named: list[tuple[str, dict]], metric: str) -> dict[str, dict[str, float]]:
    prefix = f"stereoset/{metric}/"
    rows = {name: {k[len(prefix) :]: v for k, v in m.items() if k.startswith(prefix)} for name, m in named}
    return {name: row for name, row in rows.items() if row}


def stage_figures(state: RunState | Mapping[str, Any]) -> dict[str, Any]:
    """Figures over every stage so far, keyed by a short name (see the module doc)."""
    from ..bias import bias_type_heatmap_figure, layer_heatmap_figure

    named = stages(state)
    figures: dict[str, Any] = {}
    by_type = _by_type(named, "ss")
    if by_type:
        counts = _by_type(named, "num_items")
        lows, highs = _by_type(named, "ss_ci_low"), _by_type(named, "ss_ci_high")
        intervals = {
            name: {t: (low, highs[name][t]) for t, low in row.items() if t in highs.get(name, {})}
            for name, row in lows.items()
        }
        figures["stereoset_bias_types"] = bias_type_heatmap_figure(
            by_type, ylabel="stage", counts=counts or None, intervals=intervals or None, min_n=MIN_TYPE_ITEMS
        )
    layers = {name: m[LAYERS_KEY] for name, m in named if m.get(LAYERS_KEY)}
    if layers:
        figures["layer_heatmap"] = layer_heatmap_figure(
            layers, title=f"{_LABEL.capitalize()} per layer", ylabel="stage"
        )
    return figures


def report_figures(state: RunState | Mapping[str, Any]) -> dict[str, Any]:
    """Captions -> figures for report.html: :func:`stage_figures`, each stage's component x layer map on
    one colour scale, and each later stage's change vs the base on one diverging scale.

    Example:
        >>> sorted(report_figures({"baseline": {}, "rounds": []}))
        []
    """
    captions = {
        "stereoset_bias_types": f"StereoSet SS per bias type and stage (50 = no stereotype preference); each "
        f"cell: SS, 95% interval, items; grey: fewer than {MIN_TYPE_ITEMS} items",
        "layer_heatmap": f"{_LABEL.capitalize()} per layer and stage, one panel per component",
    }
    state = RunState.of(state)
    figures = {captions[name]: figure for name, figure in stage_figures(state).items()}
    named = [(name, m) for name, m in stages(state) if m.get(LAYERS_KEY)]
    values = [v for _, m in named for v in m[LAYERS_KEY].values()]
    for name, metrics in named:  # one colour scale for the group, so equal colours mean equal values
        figures[f"{_LABEL.capitalize()} (component x layer), {name}; one colour scale for all stages"] = (
            component_layer_heatmap(metrics, f"{_LABEL.capitalize()}, {name}", min(values), max(values))
        )
    base = (state.baseline or {}).get(LAYERS_KEY)
    if base and named[0][0] == "base":
        shifts = [
            abs(m[LAYERS_KEY][k] - v) for _, m in named[1:] for k, v in base.items() if k in m[LAYERS_KEY]
        ]
        rounds = state.rounds
        cut = [
            any(e.get("removed_layers") for q in rounds[: k + 1] for e in q.get("events", []))
            for k in range(len(rounds))
        ]
        depth = {
            f"r{r['round']} {stage}"
            for r, c in zip(rounds, cut, strict=True)
            if c
            for stage in ("pruned", "healed")
        }
        for name, metrics in named[1:]:  # one diverging scale for the group too
            note = "; blocks were removed, so layers are compared by position" if name in depth else ""
            figures[
                f"Change vs base of the {_LABEL} (component x layer), {name}; red: larger than base{note}"
            ] = component_layer_heatmap(
                metrics, f"{name} minus base", vmax=max(shifts, default=None), base=state.baseline
            )
    return figures
