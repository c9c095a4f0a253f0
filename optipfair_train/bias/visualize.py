"""OptiPFair's visualization functions, returning figures.

``visualize_bias`` computes the metrics of all pairs in one streamed pass, captures full activations
only for the layers it draws, and builds each figure once. Every function returns its
``matplotlib.figure.Figure`` (``visualize_bias``: a dict of them) and saves it when ``output_dir`` is
given; nothing touches ``pyplot``. File names follow OptiPFair: ``mean_diff_pair{i}``,
``heatmap_{layer_key}_pair{i}``, ``pca_{layer_key}_pair{i}``, plus ``bias_metrics.json``.

Example:
    >>> figures, metrics = visualize_bias(model, tokenizer, [("The white man", "The Black man")],
    ...                                   output_dir="bias_out")  # doctest: +SKIP
    >>> metrics["pair_1"]["metrics"]["overall_metrics"]["mean_difference"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from ..names import DEFAULT_FIGURE_COMPONENTS, VISUALIZATION_TYPES
from .capture import COMPONENTS, check_layer_keys, parse_layer_key, select_layer_keys
from .figures import (
    FIGURE_FORMATS,
    heatmap_figure,
    mean_difference_figure,
    pca_figure,
    save_figure,
    trajectory_figure,
)
from .metrics import ActivationDict, get_activation_pairs, probe_activation_bias
from .pairs import DEFAULT_PROMPT_PAIRS
from .report import write_json
from .tokens import align_tokens

__all__ = [
    "VISUALIZATION_TYPES",
    "DEFAULT_FIGURE_COMPONENTS",
    "visualize_bias",
    "visualize_mean_differences",
    "visualize_heatmap",
    "visualize_pca",
    "visualize_bias_trajectory",
]

logger = logging.getLogger(__name__)


def _check_format(figure_format: str) -> None:
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(
            f"Unsupported figure format {figure_format!r}; choose from {', '.join(FIGURE_FORMATS)}"
        )


def _finish(fig: Figure, output_dir: str | Path | None, stem: str, figure_format: str, dpi: int) -> Figure:
    if output_dir is not None:
        save_figure(fig, output_dir, stem, figure_format, dpi)
    return fig


def _mean_diff_from_metrics(
    metrics: Mapping, keys: Sequence[str], prompt_pair: tuple[str, str] | None
) -> Figure:
    values: dict[str, dict[int, float]] = {}
    errors: dict[str, dict[int, tuple[float, float]]] = {}
    for key in keys:
        component, layer = parse_layer_key(key)
        entry = metrics["layer_metrics"][key]
        values.setdefault(component, {})[layer] = entry["mean_difference"]
        if "mean_difference_ci" in entry:
            errors.setdefault(component, {})[layer] = tuple(entry["mean_difference_ci"])
    return mean_difference_figure(values, errors or None, prompt_pair=prompt_pair)


def _heatmap_from_activations(
    act1: ActivationDict, act2: ActivationDict, key: str, max_features: int, prompt_pair: tuple[str, str]
) -> Figure:
    a, b = act1[key][0], act2[key][0]
    al = align_tokens(act1.token_ids, act2.token_ids)
    rows, labels, highlight = [], [], []
    span_at = al.prefix
    for t1, t2 in al.pairs():
        rows.append((a[t1] - b[t2]).abs())
        same = act1.token_ids[t1] == act2.token_ids[t2]
        labels.append(act1.tokens[t1] if same else f"{act1.tokens[t1]}→{act2.tokens[t2]}")
        if not same:
            highlight.append(len(rows) - 1)
    if al.pooled_span:
        (s1, e1), (s2, e2) = al.span1, al.span2
        rows.insert(span_at, (a[s1:e1].mean(0) - b[s2:e2].mean(0)).abs())
        labels.insert(span_at, f"[{''.join(act1.tokens[s1:e1])}]→[{''.join(act2.tokens[s2:e2])}]")
        highlight = [r + (r >= span_at) for r in highlight] + [span_at]
    matrix = torch.stack(rows).numpy()
    top = np.sort(np.argsort(-matrix.max(0))[:max_features])
    return heatmap_figure(
        matrix[:, top],
        labels,
        [str(i) for i in top],
        highlight,
        title=f"|Δ activation| in {key}",
        xlabel=f"feature index (top {len(top)} of {matrix.shape[1]} by max |Δ|)",
        ylabel="aligned token (prompt 1→prompt 2)",
        prompt_pair=prompt_pair,
    )


def _pca_from_activations(
    act1: ActivationDict, act2: ActivationDict, key: str, highlight_diff: bool, prompt_pair: tuple[str, str]
) -> Figure:
    joint = torch.cat([act1[key][0], act2[key][0]]).double().numpy()
    centered = joint - joint.mean(0)
    # PCA through the small [tokens, tokens] Gram matrix: cheaper than an SVD of [tokens, dim].
    eigval, eigvec = np.linalg.eigh(centered @ centered.T)
    top = np.argsort(eigval)[::-1][:2]
    var = np.clip(eigval[top], 0, None)
    proj = eigvec[:, top] * np.sqrt(var)
    if proj.shape[1] < 2:
        proj, var = np.pad(proj, ((0, 0), (0, 2 - proj.shape[1]))), np.pad(var, (0, 2 - len(var)))
    total = np.clip(eigval, 0, None).sum()
    explained = tuple((var / total if total > 0 else np.zeros(2)).tolist())
    al = align_tokens(act1.token_ids, act2.token_ids)
    n1 = len(act1.token_ids)
    highlight1 = list(range(*al.span1)) if highlight_diff else []
    highlight2 = list(range(*al.span2)) if highlight_diff else []
    return pca_figure(
        proj[:n1],
        proj[n1:],
        act1.tokens,
        act2.tokens,
        al.pairs(),
        highlight1,
        highlight2,
        explained,
        title=f"PCA of token representations in {key}",
        prompt_pair=prompt_pair,
    )


def visualize_bias(
    model: nn.Module,
    tokenizer,
    prompt_pairs: Sequence[tuple[str, str]] | None = None,
    visualization_types: Sequence[str] = VISUALIZATION_TYPES,
    layers: str | Sequence[int] = "first_middle_last",
    output_dir: str | Path | None = None,
    figure_format: str = "png",
    show_progress: bool = True,
    *,
    components: Sequence[str] = DEFAULT_FIGURE_COMPONENTS,
    max_figure_pairs: int | None = None,
    max_features: int = 48,
    batch_size: int = 8,
    dpi: int = 100,
) -> tuple[dict[str, Figure], dict]:
    """Metrics for every pair and figures for the first ``max_figure_pairs`` (all when None).

    Metrics cover all layers of OptiPFair's six components (streamed, cheap); figures cover the
    ``layers`` selection of ``components``. Returns ``(figures, metrics)``: ``figures`` maps file
    stems to Figures, ``metrics`` is OptiPFair's ``{"pair_1": {"prompt1", "prompt2", "metrics"}, ...}``
    (also written to ``output_dir/bias_metrics.json``).

    Raises:
        ValueError: for an unknown visualization type or figure format, or no pairs.

    Example:
        >>> figures, metrics = visualize_bias(model, tokenizer, DEFAULT_PROMPT_PAIRS[:1], ["mean_diff", "pca"])  # doctest: +SKIP
        >>> sorted(figures)[0]  # doctest: +SKIP
        'mean_diff_pair0'
    """
    unknown = [t for t in visualization_types if t not in VISUALIZATION_TYPES]
    if unknown:
        raise ValueError(
            f"Unknown visualization type(s) {unknown}; choose from {', '.join(VISUALIZATION_TYPES)}"
        )
    _check_format(figure_format)
    pairs = list(DEFAULT_PROMPT_PAIRS if prompt_pairs is None else prompt_pairs)
    probe = probe_activation_bias(
        model, tokenizer, pairs, "all", COMPONENTS, batch_size=batch_size, show_progress=show_progress
    )
    metrics = {
        f"pair_{i + 1}": {"prompt1": r["prompt1"], "prompt2": r["prompt2"], "metrics": r["metrics"]}
        for i, r in enumerate(probe["pairs"])
    }
    figure_keys = select_layer_keys(model, layers, components)
    figures: dict[str, Figure] = {}
    drawn = pairs[: len(pairs) if max_figure_pairs is None else max_figure_pairs]
    for i, pair in enumerate(
        tqdm(drawn, desc="bias figures", disable=not show_progress or not visualization_types)
    ):
        pair = (pair[0], pair[1])
        if "mean_diff" in visualization_types:
            fig = _mean_diff_from_metrics(probe["pairs"][i]["metrics"], figure_keys, pair)
            figures[f"mean_diff_pair{i}"] = _finish(fig, output_dir, f"mean_diff_pair{i}", figure_format, dpi)
        if {"heatmap", "pca"} & set(visualization_types):
            act1, act2 = get_activation_pairs(model, tokenizer, pair[0], pair[1], figure_keys)
            for key in figure_keys:
                if "heatmap" in visualization_types:
                    fig = _heatmap_from_activations(act1, act2, key, max_features, pair)
                    figures[f"heatmap_{key}_pair{i}"] = _finish(
                        fig, output_dir, f"heatmap_{key}_pair{i}", figure_format, dpi
                    )
                if "pca" in visualization_types:
                    fig = _pca_from_activations(act1, act2, key, True, pair)
                    figures[f"pca_{key}_pair{i}"] = _finish(
                        fig, output_dir, f"pca_{key}_pair{i}", figure_format, dpi
                    )
    if output_dir is not None:
        write_json(Path(output_dir) / "bias_metrics.json", metrics)
    return figures, metrics


def visualize_mean_differences(
    model: nn.Module,
    tokenizer,
    prompt_pair: tuple[str, str],
    layer_type: str | Sequence[str] = "mlp_output",
    layers: str | Sequence[int] = "first_middle_last",
    output_dir: str | Path | None = None,
    figure_format: str = "png",
    pair_index: int = 0,
    *,
    dpi: int = 100,
) -> Figure:
    """Bars of the mean activation difference per layer for one or several component types.

    Example:
        >>> fig = visualize_mean_differences(model, tokenizer, ("He is a nurse", "She is a nurse"),
        ...                                  layer_type=["mlp_output", "attention_output"], layers="all")  # doctest: +SKIP
    """
    _check_format(figure_format)
    probe = probe_activation_bias(model, tokenizer, [prompt_pair], layers, layer_type)
    keys = list(probe["pairs"][0]["metrics"]["layer_metrics"])
    fig = _mean_diff_from_metrics(probe["pairs"][0]["metrics"], keys, tuple(prompt_pair))
    name = layer_type if isinstance(layer_type, str) else "_".join(layer_type)
    return _finish(fig, output_dir, f"mean_diff_{name}_pair{pair_index}", figure_format, dpi)


def visualize_heatmap(
    model: nn.Module,
    tokenizer,
    prompt_pair: tuple[str, str],
    layer_key: str,
    output_dir: str | Path | None = None,
    figure_format: str = "png",
    pair_index: int = 0,
    *,
    max_features: int = 48,
    dpi: int = 100,
) -> Figure:
    """Heatmap of |Δ activation| in one layer: aligned tokens (rows) x the most affected features.

    Raises:
        KeyError: for an unknown ``layer_key`` (the message lists the available keys).

    Example:
        >>> fig = visualize_heatmap(model, tokenizer, ("He is a nurse", "She is a nurse"), "mlp_output_layer_1")  # doctest: +SKIP
    """
    _check_format(figure_format)
    check_layer_keys(model, [layer_key])
    act1, act2 = get_activation_pairs(model, tokenizer, prompt_pair[0], prompt_pair[1], [layer_key])
    fig = _heatmap_from_activations(act1, act2, layer_key, max_features, tuple(prompt_pair))
    return _finish(fig, output_dir, f"heatmap_{layer_key}_pair{pair_index}", figure_format, dpi)


def visualize_pca(
    model: nn.Module,
    tokenizer,
    prompt_pair: tuple[str, str],
    layer_key: str,
    highlight_diff: bool = True,
    output_dir: str | Path | None = None,
    figure_format: str = "png",
    pair_index: int = 0,
    *,
    dpi: int = 100,
) -> Figure:
    """Joint PCA of the token representations of both prompts in one layer, aligned tokens linked,
    differing tokens highlighted.

    Raises:
        KeyError: for an unknown ``layer_key`` (the message lists the available keys).

    Example:
        >>> fig = visualize_pca(model, tokenizer, ("He is a nurse", "She is a nurse"), "attention_output_layer_0")  # doctest: +SKIP
    """
    _check_format(figure_format)
    check_layer_keys(model, [layer_key])
    act1, act2 = get_activation_pairs(model, tokenizer, prompt_pair[0], prompt_pair[1], [layer_key])
    fig = _pca_from_activations(act1, act2, layer_key, highlight_diff, tuple(prompt_pair))
    return _finish(fig, output_dir, f"pca_{layer_key}_pair{pair_index}", figure_format, dpi)


def visualize_bias_trajectory(
    history: Sequence[Mapping[str, float]],
    metrics: str | Sequence[str],
    x_key: str = "step",
    output_dir: str | Path | None = None,
    figure_format: str = "png",
    filename: str = "bias_trajectory",
    *,
    reference: float | None = None,
    ylabel: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Bias metrics against training step (or round) from logged records.

    ``history`` is a list of flat records such as ``{"step": 100, "crows_pairs_score": 47.9,
    "crows_pairs_score_ci_low": 45.4, "crows_pairs_score_ci_high": 50.3}``; for each metric ``m``,
    ``m_ci_low``/``m_ci_high`` (when present in every record holding ``m``) draw an interval band.

    Raises:
        ValueError: when no record has ``x_key`` and one of ``metrics``.

    Example:
        >>> hist = [{"step": 0, "score": 48.7}, {"step": 50, "score": 45.1}]
        >>> visualize_bias_trajectory(hist, "score", reference=50).axes[0].get_xlabel()
        'step'
    """
    _check_format(figure_format)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    rows = [r for r in history if x_key in r and any(m in r for m in names)]
    if not rows:
        raise ValueError(f"no record in history has {x_key!r} and one of {names}")
    x = [r[x_key] for r in rows]
    series = {m: [r.get(m, np.nan) for r in rows] for m in names}
    bands = {
        m: ([r.get(f"{m}_ci_low", np.nan) for r in rows], [r.get(f"{m}_ci_high", np.nan) for r in rows])
        for m in names
        if all(f"{m}_ci_low" in r and f"{m}_ci_high" in r for r in rows if m in r)
    }
    fig = trajectory_figure(
        x, series, bands, xlabel=x_key, ylabel=ylabel or ", ".join(names), reference=reference
    )
    return _finish(fig, output_dir, filename, figure_format, dpi)
