"""Figure builders: plain data in, a ``matplotlib.figure.Figure`` out.

Figures are created directly (``Figure`` + an Agg canvas), never through ``pyplot``: nothing here
changes the user's global backend or opens windows, and figures are freed like any object. A
callback can log the returned figure to W&B or TensorBoard without touching disk; :func:`save_figure`
writes one to a file.

Example:
    >>> fig = trajectory_figure([0, 1, 2], {"score": [50.0, 48.0, 45.0]}, xlabel="step", ylabel="score")
    >>> fig.axes[0].get_xlabel()
    'step'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..names import FIGURE_FORMATS

__all__ = [
    "FIGURE_FORMATS",
    "new_figure",
    "save_figure",
    "figure_to_rgb",
    "mean_difference_figure",
    "heatmap_figure",
    "pca_figure",
    "trajectory_figure",
    "layer_heatmap_figure",
    "bias_type_heatmap_figure",
]

logger = logging.getLogger(__name__)


def new_figure(width: float = 8.0, height: float = 5.0) -> Figure:
    """A Figure with its own Agg canvas (no pyplot state).

    Example:
        >>> new_figure(4, 3).get_size_inches().tolist()
        [4.0, 3.0]
    """
    fig = Figure(figsize=(width, height))  # fixed margins: a layout engine doubles the drawing cost
    FigureCanvasAgg(fig)
    return fig


def save_figure(
    fig: Figure, output_dir: str | Path, stem: str, figure_format: str = "png", dpi: int = 100
) -> Path:
    """Write ``fig`` to ``output_dir/stem.figure_format`` (creating the folder) and return the path.

    Raises:
        ValueError: for an unsupported format.

    Example:
        >>> save_figure(new_figure(), "/tmp/figs", "empty")  # doctest: +SKIP
        PosixPath('/tmp/figs/empty.png')
    """
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(
            f"Unsupported figure format {figure_format!r}; choose from {', '.join(FIGURE_FORMATS)}"
        )
    path = Path(output_dir) / f"{stem}.{figure_format}"
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"pil_kwargs": {"compress_level": 1}} if figure_format == "png" else {}  # fast PNG encoding
    fig.savefig(path, dpi=dpi, format=figure_format, **extra)
    logger.info("saved %s", path)
    return path


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` on an Agg canvas to an ``[height, width, 3]`` uint8 array.

    Why: ``wandb.Image`` of a Figure object goes through ``pyplot``, which these figures avoid; an
    array needs nothing but numpy.

    Example:
        >>> figure_to_rgb(new_figure(2, 1)).shape
        (100, 200, 3)
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _label(token: str, n: int = 16) -> str:
    return _short(token.replace(" ", "␣").replace("\n", "⏎"), n)


def _layout(
    fig: Figure,
    prompt_pair: tuple[str, str] | None,
    left: float = 0.1,
    right: float = 0.97,
    bottom: float = 0.12,
) -> None:
    """Fixed margins, with room at the top for the prompt-pair caption."""
    top = 0.9
    if prompt_pair:
        fig.suptitle(f'1: "{_short(prompt_pair[0])}"\n2: "{_short(prompt_pair[1])}"', fontsize=8)
        top = 1 - 0.75 / fig.get_figheight()
    fig.subplots_adjust(left=left, right=right, bottom=bottom, top=top)


def mean_difference_figure(
    values: Mapping[str, Mapping[int, float]],
    errors: Mapping[str, Mapping[int, tuple[float, float]]] | None = None,
    title: str = "Mean activation difference by layer",
    prompt_pair: tuple[str, str] | None = None,
) -> Figure:
    """Grouped bars: one group per layer, one bar per component. ``values[component][layer] = value``;
    optional ``errors[component][layer] = (low, high)`` draws interval whiskers.

    Example:
        >>> fig = mean_difference_figure({"mlp_output": {0: 0.1, 5: 0.3}})
        >>> fig.axes[0].get_ylabel()
        'mean |Δ activation| (aligned tokens)'
    """
    if not values or not any(values.values()):
        raise ValueError("mean_difference_figure needs at least one value")
    layers = sorted({layer for per in values.values() for layer in per})
    fig = new_figure(max(6.0, 0.5 * len(layers) * len(values) + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(values)
    x = np.arange(len(layers))
    for c, (component, per) in enumerate(values.items()):
        heights = [per.get(layer, np.nan) for layer in layers]
        yerr = None
        if errors and component in errors:
            lo_hi = [errors[component].get(layer, (h, h)) for layer, h in zip(layers, heights, strict=True)]
            yerr = np.array(
                [
                    [h - lo for (lo, _), h in zip(lo_hi, heights, strict=True)],
                    [hi - h for (_, hi), h in zip(lo_hi, heights, strict=True)],
                ]
            )
        ax.bar(x + (c - (len(values) - 1) / 2) * width, heights, width, label=component, yerr=yerr, capsize=2)
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |Δ activation| (aligned tokens)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _layout(fig, prompt_pair)
    return fig


def heatmap_figure(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    highlight_rows: Sequence[int] = (),
    title: str = "Activation difference",
    xlabel: str = "feature",
    ylabel: str = "token",
    prompt_pair: tuple[str, str] | None = None,
    colorbar_label: str = "|activation difference|",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    token_rows: bool = True,
    row_height: float = 0.2,
) -> Figure:
    """Heatmap of |Δ activation| with labelled rows (tokens) and columns (features); highlighted rows in red.

    ``token_rows=False`` prints row labels as they are (stage or step names, not tokens with visible
    spaces). Margins are sized from the longest labels, so tick labels and the colour bar stay inside
    the canvas at the figure's own size (what W&B receives). NaN cells are drawn light grey.

    Example:
        >>> fig = heatmap_figure(np.ones((2, 3)), ["a", "b"], ["0", "1", "2"])
        >>> fig.axes[0].get_ylabel()
        'token'
    """
    matrix = np.asarray(matrix)
    rows, cols = matrix.shape
    shown_rows = [_label(t, 24) if token_rows else _short(str(t), 24) for t in row_labels]
    step = max(1, -(-cols // 16))
    shown_cols = [str(col_labels[i]) for i in range(0, cols, step)]
    char = 7 / 72 * 0.62  # inches per character at font size 7
    rotate = max(map(len, shown_cols), default=0) > 3
    left = 0.45 + char * max(map(len, shown_rows), default=0)
    bottom = 0.45 + (char * max(map(len, shown_cols), default=0) if rotate else 0.15)
    right = 1.1  # colour bar, its ticks and its label
    width = max(6.0, 0.16 * cols + left + right + 0.5)
    # the colour bar spans the axes' height: tall enough for its label (about 0.075 in per character)
    height = max(3.5, row_height * rows + bottom + 0.9, bottom + 0.9 + 0.075 * len(colorbar_label))
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    image = ax.imshow(matrix, aspect="auto", cmap=colours, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(rows), shown_rows, fontsize=7)
    ax.set_xticks(range(0, cols, step), shown_cols, fontsize=7, rotation=90 if rotate else 0)
    for r in highlight_rows:
        ax.get_yticklabels()[r].set_color("red")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _layout(fig, prompt_pair, left=left / width, right=1 - right / width, bottom=bottom / height)
    fig.colorbar(image, ax=ax, label=colorbar_label, fraction=0.04, pad=0.02)
    return fig


def _table(
    values: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None
) -> tuple[np.ndarray, list]:
    if not values or not any(values.values()):
        raise ValueError("a heatmap needs at least one row with a value")
    if columns is None:
        columns = list(dict.fromkeys(c for row in values.values() for c in row))
    matrix = np.array([[row.get(c, np.nan) for c in columns] for row in values.values()], dtype=float)
    return matrix, list(columns)


def layer_heatmap_figure(
    values: Mapping[str, Mapping[str, float]],
    layer_keys: Sequence[str] | None = None,
    title: str = "Normalised activation difference per layer",
    ylabel: str = "round",
) -> Figure:
    """A per-layer bias metric over labelled rows (steps, rounds, models), one panel per component (rows:
    label, columns: layer number), one colour scale for all panels. ``values[row][layer_key] = value``,
    e.g. the ``normalized_difference`` of ``aggregate["layer_metrics"]`` of
    :func:`~optipfair_train.bias.probe_activation_bias`; ``layer_keys`` limits the keys drawn.

    Example:
        >>> fig = layer_heatmap_figure({"base": {"mlp_output_layer_0": 0.2}, "round 1": {"mlp_output_layer_0": 0.3}})
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_title(loc="left")
        ('layer', 'mlp_output')
    """
    from .capture import parse_layer_key

    if not values or not any(values.values()):
        raise ValueError("a heatmap needs at least one row with a value")
    cells = [(row, *parse_layer_key(k), v) for row, per in values.items() for k, v in per.items()
             if layer_keys is None or k in layer_keys]  # fmt: skip
    components = list(dict.fromkeys(c for _, c, _, _ in cells))
    indices, rows = sorted({i for _, _, i, _ in cells}), list(values)
    grids = {c: np.full((len(rows), len(indices)), np.nan) for c in components}
    for row, component, index, value in cells:
        grids[component][rows.index(row), indices.index(index)] = value
    finite = [v for *_, v in cells if np.isfinite(v)]
    fig = new_figure(max(7.0, 0.18 * len(indices) + 2.8), (0.25 * len(rows) + 0.6) * len(components) + 1.2)
    fig.set_layout_engine("constrained")  # a few panels: the layout cost is small
    axes = fig.subplots(len(components), 1, squeeze=False)[:, 0]
    step = max(1, -(-len(indices) // 16))
    for ax, component in zip(axes, components, strict=True):
        image = ax.imshow(grids[component], aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=min(finite, default=0.0), vmax=max(finite, default=1.0))  # fmt: skip
        ax.set_yticks(range(len(rows)), [_short(r, 24) for r in rows], fontsize=7)
        ax.set_xticks(range(0, len(indices), step), [str(i) for i in indices[::step]], fontsize=7)
        ax.set_title(component, fontsize=8, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
    axes[-1].set_xlabel("layer")
    fig.suptitle(f"{title} (one colour scale)", fontsize=10)
    fig.colorbar(image, ax=list(axes), label="normalised |activation difference|", fraction=0.03, pad=0.01)
    return fig


def bias_type_heatmap_figure(
    values: Mapping[str, Mapping[str, float]],
    bias_types: Sequence[str] | None = None,
    title: str = "StereoSet SS per bias type (50 = no stereotype preference)",
    ylabel: str = "round",
    metric: str = "SS",
    center: float | None = 50.0,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    min_n: int = 30,
) -> Figure:
    """Heatmap of a score per bias type: one row per label (a step, a round, a model), one column per bias
    type, each cell annotated. ``values[row][bias_type] = value``, e.g. ``{t: e["ss"] for t, e in
    stereoset_scores(...)["by_bias_type"].items()}``. With ``center`` (50 for SS) a diverging colour map
    is centred there, so distance from no preference reads as colour; None (ICAT, LMS) a plain one.

    ``counts[row][bias_type]`` (items behind the cell) and ``intervals[row][bias_type]`` ((low, high),
    95%) are printed in each cell; a cell from fewer than ``min_n`` items is greyed out and left out of
    the colour scale (a score from 10 items swings by tens of points), its numbers still printed.

    Example:
        >>> fig = bias_type_heatmap_figure({"base": {"gender": 62.0, "race": 58.0}})
        >>> fig.axes[0].get_xlabel()
        'bias type'
    """
    matrix, columns = _table(values, bias_types)
    rows = list(values)
    n = np.array([[(counts or {}).get(r, {}).get(c, min_n) for c in columns] for r in rows], dtype=float)
    coloured = np.where(n >= min_n, matrix, np.nan)
    spread = None
    if center is not None:
        spread = float(np.nanmax(np.abs(coloured - center))) if np.isfinite(coloured).any() else 0.0
        spread = spread or 1.0
    fig = heatmap_figure(
        coloured,
        rows,
        columns,
        title=title,
        xlabel="bias type" + (f" (grey: fewer than {min_n} items)" if counts else ""),
        ylabel=ylabel,
        colorbar_label=metric,
        cmap="RdBu_r" if center is not None else "viridis",
        vmin=None if spread is None else center - spread,
        vmax=None if spread is None else center + spread,
        token_rows=False,
        row_height=0.55 if counts or intervals else 0.2,
    )
    ax = fig.axes[0]
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            if not np.isfinite(matrix[r, c]):
                continue
            text = f"{matrix[r, c]:.1f}"
            interval = (intervals or {}).get(row, {}).get(column)
            if interval is not None:
                text += f"\n[{interval[0]:.0f}, {interval[1]:.0f}]"
            if counts and column in counts.get(row, {}):
                text += f"\nn={int(n[r, c])}"
            # white on the darkest cells of the diverging map, where black text cannot be read
            strong = spread is not None and abs(coloured[r, c] - center) > 0.6 * spread
            colour = "0.35" if n[r, c] < min_n else ("white" if strong else "black")
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=colour)
    return fig


def pca_figure(
    points1: np.ndarray,
    points2: np.ndarray,
    tokens1: Sequence[str],
    tokens2: Sequence[str],
    links: Sequence[tuple[int, int]] = (),
    highlight1: Sequence[int] = (),
    highlight2: Sequence[int] = (),
    explained: tuple[float, float] = (float("nan"), float("nan")),
    title: str = "PCA of token representations",
    prompt_pair: tuple[str, str] | None = None,
) -> Figure:
    """Scatter of 2-D token projections of both prompts; ``links`` join aligned tokens, highlighted
    (differing) tokens are labelled in red.

    Example:
        >>> fig = pca_figure(np.zeros((2, 2)), np.ones((2, 2)), ["a", "b"], ["a", "c"], [(0, 0)], [1], [1])
        >>> fig.axes[0].get_xlabel().startswith("PC1")
        True
    """
    fig = new_figure(7.5, 6.0)
    ax = fig.add_subplot()
    segments = [[points1[i], points2[j]] for i, j in links]
    ax.add_collection(LineCollection(segments, colors="0.75", linewidths=0.8, zorder=1))
    ax.scatter(points1[:, 0], points1[:, 1], s=22, label="prompt 1", zorder=2)
    ax.scatter(points2[:, 0], points2[:, 1], s=22, marker="s", label="prompt 2", zorder=2)
    for points, tokens, highlight in (
        (points1, tokens1, set(highlight1)),
        (points2, tokens2, set(highlight2)),
    ):
        for k, token in enumerate(tokens):
            red = k in highlight
            ax.annotate(
                _label(token),
                points[k],
                fontsize=8 if red else 6,
                color="red" if red else "0.3",
                fontweight="bold" if red else "normal",
            )
    ax.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _layout(fig, prompt_pair)
    return fig


def trajectory_figure(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    xlabel: str = "step",
    ylabel: str = "bias",
    title: str = "Bias during training",
    reference: float | None = None,
) -> Figure:
    """Lines of bias metrics against training step or round (integer ticks), with optional interval bands
    and a reference line (e.g. 50 for SS or a CrowS-Pairs score).

    Example:
        >>> fig = trajectory_figure([0, 1], {"s": [1.0, 2.0]}, {"s": ([0.5, 1.5], [1.5, 2.5])}, reference=1.0)
        >>> len(fig.axes[0].lines)
        2
    """
    if not series:
        raise ValueError("trajectory_figure needs at least one series")
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for name, values in series.items():
        (line,) = ax.plot(x, values, marker="o", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if reference is not None:
        ax.axhline(reference, color="0.5", ls="--", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _layout(fig, None)
    return fig
