"""state.json through one typed record (RunState): files of the earlier layout load and resume, a
malformed file is refused naming the file and the field.

tests/data/run-state/*.json were written by the pipeline as it was before RunState (a run stopped in a
NaN retry with W&B on, and a finished one-round run), with the temporary assets folder replaced by
``@ASSETS@``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import PoisonOnce, tiny_run_settings, write_assets
from test_pipeline_interrupted import _DieAfterStep3, _Died, _Steps

from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.card import card_inputs
from optipfair_train.pipeline.run_state import Retry, RunState, changed_settings

EARLIER = Path(__file__).parent / "data" / "run-state"


def _earlier(name: str, assets: Path | str = "/assets") -> dict:
    return json.loads((EARLIER / name).read_text().replace("@ASSETS@", str(assets)))


@pytest.mark.parametrize("name", ["retry-in-progress.json", "finished.json"])
def test_a_state_file_of_the_earlier_layout_loads_and_is_written_back_the_same(name, tmp_path):
    data = _earlier(name)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data, indent=2))
    state = RunState.load(path)
    assert state.config == data["config"] and state.rounds == data["rounds"]
    assert state.baseline == data["baseline"] and state.general_note == data["general_note"]
    state.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data  # no field gained, lost or changed
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_earlier_layouts_fields_become_typed_values():
    retry = RunState.from_dict(_earlier("retry-in-progress.json"))
    assert retry.retry == Retry(round=1, attempt=1, learning_rate=5e-4)
    assert retry.wandb_run_id == "157a0816" and retry.finished is False and retry.speed is None
    finished = RunState.from_dict(_earlier("finished.json"))
    assert finished.finished is True and finished.retry is None
    assert finished.speed["decode"]["ratio"] == _earlier("finished.json")["speed"]["decode"]["ratio"]
    assert [r["round"] for r in finished.rounds] == [1]
    # the card reads the record and the parsed file alike
    config = load_config(None, [])
    assert card_inputs(config, finished, None) == card_inputs(config, _earlier("finished.json"), None)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(finished="yes"), "field 'finished' must be true or false, got 'yes'"),
        (dict(rounds={"1": {}}), "field 'rounds' must be a list of round records"),
        (dict(rounds=[3]), "field 'rounds' must be a list of round records (JSON objects)"),
        (dict(baseline=[1, 2]), "field 'baseline' must be a mapping of metrics, got [1, 2]"),
        (dict(retry={"round": 1}), "field 'retry' must hold exactly round, attempt, learning_rate"),
        (dict(retry={"round": 1, "attempt": "1", "learning_rate": 1e-3}), "field 'retry.attempt' must be"),
        (dict(speeds={}), "unknown field 'speeds'; a run's state has config, rounds, baseline"),
        (dict(config=None), "field 'config' must be a mapping of settings, got None"),
    ],
)
def test_a_malformed_state_file_is_refused_naming_the_file_and_the_field(change, message, tmp_path):
    path = tmp_path / "run" / "state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_earlier("finished.json") | change))
    with pytest.raises(ValueError) as info:
        RunState.load(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert f"Delete {path.parent} (or choose another output_dir) to start over." in str(info.value)


def test_a_state_file_without_its_settings_or_not_json_is_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"rounds": []}))
    with pytest.raises(ValueError, match=r"state.json: field 'config' is missing\. Delete "):
        RunState.load(path)
    path.write_text('{"config": {}, "rounds": [')
    with pytest.raises(ValueError, match=r"state.json is damaged \(not valid JSON"):
        RunState.load(path)
    assert RunState.load(tmp_path / "none.json") is None


def _retry_config(assets: Path | str, **overrides):
    """The settings the run of retry-in-progress.json was started with."""
    settings = tiny_run_settings(
        Path(assets), Path("/out"), num_rounds=1, num_layers_to_remove=0, heal_steps=4, learning_rate=1e-3,
        nan_lr_factor=0.5, report_to="wandb",
    ) | overrides  # fmt: skip
    return load_config(None, [item for k, v in settings.items() for item in (f"--{k}", str(v))])


def test_settings_added_since_a_run_was_written_count_as_their_defaults():
    saved = _earlier("retry-in-progress.json")["config"]
    assert "budget_shares" not in saved["pruning"]  # a setting this file predates
    assert changed_settings(saved, _retry_config("/assets")) == []
    assert changed_settings(
        saved, _retry_config("/assets", target_fraction=0.25, mlp_pruning_percentage=0)
    ) == [
        "mlp_pruning_percentage: 30.0 -> 0.0",
        "target_fraction: 0.0 -> 0.25",
    ]
    assert changed_settings(saved, _retry_config("/assets", lora_r=8)) == ["lora_r: 16 -> 8"]
    assert changed_settings(saved, _retry_config("/assets", seed=1, report_to="none")) == ["seed: 0 -> 1"]
    gone = saved | {"heal": saved["heal"] | {"old_setting": 1}}
    assert changed_settings(gone, _retry_config("/assets")) == ["old_setting: 1 -> (no such setting)"]


def test_a_run_stopped_in_a_retry_resumes_from_a_state_file_of_the_earlier_layout(tmp_path):
    """The run dies in its NaN retry; its state.json is replaced by the earlier version's file of the same
    moment; the rerun goes on with that retry (attempt 1 at half the rate) from checkpoint-2."""
    assets = write_assets(tmp_path / "assets")
    out = tmp_path / "stopped"
    settings = tiny_run_settings(
        assets, out, num_rounds=1, num_layers_to_remove=0, heal_steps=4, learning_rate=1e-3, nan_lr_factor=0.5
    )
    config = load_config(None, [item for k, v in settings.items() for item in (f"--{k}", str(v))])
    with pytest.raises(_Died):
        PruneThenHeal(config, callbacks=[PoisonOnce(), _DieAfterStep3(attempt=1)]).run()
    (out / "state.json").write_text(json.dumps(_earlier("retry-in-progress.json", assets), indent=2))

    steps = _Steps()
    result = PruneThenHeal(config, callbacks=[steps]).run()
    assert steps.begin == [2] and steps.steps == [3, 4]  # the retry's checkpoint, not a fresh attempt
    assert result["rounds"][0]["learning_rate"] == pytest.approx(5e-4)
    assert result["baseline"] == _earlier("retry-in-progress.json")["baseline"]  # read, not re-measured
    state = RunState.load(out / "state.json")
    assert state.finished and state.retry is None and state.wandb_run_id == "157a0816"
