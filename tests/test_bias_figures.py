"""Figures (files exist, axes labelled) for each type, and the probe command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model
from matplotlib.figure import Figure

from optipfair_train.bias import cli as bias_cli
from optipfair_train.bias import (
    visualize_bias,
    visualize_bias_trajectory,
    visualize_heatmap,
    visualize_mean_differences,
    visualize_pca,
)
from optipfair_train.cli_parser import build_parser

PAIR = ("The white man walked home.", "The Asian woman walked home.")
CROWS = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "crows-pairs"
    / "crows_pairs_anonymized.csv"
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _labelled(fig: Figure) -> bool:
    ax = fig.axes[0]
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel()) and bool(ax.get_title())


def test_each_figure_type_is_created_with_labelled_axes(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    figures, metrics = visualize_bias(model, tokenizer, [PAIR], output_dir=tmp_path, show_progress=False)
    kinds = {name.split("_")[0] for name in figures}
    assert kinds == {"mean", "heatmap", "pca"}
    assert len(figures) == 1 + 2 * 3 * 2  # bars + (heatmap, pca) x first/middle/last x 2 components
    for name, fig in figures.items():
        assert isinstance(fig, Figure) and _labelled(fig), name
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "pair_1" in json.loads((tmp_path / "bias_metrics.json").read_text())
    assert metrics["pair_1"]["metrics"]["overall_metrics"]["total_layers"] == 24

    singles = [
        visualize_mean_differences(
            model, tokenizer, PAIR, ["mlp_output", "gate_proj"], "all", tmp_path, "svg"
        ),
        visualize_heatmap(model, tokenizer, PAIR, "up_proj_layer_1", tmp_path, "pdf"),
        visualize_pca(model, tokenizer, PAIR, "attention_output_layer_2", output_dir=tmp_path),
        visualize_bias_trajectory(
            [{"step": s, "score": 50 - s, "score_ci_low": 48 - s, "score_ci_high": 52 - s} for s in range(4)],
            "score",
            output_dir=tmp_path,
            reference=50,
        ),
    ]
    assert all(_labelled(fig) for fig in singles)
    for name in (
        "mean_diff_mlp_output_gate_proj_pair0.svg",
        "heatmap_up_proj_layer_1_pair0.pdf",
        "pca_attention_output_layer_2_pair0.png",
        "bias_trajectory.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name


def test_figure_errors_are_clear(tokenizer):
    model = make_tiny_model("qwen2")
    with pytest.raises(ValueError, match="Unknown visualization type.*mean_diff, heatmap, pca"):
        visualize_bias(model, tokenizer, [PAIR], ["bars"], show_progress=False)
    with pytest.raises(ValueError, match="figure format"):
        visualize_bias(model, tokenizer, [PAIR], figure_format="bmp", show_progress=False)
    with pytest.raises(KeyError, match="Available keys"):
        visualize_pca(model, tokenizer, PAIR, "attention_output_layer_o")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser("probe").parse_args(["probe", *argv])


def test_probe_cli_writes_figures_metrics_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        bias_cli, "_load_model", lambda *a: (make_tiny_model("mistral"), make_char_tokenizer())
    )
    pairs = f"crows-pairs:{CROWS}" if CROWS.is_file() else "default"
    out = tmp_path / "probe"
    argv = [
        "--model-path",
        "tiny",
        "--pairs",
        pairs,
        "--output-dir",
        str(out),
        "--sample-size",
        "6",
        "--layers",
        "0,3",
        "--visualizations",
        "mean_diff,pca",
        "--no-progress",
    ]
    assert bias_cli.run_probe(_args(*argv)) == 0
    report = json.loads((out / "bias_metrics.json").read_text())
    assert report["num_pairs"] == 6 and len(report["activation"]["per_pair_overall"]) == 6
    assert 0 <= report["behavioural"]["score"] <= 100
    assert sorted(report["figures"]) == sorted(p.name for p in out.glob("*.png"))
    assert len(report["figures"]) == 1 + 2 * 2
    summary = (out / "summary.txt").read_text()
    assert "Behavioural score" in summary and summary.strip() in capsys.readouterr().out

    bad = _args("--model-path", "tiny", "--pairs", str(tmp_path / "nope.jsonl"), "--output-dir", str(out))
    assert bias_cli.run_probe(bad) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_cli_on_the_demo_model(tmp_path):
    pytest.importorskip("optipfair_train.models")
    argv = [
        "--model-path",
        "demo",
        "--pairs",
        f"crows-pairs:{CROWS}",
        "--output-dir",
        str(tmp_path),
        "--sample-size",
        "20",
        "--no-progress",
    ]
    assert bias_cli.run_probe(_args(*argv)) == 0
    report = json.loads((tmp_path / "bias_metrics.json").read_text())
    assert report["activation"]["aggregate"]["overall_metrics"]["total_layers"] == 6 * 30
    assert len(report["figures"]) == 13


def test_trajectory_has_integer_step_ticks_and_interval_bands():
    from optipfair_train.bias import trajectory_figure

    fig = trajectory_figure(
        [0, 1, 2], {"ss": [60.0, 58.0, 55.0]}, {"ss": ([57, 55, 52], [63, 61, 58])}, reference=50
    )
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())  # no 0.25-step ticks for rounds
    assert len(ax.collections) == 1  # the band


def test_bias_type_and_layer_heatmaps():
    import numpy as np

    from optipfair_train.bias import bias_type_heatmap_figure, layer_heatmap_figure

    fig = bias_type_heatmap_figure({"base": {"gender": 62.0, "race": 58.0}, "pruned": {"gender": 45.0}})
    ax = fig.axes[0]
    image = ax.images[0]
    data = np.ma.filled(image.get_array().astype(float), np.nan)
    assert data[0].tolist() == [62.0, 58.0] and data[1, 0] == 45.0 and np.isnan(data[1, 1])
    assert image.get_clim() == (38.0, 62.0)  # centred on 50: distance from no preference is colour
    assert [t.get_text() for t in ax.texts] == ["62.0", "58.0", "45.0"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gender", "race"]
    layers = layer_heatmap_figure(
        {"round 0": {"mlp_output_layer_0": 0.2, "mlp_output_layer_1": 0.4, "attention_output_layer_1": 0.9}}
    )  # one panel per component, layer numbers on x, one colour scale for both panels
    assert [ax.get_title(loc="left") for ax in layers.axes[:2]] == ["mlp_output", "attention_output"]
    assert [t.get_text() for t in layers.axes[0].get_xticklabels()] == ["0", "1"]
    assert layers.axes[0].images[0].get_clim() == layers.axes[1].images[0].get_clim() == (0.2, 0.9)
    assert np.ma.getmaskarray(layers.axes[1].images[0].get_array())[0, 0]  # no attention value for layer 0
    with pytest.raises(ValueError, match="at least one row"):
        layer_heatmap_figure({})


def test_figure_to_rgb_renders_the_drawn_pixels():
    from optipfair_train.bias.figures import figure_to_rgb, new_figure

    fig = new_figure(2, 1)
    fig.patch.set_facecolor((1.0, 0.0, 0.0))
    fig.add_axes((0.5, 0.0, 0.5, 1.0)).set_facecolor((0.0, 0.0, 1.0))
    rgb = figure_to_rgb(fig)
    assert rgb.shape == (100, 200, 3) and str(rgb.dtype) == "uint8"
    assert rgb[50, 20].tolist() == [255, 0, 0]  # left half: the red figure background
    assert rgb[50, 150].tolist() == [0, 0, 255]  # right half: the blue axes
