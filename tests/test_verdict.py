"""The run's verdict (console, report.html, W&B summary): general-text perplexity beside the healing-domain
one, each as a ratio to the base, the StereoSet change with its interval and n, and where the files are."""

from __future__ import annotations

import pytest
from test_card import HEALED_STEREOSET, _card

from optipfair_train.pipeline.verdict import run_files, short_text_name, verdict, verdict_lines, wandb_summary


def _shipped() -> dict:
    card = _card()
    card["general_text"] = "WikiText-2 test (../shared/data/wikitext-2/test.txt)"
    card["rounds"][0]["healed"] |= HEALED_STEREOSET | {"stereoset/num_items": 300}
    return card


def test_the_verdict_gives_both_perplexities_as_ratios_and_the_bias_change_with_n():
    card = _shipped()
    v = verdict(card)
    # 126,557,568 / 134,515,008 - 1 = -5.916%; WikiText-2 47.62 / 31.98; healing domain 16.09 / 17.78
    assert v["parameters"]["percent_change"] == pytest.approx(-5.9157, abs=1e-4)
    assert v["general"]["ratio"] == pytest.approx(47.62 / 31.98)
    assert v["heal_domain"]["ratio"] == pytest.approx(16.09 / 17.78)
    lines = verdict_lines(card, run_files("out/demo"))
    assert lines == [
        "Verdict, base -> round 1 healed:",
        "parameters: 134,515,008 -> 126,557,568 (-5.9%)",
        "perplexity, general text (WikiText-2 test; no healing saw it): 31.98 -> 47.62 (1.49x base)",
        "perplexity, healing domain (demo, held out): 17.78 -> 16.09 (0.90x base)",
        "StereoSet SS change vs base: -3.2 [-5.0, -1.5] (paired 95% CI, n=300 items): fewer stereotyped choices",
        "zero-shot accuracy change vs base: not measured",
        "final model: out/demo/final",
        "model card: out/demo/final/README.md",
        "report: out/demo/report.html",
    ]


def test_an_interval_holding_zero_is_no_measurable_change_and_missing_texts_say_why():
    card = _shipped()
    card["rounds"][0]["healed"]["stereoset/ss_change_ci_high"] = 0.4
    card["general_text"], card["general_note"] = None, "no general held-out text (none given)"
    for stage in (card["baseline"], card["rounds"][0]["healed"]):
        stage.pop("perplexity/general")
    lines = verdict_lines(card)
    assert (
        lines[2]
        == "perplexity, general text (none; no healing saw it): not measured (no general held-out text (none given))"
    )
    assert lines[4].endswith("no measurable change (the interval holds 0)")


def test_zero_shot_slot_fills_from_the_stage_keys():
    card = _shipped()
    card["rounds"][0]["healed"] |= {
        "zeroshot/accuracy_change": -1.25, "zeroshot/accuracy_change_ci_low": -2.5,
        "zeroshot/accuracy_change_ci_high": -0.1, "zeroshot/piqa/num_items": 100, "zeroshot/arc_easy/num_items": 100,
    }  # fmt: skip
    assert verdict_lines(card)[5] == (
        "zero-shot accuracy change vs base: -1.2 points [-2.5, -0.1] (paired 95% CI, n=200 items): measurably lower"
    )


def test_wandb_summary_and_header_names():
    summary = wandb_summary(_shipped())
    assert summary["verdict/perplexity_ratio/general"] == pytest.approx(47.62 / 31.98)
    assert summary["verdict/stereoset_ss_ci_low"] == -4.96 and "verdict/zeroshot_change" not in summary
    assert short_text_name("WikiText-2 test (../shared/data/wikitext-2/test.txt)") == "WikiText-2 test"
    assert short_text_name("/data/mine/news.txt") == "news.txt" and short_text_name("demo") == "demo"


def test_a_stereoset_score_without_its_paired_change_says_so():
    card = _shipped()
    for key in ("stereoset/ss_change", "stereoset/ss_change_ci_low", "stereoset/ss_change_ci_high"):
        card["rounds"][0]["healed"].pop(key)
    assert verdict_lines(card)[4] == "StereoSet SS change vs base: no paired change recorded"
    card["rounds"][0]["healed"].pop("stereoset/ss")
    assert verdict_lines(card)[4] == "StereoSet SS change vs base: not measured (no stereoset_data)"
