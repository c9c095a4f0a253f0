"""Zero-shot accuracy in the pipeline on a tiny model: every stage measured, the card's table and report
built from the logged values, paired changes vs the base, and a resume that does not re-measure."""

from __future__ import annotations

import json

import pytest
import wandb
from pipeline_helpers import run_cli, write_assets, write_config
from wandb_offline import history, run_files, summary, value_and_prefix

from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline import zeroshot_stage as stage_module

PIQA = [{"goal": f"Goal {i}", "sol1": "push it in", "sol2": "pull", "label": i % 2} for i in range(12)]
WINO = [
    {"sentence": f"Ann {i} hit Bo so _ cried.", "option1": "Ann", "option2": "Bo", "answer": "2"}
    for i in range(9)
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import datasets

    root = write_assets(tmp_path_factory.mktemp("zeroshot-assets"))
    datasets.Dataset.from_list(PIQA).save_to_disk(str(root / "piqa"))
    datasets.Dataset.from_list(WINO).save_to_disk(str(root / "wino"))
    return root


def _settings(assets, **overrides) -> dict:
    return {
        "zeroshot_tasks": "piqa,winogrande",
        "zeroshot_sample_size": 8,
        "zeroshot_data": f"piqa={assets / 'piqa'},winogrande={assets / 'wino'}",
        "num_rounds": 1,
        "num_layers_to_remove": 0,
        "heal_steps": 2,
        "save_steps": 1,
    } | overrides


def _stages(state: dict) -> list[dict]:
    return [state["baseline"]] + [m for r in state["rounds"] for m in (r["pruned"], r["healed"])]


def test_every_stage_is_measured_and_the_card_report_and_wandb_show_it(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    PruneThenHeal(load_config(write_config(assets, out, **_settings(assets, report_to="wandb")))).run()
    wandb.finish()
    state = json.loads((out / "state.json").read_text())
    stages = _stages(state)
    for m in stages:
        assert m["zeroshot/piqa/num_items"] == 8 and m["zeroshot/winogrande/num_items"] == 8
        assert m["zeroshot/accuracy"] == pytest.approx(
            (m["zeroshot/piqa/acc"] + m["zeroshot/winogrande/acc"]) / 2
        )
        assert m["zeroshot/accuracy_ci_low"] <= m["zeroshot/accuracy"] <= m["zeroshot/accuracy_ci_high"]
        assert "zeroshot/winogrande/acc_norm" not in m and "zeroshot/piqa/acc_norm" in m
    assert "zeroshot/accuracy_change" not in state["baseline"]
    assert set(state["zeroshot_base_items"]["tasks"]) == {"piqa", "winogrande"}
    for m in stages[1:]:  # paired against the base on the same items: the change is the difference of acc
        for key, change in (
            ("zeroshot/accuracy", "zeroshot/accuracy_change"),
            ("zeroshot/piqa/acc", "zeroshot/piqa/acc_change"),
        ):
            assert m[change] == pytest.approx(m[key] - state["baseline"][key])
            assert m[f"{change}_ci_low"] <= m[change] <= m[f"{change}_ci_high"]
    card = (out / "final" / "README.md").read_text()
    assert "## Zero-shot accuracy" in card
    healed = stages[-1]
    section = card.split("## Zero-shot accuracy")[1].split("\n## ")[0].splitlines()
    row = next(line for line in section if line.startswith("| round 1 healed"))
    assert f"{healed['zeroshot/piqa/acc']:.1f} [" in row
    assert f"{healed['zeroshot/accuracy_change']:+.1f} [" in row
    base_row = next(line for line in section if line.startswith("| base |"))
    assert f"{state['baseline']['zeroshot/winogrande/acc']:.1f} [" in base_row
    report = (out / "report.html").read_text()
    assert "Zero-shot accuracy" in report and f"{healed['zeroshot/accuracy_change']:+.1f} [" in report
    (path,) = run_files(out)
    logged = {h["round"]: h for h in history(path) if "healed/zeroshot/accuracy" in h}
    assert logged[0]["healed/zeroshot/piqa/acc"] == state["baseline"]["zeroshot/piqa/acc"]
    assert logged[1]["healed/zeroshot/accuracy_change"] == healed["zeroshot/accuracy_change"]
    assert logged[1]["pruned/zeroshot/winogrande/acc_change"] == stages[1]["zeroshot/winogrande/acc_change"]
    assert not value_and_prefix(set(logged[1]))
    assert summary(path)["verdict/zeroshot_change"] == healed["zeroshot/accuracy_change"]


@pytest.mark.slow
def test_a_resumed_run_does_not_measure_finished_stages_again(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = write_config(assets, out, **_settings(assets, num_rounds=2))
    crashed = run_cli(config, "between-rounds")  # round 1 finished and recorded, then SIGKILL
    assert crashed.returncode != 0 and (out / "state.json").exists()
    before = json.loads((out / "state.json").read_text())
    measured = []
    original = stage_module.ZeroShotStage.measure

    def counting(self, model, tokenizer, is_base=False):
        measured.append(is_base)
        return original(self, model, tokenizer, is_base)

    monkeypatch.setattr(stage_module.ZeroShotStage, "measure", counting)
    PruneThenHeal(load_config(config)).run()
    assert measured == [False, False]  # round 2 pruned and healed only: base and round 1 were kept
    state = json.loads((out / "state.json").read_text())
    assert state["baseline"] == before["baseline"]
    last = state["rounds"][-1]["healed"]
    assert last["zeroshot/accuracy_change"] == pytest.approx(
        last["zeroshot/accuracy"] - state["baseline"]["zeroshot/accuracy"]
    )
