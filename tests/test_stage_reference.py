"""Every stage judged on the held-out half, its per-item results saved in the run folder, and a run's
stages paired with another run's (``reference_run``): hand-computed changes, the pipeline end to end
(state, card, report.html, W&B), and bad references refused before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from conftest import make_char_tokenizer
from pipeline_helpers import write_assets, write_config
from wandb_offline import history, run_files, summary, value_and_prefix

from optipfair_train.bias import StereoSetItem, item_id, load_stereoset, split_items, stereoset_change
from optipfair_train.callbacks import BiasProbeCallback, FairnessGuardCallback
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.evaluate import StageEvaluator
from optipfair_train.pipeline.reference import check_reference_run, reference_metrics
from optipfair_train.pipeline.stage_items import (
    fingerprint,
    read_stage_items,
    saved_stages,
    stage_record,
    write_stage_items,
)
from optipfair_train.zeroshot import zeroshot_change

PIQA = [{"goal": f"Goal {i}", "sol1": "push it in", "sol2": "pull", "label": i % 2} for i in range(12)]


def _stereoset_lines(n: int = 16) -> list[str]:
    """``n`` distinct items, two tasks and two bias types, one target per item."""
    lines = []
    for i in range(n):
        task = ("intrasentence", "intersentence")[i % 2]
        context = f"Person {i} was BLANK." if task == "intrasentence" else f"Person {i} came in."
        record = {"type": task, "target": f"group {i}", "bias_type": ("gender", "race")[(i // 2) % 2],
                  "context": context, "stereotype": f"Kind {i}.", "anti-stereotype": f"Calm {i}.",
                  "unrelated": f"Rock {i}."}  # fmt: skip
        lines.append(json.dumps(record))
    return lines


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import datasets

    root = write_assets(tmp_path_factory.mktemp("reference-assets"))
    (root / "stereoset.jsonl").write_text("\n".join(_stereoset_lines()) + "\n")
    datasets.Dataset.from_list(PIQA).save_to_disk(str(root / "piqa"))
    return root


def _settings(assets: Path, **overrides) -> dict:
    return {
        "stereoset_data": str(assets / "stereoset.jsonl"),
        "stereoset_sample_size": 6,
        "zeroshot_tasks": "piqa",
        "zeroshot_sample_size": 8,
        "zeroshot_data": f"piqa={assets / 'piqa'}",
        "num_rounds": 1,
        "num_layers_to_remove": 0,
        "heal_method": "none",
    } | overrides


# -- the judged items ------------------------------------------------------------------------------------
def test_every_run_judges_the_held_out_half_with_or_without_the_fairness_mode(assets, tmp_path):
    items = load_stereoset(assets / "stereoset.jsonl")
    tokenizer = make_char_tokenizer()

    def judged(seed: int, **mode) -> StageEvaluator:
        settings = _settings(assets, seed=seed, stereoset_sample_size=100, zeroshot_tasks="", **mode)
        return StageEvaluator(
            load_config(write_config(assets, tmp_path / f"run-{seed}", **settings)), tokenizer
        )

    for seed in (0, 1):
        build, held_out = split_items(items, seed=seed)
        plain = judged(seed)
        fair = judged(
            seed, attention_pruning_percentage=50, neuron_selection_method="fairness", fairness_items=4
        )
        assert plain.stereoset_items == held_out == fair.stereoset_items  # the same items: the runs pair
        assert not set(plain.stereoset_items) & set(build) and len(held_out) == len(items) // 2
        assert plain.fairness_items == [] and set(fair.fairness_items) <= set(build)
        assert plain.stereoset_ids == [item_id(x) for x in held_out]
        assert judged(seed).stereoset_items == plain.stereoset_items  # stable under the seed
    assert judged(0).stereoset_items != judged(1).stereoset_items


# -- per-item files and hand-computed pairing ---------------------------------------------------------------
def _record(
    stage: str, pro: list[int], correct: list[int], perplexity: float, ids: list | None = None
) -> dict:
    """A stage record whose item scores are chosen: item i prefers the stereotype iff ``pro[i]``, and the
    unrelated option always scores lowest (LMS 100)."""
    items = [
        {"task": "intersentence", "target": f"t{i}", "bias_type": ("gender", "race")[i % 2],
         "mean_log_prob": {"stereotype": -1.0 if p else -2.0, "anti-stereotype": -2.0 if p else -1.0,
                           "unrelated": -9.0},
         "num_tokens": {"stereotype": 1, "anti-stereotype": 1, "unrelated": 1}}
        for i, p in enumerate(pro)
    ]  # fmt: skip
    zeroshot = {"piqa": {"acc_items": correct, "item_keys": [f"k{i}" for i in range(len(correct))]}}
    ids = ids or [f"id{i}" for i in range(len(pro))]
    texts = {"perplexity": "text.txt (256 tokens)"}
    return stage_record(stage, 0, (ids, items), zeroshot, {"perplexity": perplexity, "texts": texts})


def test_stage_files_are_written_whole_and_read_back(tmp_path):
    record = _record("round-1-healed", [1, 0, 1, 0], [1, 0, 0, 1], 12.0)
    path = write_stage_items(tmp_path, record)
    assert path == tmp_path / "stage-items" / "round-1-healed.json" and not list(path.parent.glob(".tmp-*"))
    assert read_stage_items(tmp_path, "round-1-healed") == record
    assert record["stereoset"]["fingerprint"] == fingerprint([f"id{i}" for i in range(4)])
    write_stage_items(tmp_path, _record("base", [1, 1, 1, 1], [1, 1, 1, 1], 10.0))
    assert saved_stages(tmp_path) == ["base", "round-1-healed"] and read_stage_items(tmp_path, "x") is None
    path.write_text("{not json")
    with pytest.raises(ValueError, match="round-1-healed.json is damaged"):
        read_stage_items(tmp_path, "round-1-healed")


def test_reference_metrics_are_the_hand_computed_paired_changes(tmp_path):
    # reference: items 0, 1 stereotyped (SS 50); this run: items 0, 1, 2 (SS 75): +25 overall; by type
    # gender (items 0, 2) 50 -> 100, race (items 1, 3) 50 -> 50; zero-shot 2/4 -> 3/4 right: +25
    write_stage_items(tmp_path, _record("round-1-healed", [1, 1, 0, 0], [1, 0, 1, 0], 10.0))
    mine = _record("round-1-healed", [1, 1, 1, 0], [1, 1, 1, 0], 12.0)
    m = reference_metrics(tmp_path, mine, seed=0)
    assert m["reference/stereoset/ss_change"] == 25.0 and m["reference/stereoset/lms_change"] == 0.0
    assert (
        m["reference/stereoset/ss_change/gender"] == 50.0 and m["reference/stereoset/ss_change/race"] == 0.0
    )
    assert m["reference/stereoset/num_items"] == 4 and m["reference/stereoset/ss_flipped"] == 25.0
    assert m["reference/stereoset/ss_change_ci_low"] <= 25.0 <= m["reference/stereoset/ss_change_ci_high"]
    assert m["reference/zeroshot/accuracy_change"] == 25.0 == m["reference/zeroshot/piqa/acc_change"]
    assert m["reference/perplexity_ratio"] == 1.2 and "reference/perplexity/general_ratio" not in m
    # the same per-item results as the reference: every change exactly 0, the ratio exactly 1
    same = reference_metrics(tmp_path, read_stage_items(tmp_path, "round-1-healed"), seed=0)
    changes = {k: v for k, v in same.items() if "_change" in k}
    assert changes and set(changes.values()) == {0.0} and same["reference/perplexity_ratio"] == 1.0


def test_a_stage_that_cannot_be_paired_gets_no_reference_value_and_a_warning(tmp_path, caplog):
    write_stage_items(tmp_path, _record("base", [1, 1, 0, 0], [1, 0, 1, 0], 10.0))
    other = _record("base", [1, 1, 0], [1, 0, 1, 0], 10.0)  # three StereoSet items: others
    other["perplexity"]["texts"]["perplexity"] = "another text"
    with caplog.at_level(logging.WARNING, logger="optipfair_train.pipeline.reference"):
        m = reference_metrics(tmp_path, other, seed=0)
        assert reference_metrics(tmp_path, _record("round-1-pruned", [1], [1], 9.0), seed=0) == {}
    assert not any(k.startswith("reference/stereoset") for k in m) and "reference/perplexity_ratio" not in m
    assert m["reference/zeroshot/accuracy_change"] == 0.0  # the zero-shot items still pair
    assert "judged other items (4 items" in caplog.text and "measured on other text" in caplog.text
    assert "no per-item results of stage round-1-pruned (it has: base)" in caplog.text


def test_the_guard_logs_each_probe_paired_with_a_reference(tmp_path):
    items = [StereoSetItem("intersentence", f"t{i}", ("gender", "race")[i % 2], f"C {i}.", "s", "a", "u")
             for i in range(4)]  # fmt: skip
    ids = [item_id(item) for item in items]
    path = write_stage_items(tmp_path, _record("round-1-healed", [1, 1, 0, 0], [1], 10.0, ids))
    probe = BiasProbeCallback(
        stereoset_items=items, stereoset_sample_size=None, n_bootstrap=50, log_media=False
    )
    guard = FairnessGuardCallback(reference=path, probe=probe)
    state = SimpleNamespace(global_step=3, log_history=[], is_world_process_zero=True)
    probe.last_stereoset = {"items": _record("base", [1, 1, 1, 0], [1], 1.0)["stereoset"]["items"]}
    guard.on_log(None, state, SimpleNamespace(), logs={"stereoset/ss": 75.0})
    (logged,) = state.log_history  # the hand-computed changes of the test above, under the callbacks' names
    assert logged["reference/stereoset/ss_change"] == 25.0 and logged["reference/stereoset/num_items"] == 4
    assert logged["reference/stereoset/ss_change_by/gender"] == 50.0
    assert guard.last_reference_change["ss_change"] == 25.0
    guard.on_log(None, state, SimpleNamespace(), logs={"loss": 1.0})
    assert len(state.log_history) == 1  # paired once per probe
    with pytest.raises(ValueError, match="holds other StereoSet items"):
        FairnessGuardCallback(
            reference=path, probe=BiasProbeCallback(stereoset_items=items[:3], log_media=False)
        )
    with pytest.raises(ValueError, match="reference needs probe="):
        FairnessGuardCallback(reference=path)
    with pytest.raises(ValueError, match="holds no StereoSet per-item results"):
        FairnessGuardCallback(reference={"stage": "base"}, probe=probe)


# -- bad references -------------------------------------------------------------------------------------
def test_a_bad_reference_run_is_refused_before_any_folder_is_written(assets, tmp_path):
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "state.json").write_text('{"config": {}}')
    out = tmp_path / "run"
    cases = [
        (tmp_path / "missing", "is not a folder"),
        (not_a_run, "holds no state.json, so it is not a run folder"),
        (damaged, "is not a readable run folder"),
    ]
    for reference, problem in cases:
        config = load_config(write_config(assets, out, **_settings(assets, reference_run=str(reference))))
        with pytest.raises(ValueError, match=f"reference_run: {reference} {problem}"):
            PruneThenHeal(config).run()
        assert not out.exists()
    with pytest.raises(ValueError, match="reference_run: .* is this run's own output_dir"):
        check_reference_run(str(damaged), output_dir=damaged / ".." / "damaged")
    assert check_reference_run("", out) is None


# -- the pipeline end to end ----------------------------------------------------------------------------
def _stages(state: dict) -> list[tuple[str, dict]]:
    named = [("base", state["baseline"])]
    for r in state["rounds"]:
        named += [(f"round-{r['round']}-pruned", r["pruned"]), (f"round-{r['round']}-healed", r["healed"])]
    return named


def test_a_run_paired_with_a_reference_run_on_the_card_report_and_wandb(assets, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    PruneThenHeal(load_config(write_config(assets, reference, **_settings(assets)))).run()
    assert saved_stages(reference) == ["base", "round-1-pruned", "round-1-healed"]
    state = json.loads((reference / "state.json").read_text())
    base_file = read_stage_items(reference, "base")
    assert base_file["stereoset"]["items"] == state["stereoset_base_items"]
    assert base_file["zeroshot"]["tasks"] == state["zeroshot_base_items"]["tasks"]
    assert not any(k.startswith("reference/") for _, m in _stages(state) for k in m)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    settings = _settings(assets, mlp_pruning_percentage=60, reference_run=str(reference), report_to="wandb")
    PruneThenHeal(load_config(write_config(assets, out, **settings))).run()
    wandb.finish()
    state = json.loads((out / "state.json").read_text())
    for stage, m in _stages(state):  # equal to the paired changes of the two saved files
        theirs, mine = read_stage_items(reference, stage), read_stage_items(out, stage)
        expected = stereoset_change(theirs["stereoset"], mine["stereoset"], seed=0)
        for key in ("ss_change", "ss_change_ci_low", "lms_change", "icat_change_ci_high"):
            assert m[f"reference/stereoset/{key}"] == expected[key]
        assert m["reference/stereoset/ss_change/gender"] == expected["by_bias_type"]["gender"]["ss_change"]
        zs = zeroshot_change(theirs["zeroshot"], mine["zeroshot"], seed=0)
        assert m["reference/zeroshot/accuracy_change"] == zs["mean"]["acc_change"]
        assert (
            m["reference/perplexity_ratio"]
            == mine["perplexity"]["perplexity"] / theirs["perplexity"]["perplexity"]
        )
        assert m["reference/stereoset/num_items"] == 6
    base, healed = state["baseline"], state["rounds"][0]["healed"]
    assert base["reference/stereoset/ss_change"] == 0.0 and base["reference/perplexity_ratio"] == 1.0
    assert healed["reference/perplexity_ratio"] != 1.0  # 60% of the MLP removed, not 30%

    card = (out / "final" / "README.md").read_text()
    section = card.split("## vs the run without the mode")[1].split("\n## ")[0]
    assert f"`{reference}`" in section
    row = next(line for line in section.splitlines() if line.startswith("| round 1 healed |"))
    ss = healed["reference/stereoset/ss_change"]
    assert (
        row.startswith(f"| round 1 healed | 6 | {ss:+.1f} [")
        and f"{healed['reference/perplexity_ratio']:.3f}" in row
    )
    by_type = [line for line in section.splitlines() if line.startswith("| round 1 healed |")][1]
    gender = healed["reference/stereoset/ss_change/gender"]
    assert "gender (n=" in section and f"{gender:+.1f} [" in by_type
    report = (out / "report.html").read_text()
    assert "vs the run without the mode" in report and f"{healed['reference/perplexity_ratio']:.3f}" in report
    assert f"StereoSet SS change vs the reference run ({reference}): {ss:+.1f} [" in report  # the verdict
    (path,) = run_files(out)
    logged = {h["round"]: h for h in history(path) if "healed/stereoset/ss" in h}
    assert logged[1]["healed/reference/stereoset/ss_change"] == ss
    assert (
        logged[1]["healed/reference/stereoset/ss_change_by/gender"]
        == healed["reference/stereoset/ss_change/gender"]
    )
    assert (
        logged[1]["pruned/reference/zeroshot/accuracy_change"]
        == state["rounds"][0]["pruned"]["reference/zeroshot/accuracy_change"]
    )
    assert not value_and_prefix(set(logged[1]))
    assert summary(path)["verdict/reference_ss_change"] == ss
