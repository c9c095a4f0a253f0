"""The pipeline's figures, from the metrics in ``state.json`` (W&B and report.html show the same ones).

- :func:`component_layer_heatmap`: one stage's normalised activation difference, component x layer;
- :func:`stage_figures`: the StereoSet SS per bias type over every stage so far and the per-layer
  difference over the stages (the report draws the trajectories with their intervals itself).

Example:
    >>> figures = stage_figures(state)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .evaluate import LAYERS_KEY

__all__ = ["component_layer_heatmap", "report_figures", "stages", "stage_figures"]


def stages(state: dict[str, Any]) -> list[tuple[str, dict]]:
    """``(name, metrics)`` of the baseline and every finished round's pruned and healed model.

    Example:
        >>> [n for n, _ in stages({"baseline": {}, "rounds": [{"round": 1, "pruned": {}, "healed": {}}]})]
        ['base', 'r1 pruned', 'r1 healed']
    """
    out = [("base", state.get("baseline") or {})]
    for r in state.get("rounds", []):
        out += [(f"r{r['round']} pruned", r["pruned"]), (f"r{r['round']} healed", r["healed"])]
    return out


def component_layer_heatmap(metrics: dict, title: str):
    """Heatmap (rows: component, columns: layer) of one stage's ``bias/layers``; None without them.

    Example:
        >>> component_layer_heatmap({"bias/layers": {"mlp_output_layer_0": 0.2}}, "base").axes[0].get_xlabel()
        'layer'
    """
    from ..bias import heatmap_figure, parse_layer_key

    layers = metrics.get(LAYERS_KEY) or {}
    if not layers:
        return None
    cells = [(*parse_layer_key(key), value) for key, value in layers.items()]
    components = list(dict.fromkeys(c for c, _, _ in cells))
    indices = sorted({i for _, i, _ in cells})
    matrix = np.full((len(components), len(indices)), np.nan)
    for component, index, value in cells:
        matrix[components.index(component), indices.index(index)] = value
    return heatmap_figure(
        matrix, components, [str(i) for i in indices], title=title, xlabel="layer", ylabel="component",
        colorbar_label="normalised |activation difference|",
    )  # fmt: skip


def stage_figures(state: dict[str, Any]) -> dict[str, Any]:
    """Figures over every stage so far, keyed by a short name (see the module doc)."""
    from ..bias import bias_type_heatmap_figure, layer_heatmap_figure

    named = stages(state)
    figures: dict[str, Any] = {}
    by_type = {
        name: {k.split("/")[2]: v for k, v in m.items() if k.startswith("stereoset/ss/")} for name, m in named
    }
    by_type = {name: row for name, row in by_type.items() if row}
    if by_type:
        figures["stereoset_bias_types"] = bias_type_heatmap_figure(by_type, ylabel="stage")
    layers = {name: m[LAYERS_KEY] for name, m in named if m.get(LAYERS_KEY)}
    if layers:
        figures["layer_heatmap"] = layer_heatmap_figure(layers, ylabel="stage")
    return figures


def report_figures(state: dict[str, Any]) -> dict[str, Any]:
    """Captions -> figures for report.html: :func:`stage_figures` and each stage's component x layer map.

    Example:
        >>> sorted(report_figures({"baseline": {}, "rounds": []}))
        []
    """
    captions = {
        "stereoset_bias_types": "StereoSet SS per bias type and stage (50 = no stereotype preference)",
        "layer_heatmap": "Normalised activation difference per layer key and stage",
    }
    figures = {captions[name]: figure for name, figure in stage_figures(state).items()}
    for name, metrics in stages(state):
        heatmap = component_layer_heatmap(metrics, f"Normalised activation difference, {name}")
        if heatmap is not None:
            figures[f"Normalised activation difference (component x layer), {name}"] = heatmap
    return figures
