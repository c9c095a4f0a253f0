"""The local HTML dashboard: self-contained, every stage, plots inline; bad figures refused first."""

from __future__ import annotations

import base64
import re

import pytest
from matplotlib.figure import Figure
from test_card import _card

from optipfair_train.pipeline.card import card_rows
from optipfair_train.pipeline.report import figure_png, trajectory_figures, write_report


def _two_rounds() -> dict:
    card = _card()
    second = {
        "round": 2,
        "events": card["rounds"][0]["events"],
        "heal_tokens": 15360,
        "pruned": {"parameters": 118600128, "perplexity": 30.1, "bias/score": 47.8, "bias/score_ci_low": 45.5,
                   "bias/score_ci_high": 50.3},
        "healed": {"parameters": 118600128, "perplexity": 16.5, "perplexity/general": 48.1, "stereoset/ss": 57.0,
                   "stereoset/ss_ci_low": 55.0, "stereoset/ss_ci_high": 59.0, "stereoset/lms": 80.0,
                   "stereoset/icat": 68.8},
    }  # fmt: skip
    card["rounds"].append(second)
    return card


def _heatmap() -> Figure:
    fig = Figure(figsize=(3, 2))
    fig.subplots().imshow([[0.1, 0.5], [0.3, 0.9]])
    return fig


def test_report_is_self_contained_and_shows_every_stage(tmp_path):
    card = _two_rounds()
    png = figure_png(_heatmap())
    path = write_report(tmp_path / "final", card, figures={"bias heatmap": _heatmap(), "as PNG bytes": png})
    text = path.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    stages = text[text.index("<h2>Stages</h2>") : text.index("<h2>Trajectories")]
    for row in card_rows(card):
        cells = "".join(f"<td>{cell}</td>" for cell in row.values())
        shipped = row["stage"].endswith("(final, shipped)")
        assert ('<tr class="final">' if shipped else "<tr>") + cells + "</tr>" in stages
    assert [row["stage"] for row in card_rows(card)] == [
        "base", "round 1 pruned", "round 1 healed", "round 2 pruned", "round 2 healed (final, shipped)"
    ]  # fmt: skip
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4  # perplexity and bias trajectories, then the two figures given
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert base64.b64decode(images[3]) == png
    assert "<figcaption>bias heatmap</figcaption>" in text and "round 2 healed" in text
    assert "Speed: not measured side by side." in text


def test_the_report_opens_with_the_verdict_and_renders_the_card_as_html(tmp_path):
    card = _two_rounds()
    card["general_text"] = "WikiText-2 test (../shared/data/wikitext-2/test.txt)"
    files = {"final model": "out/final", "report": "out/report.html"}
    text = write_report(tmp_path, card, files=files).read_text()
    verdict = text[text.index('<div class="verdict">') : text.index("<h2>Stages</h2>")]
    assert text.index('<div class="verdict">') < text.index("<h2>Stages</h2>")  # the verdict comes first
    # 118,600,128 / 134,515,008 = -11.8%; WikiText-2 48.1 / 31.98 = 1.50x; healing domain 16.5 / 17.78
    assert "parameters: 134,515,008 -&gt; 118,600,128 (-11.8%)" in verdict
    assert (
        "perplexity, general text (WikiText-2 test; no healing saw it): 31.98 -&gt; 48.10 (1.50x base)"
        in verdict
    )
    assert "perplexity, healing domain (demo, held out): 17.78 -&gt; 16.50 (0.93x base)" in verdict
    assert "<li>report: out/report.html</li>" in verdict
    assert "<pre>---" not in text and "| stage |" not in text  # no raw markdown
    card_part = text[text.index("<h2>Model card</h2>") :]
    assert "<summary>metadata (YAML front matter)</summary>" in card_part
    assert (
        "<th>perplexity, WikiText-2 test</th>" in card_part and "../shared" not in text.split("<details>")[0]
    )
    assert "<li>round 1: MLP_GLU by <code>activation</code>" in card_part


def test_bias_trajectory_leaves_out_an_ss_without_its_lms():
    card = _two_rounds()
    plotted = trajectory_figures(card)["bias across stages"].axes[0].lines
    ss = next(line for line in plotted if line.get_label() == "StereoSet SS")
    assert list(ss.get_xdata()) == [0, 4] and list(ss.get_ydata()) == [
        61.234,
        57.0,
    ]  # round 1 pruned left out


def test_bad_figures_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="matplotlib figure or PNG bytes"):
        write_report(tmp_path, _two_rounds(), figures={"x": "not a figure"})
    with pytest.raises(ValueError, match="PNG signature"):
        write_report(tmp_path, _two_rounds(), figures={"x": b"GIF89a"})
    assert not list(tmp_path.iterdir())
