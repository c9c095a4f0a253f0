"""The model card: its rows are the values it was given, SS only with LMS, compact YAML, the speed verdict."""

from __future__ import annotations

import yaml

from optipfair_train.pipeline.card import card_rows, render_model_card, write_model_card
from optipfair_train.speed import compare_timings

EVENT = {
    "pruning_type": "MLP_GLU",
    "method": "activation",
    "pruning_percentage": 19.986979166666668,
    "intermediate_sizes": [1383] * 30,
    "parameters_before": 134515008,
    "parameters_after": 126557568,
    "calibration_batches": 2,  # not card material
}


def _card(speed=None) -> dict:
    return {
        "base_model": "tiny/base",
        "heal_text": "demo",
        "general_text": "WikiText-2",
        "eval_tokens": 4096,
        "healing": {"method": "lora", "data": "demo", "steps_per_round": 30},
        "baseline": {
            "parameters": 134515008,
            "perplexity": 17.78,
            "perplexity/general": 31.98,
            "stereoset/ss": 61.234,
            "stereoset/ss_ci_low": 59.01,
            "stereoset/ss_ci_high": 63.5,
            "stereoset/lms": 88.04,
            "stereoset/icat": 68.25,
            "bias/score": 55.6,
            "bias/score_ci_low": 53.1,
            "bias/score_ci_high": 58.4,
        },
        "rounds": [
            {
                "round": 1,
                "events": [EVENT],
                "heal_tokens": 15360,
                "pruned": {
                    "parameters": 126557568,
                    "perplexity": 25.5,
                    "stereoset/ss": 58.0,
                },  # SS without LMS
                "healed": {"parameters": 126557568, "perplexity": 16.09, "perplexity/general": 47.62},
            }
        ],
        "speed": speed,
    }


def _table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


HEALED_STEREOSET = {
    "stereoset/ss": 58.04,
    "stereoset/ss_ci_low": 55.1,
    "stereoset/ss_ci_high": 61.0,
    "stereoset/ss_change": -3.19,  # paired against the base
    "stereoset/ss_change_ci_low": -4.96,
    "stereoset/ss_change_ci_high": -1.5,
    "stereoset/lms": 87.5,
    "stereoset/icat": 71.9,
}


def test_rows_equal_the_values_given(tmp_path):
    card = _card()
    card["rounds"][0]["healed"] |= HEALED_STEREOSET
    path = write_model_card(tmp_path, card)
    header, *rows = _table(path.read_text())
    assert header[2] == "perplexity, demo (healing domain)" and header[3] == "perplexity, WikiText-2"
    assert rows == [list(row.values()) for row in card_rows(card)]
    assert rows[0] == [
        "base", "134,515,008", "17.78", "31.98", "61.2 [59.0, 63.5]", "-", "88.0", "68.2", "55.6 [53.1, 58.4]"
    ]  # fmt: skip
    assert rows[1] == ["round 1 pruned", "126,557,568", "25.50", "-", "-", "-", "-", "-", "-"]  # SS needs LMS
    assert rows[2] == [
        "round 1 healed (final, shipped)", "126,557,568", "16.09", "47.62", "58.0 [55.1, 61.0]", "-3.2 [-5.0, -1.5]", "87.5", "71.9",
        "-",
    ]  # fmt: skip


def test_yaml_is_compact_and_speed_is_a_verdict(tmp_path):
    noise = compare_timings([1.0, 1.1, 1.05], [1.02, 0.99, 1.08], tokens=32)
    faster = compare_timings([1.0, 1.1, 1.05], [0.8, 0.82, 0.81], tokens=32)
    speed = {"prefill": noise, "decode": faster, "repeats": 3, "threads": 2, "load_before": [1.5, 1.0, 0.5],
             "load_after": [1.6, 1.0, 0.5], "batch_size": 1, "prompt_tokens": 17, "new_tokens": 32}  # fmt: skip
    text = render_model_card(_card(speed))
    metadata = yaml.safe_load(text.split("---\n")[1])
    pruning = metadata["optipfair_train"]["rounds"][0]["pruning"][0]
    assert pruning["intermediate_sizes"] == {"every_layer": 1383, "layers": 30}
    assert pruning["pruning_percentage"] == 19.99  # a measured ratio, rounded for a reader
    assert "calibration_batches" not in pruning
    assert metadata["optipfair_train"]["speed"] == {
        "prefill": "no measurable change",
        "decode": "x1.30 faster",
    }
    assert metadata["optipfair_train"]["rounds"][0]["healed_perplexity_general"] == 47.62
    assert (
        "prefill no measurable change" in text
        and "decode x1.30 faster" in text
        and "load average 1.5" in text
    )
    # ranges beside the medians (the verdict is read from them), and the work measured
    # prefill: 32 tokens / median 1.05 s = 30.5 tok/s, slowest 32 / 1.1 = 29.1, fastest 32 / 1.0 = 32.0
    assert (
        "prefill no measurable change (tok/s, median [range]: base 30.5 [29.1-32.0], final 31.4 [29.6-32.3])"
        in text
    )
    assert "32 tokens after a 17-token prompt" in text
    assert "speed-up" not in text


def test_without_general_text_or_speed_the_card_says_so(tmp_path):
    card = _card()
    card["general_text"] = None
    for stage in [card["baseline"], card["rounds"][0]["healed"]]:
        stage.pop("perplexity/general")
    text = render_model_card(card)
    assert (
        "perplexity, general text (none given)" in text
        and "no general held-out text (none was given)" in text
    )
    assert "not measured side by side (no verdict)" in text


def test_calibration_text_and_the_refit_are_named():
    card = _card()
    card["calibration"] = {"data": "teacher", "tokens": 8192}
    card["rounds"][0]["events"] = [{**EVENT, "method": "hybrid", "reconstruct": True, "damping": 0.01}]
    text = render_model_card(card)
    assert "Calibration (scores, refits): 8,192 tokens of text written by the unpruned model" in text
    assert (
        "MLP_GLU by `hybrid`" in text
        and "kept down_proj columns refit to the unpruned outputs, damping 0.01" in text
    )
    assert "refit" not in render_model_card(_card())  # no refit, no claim of one


def test_weight_only_pruning_claims_no_calibration_text():
    card = _card()
    card["calibration"] = {"data": "demo", "tokens": 2048}
    card["rounds"][0]["events"] = [{**EVENT, "method": "MAW"}]
    assert "Calibration (scores, refits)" not in render_model_card(card)
    card["rounds"][0]["events"] = [{**EVENT, "method": "MAW", "reconstruct": True, "damping": 0.01}]
    assert "Calibration (scores, refits): 2,048 tokens of `demo`" in render_model_card(card)


def test_headers_name_texts_without_internal_paths_and_an_unmeasured_crows_column_is_explained():
    card = _card()
    card["general_text"] = "WikiText-2 test (../shared/data/wikitext-2/test.txt)"
    for key in ("bias/score", "bias/score_ci_low", "bias/score_ci_high"):
        card["baseline"].pop(key)
    text = render_model_card(card)
    header, *rows = _table(text)
    assert header[3] == "perplexity, WikiText-2 test" and "CrowS-Pairs [95% CI]" not in header
    assert "on WikiText-2 test (test.txt), text no healing saw" in text and "../shared" not in text
    assert all(len(row) == len(header) == 8 for row in rows)
    assert "CrowS-Pairs-style score: not measured (no behaviour_pairs given)" in text


def test_a_lora_run_lists_only_the_settings_it_used():
    from optipfair_train.pipeline import load_config
    from optipfair_train.pipeline.card import card_inputs

    state = {"baseline": {"parameters": 10}, "rounds": []}
    lora = card_inputs(load_config(None, ["--heal_method", "lora"]), state, None)["healing"]
    kd = card_inputs(load_config(None, ["--heal_method", "kd"]), state, None)["healing"]
    assert "lora_r" in lora and "kd_temperature" not in lora and "kd_alpha" not in lora
    assert "kd_alpha" in kd and "lora_r" not in kd
