"""Figure content without a browser: every text and axes (colour bars included) inside the canvas at the
figure's own size (the size W&B receives), every report image decodes, the labels a reader needs are there."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from figure_checks import outside_canvas, report_images, texts
from test_report import _two_rounds

from optipfair_train.bias import heatmap_figure, layer_heatmap_figure
from optipfair_train.bias.figures import (
    bias_type_heatmap_figure,
    figure_to_rgb,
    mean_difference_figure,
    pca_figure,
    trajectory_figure,
)
from optipfair_train.pipeline.figures import MIN_TYPE_ITEMS, component_layer_heatmap, report_figures
from optipfair_train.pipeline.report import trajectory_figures, write_report

COMPONENTS = ("input_norm", "attention_output", "mlp_output")


def _layers(scale: float) -> dict[str, float]:
    return {f"{c}_layer_{i}": scale * (i + 1) / 30 for c in COMPONENTS for i in range(30)}


def _state() -> dict:
    """Three stages of a 30-layer model, with StereoSet per bias type (religion from 10 items)."""
    base = {"bias/layers": _layers(1.0), "bias/activation_normalized_difference": 0.5}
    for bias_type, ss, n in (("race", 55.4, 153), ("profession", 57.0, 108), ("religion", 55.6, 10)):
        base |= {f"stereoset/ss/{bias_type}": ss, f"stereoset/num_items/{bias_type}": n,
                 f"stereoset/ss_ci_low/{bias_type}": ss - 8, f"stereoset/ss_ci_high/{bias_type}": ss + 8}  # fmt: skip
    pruned = {**base, "bias/layers": _layers(1.2), "stereoset/ss/religion": 69.4}
    healed = {**base, "bias/layers": _layers(0.9)}
    return {"baseline": base, "rounds": [{"round": 1, "pruned": pruned, "healed": healed}]}


@functools.cache
def _every_figure() -> dict:
    card = _two_rounds()
    card["rounds"][0]["heal_loss"] = [[1, 3.2], [2, 2.9], [3, 2.7]]
    card["rounds"][1]["heal_loss"] = [[1, 3.0], [2, 2.8], [3, 2.6]]
    figures = {**trajectory_figures(card), **report_figures(_state())}
    figures["bias heatmap, 30 layers (W&B)"] = component_layer_heatmap(_state()["baseline"], "round 1")
    figures["token heatmap"] = heatmap_figure(
        np.ones((6, 40)), [f"token {i}" for i in range(6)], list(map(str, range(40)))
    )
    figures["layer keys"] = layer_heatmap_figure({"step 10": _layers(1.0), "step 20": _layers(2.0)})
    figures["mean difference"] = mean_difference_figure(
        {"mlp_output": {0: 0.1, 1: 0.3}}, prompt_pair=("a", "b")
    )
    figures["pca"] = pca_figure(np.zeros((2, 2)), np.ones((2, 2)), ["a", "b"], ["a", "c"], [(0, 0)], [1], [1])
    figures["trajectory"] = trajectory_figure([0, 1], {"score": [50.0, 48.0]}, reference=50.0)
    return figures


@pytest.mark.parametrize("name", list(_every_figure()))
def test_every_artist_is_inside_the_canvas(name):
    assert outside_canvas(_every_figure()[name]) == []


def test_the_check_catches_a_colour_bar_past_the_edge():
    fig = heatmap_figure(
        np.ones((2, 3)), ["a", "b"], ["0", "1", "2"], colorbar_label="a long colour bar label"
    )
    fig.subplots_adjust(right=0.99)  # the layout before the fix: no room for the colour bar's ticks
    assert any("a long colour bar label" in problem for problem in outside_canvas(fig))


def test_bias_type_cells_show_n_and_interval_and_small_ones_are_grey():
    fig = report_figures(_state())[next(k for k in report_figures(_state()) if k.startswith("StereoSet"))]
    ax = fig.axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert "55.4\n[47, 63]\nn=153" in cells and "69.4\n[48, 64]\nn=10" in cells
    assert all("\nn=" in cell for cell in cells)
    colours = np.ma.getmaskarray(ax.images[0].get_array())  # masked = drawn in the grey "bad" colour
    assert colours[:, 2].all() and not colours[:, :2].any()  # religion (10 < 30 items) is grey everywhere
    assert ax.images[0].get_clim() == pytest.approx((50 - 7.0, 50 + 7.0))  # 57.0 sets it, not religion's 69.4
    stage_labels = [t.get_text() for t in ax.get_yticklabels()]
    assert stage_labels == ["base", "r1 pruned", "r1 healed"]  # not token labels (no "r1␣pruned")
    assert f"grey: fewer than {MIN_TYPE_ITEMS} items" in ax.get_xlabel()
    by_text = {t.get_text().split("\n")[0]: t.get_color() for t in ax.texts}
    assert by_text["57.0"] == "white" and by_text["69.4"] == "0.35"  # darkest red: light text; grey cell


def test_cell_text_is_light_only_on_dark_cells():
    fig = bias_type_heatmap_figure({"base": {"gender": 60.0, "race": 51.0, "religion": 40.0}})
    colours = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert colours == {"60.0": "white", "51.0": "black", "40.0": "white"}  # |v - 50| > 0.6 x spread (10)


def test_activation_figures_share_one_scale_and_map_the_change():
    figures = report_figures(_state())
    maps = [
        f for k, f in figures.items() if k.startswith("Normalised activation difference (component x layer)")
    ]
    assert len(maps) == 3 and len({f.axes[0].images[0].get_clim() for f in maps}) == 1  # one colour scale
    assert maps[0].axes[0].images[0].get_clim() == pytest.approx((0.9 / 30, 1.2))
    changes = [f for k, f in figures.items() if k.startswith("Change vs base")]
    assert len(changes) == 2
    pruned = changes[0].axes[0].images[0]
    assert pruned.get_array()[2, 29] == pytest.approx(0.2)  # mlp_output layer 29: 1.2 - 1.0
    assert pruned.get_clim() == pytest.approx((-0.2, 0.2)) == changes[1].axes[0].images[0].get_clim()
    assert not any("compared by position" in k for k in figures)  # no block removed
    deeper = _state()
    deeper["rounds"][0]["events"] = [{"pruning_type": "DEPTH", "removed_layers": [12]}]
    assert (
        sum("blocks were removed, so layers are compared by position" in k for k in report_figures(deeper))
        == 2
    )
    panels = figures[next(k for k in figures if "one panel per component" in k)]
    assert [ax.get_title(loc="left") for ax in panels.axes[:3]] == list(COMPONENTS)
    assert "input_norm_layer_0" not in texts(panels)  # layer numbers, not 90 layer keys


def test_report_images_decode_and_carry_their_labels(tmp_path):
    card = _two_rounds()
    card["baseline"]["bias/activation_normalized_difference"] = 0.5
    html = write_report(tmp_path, card, figures=report_figures(_state())).read_text()
    images = report_images(html)
    assert len(images) == 2 + len(report_figures(_state()))
    assert all(image.ndim == 3 and min(image.shape[:2]) > 100 for image in images)
    assert (
        "Normalised activation difference: for two sentences that differ only in a demographic term" in html
    )


def test_wandb_image_holds_the_whole_colour_bar():
    fig = component_layer_heatmap(_state()["baseline"], "round 1")
    rgb = figure_to_rgb(fig)
    colourbar = fig.axes[1].get_window_extent()
    assert rgb.shape[1] == round(fig.bbox.width) and colourbar.x1 < rgb.shape[1] - 20  # room for its ticks
