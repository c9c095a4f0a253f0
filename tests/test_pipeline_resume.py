"""SIGKILL `optipfair-train run` at every kind of step, rerun the same command, get the same final model.

The kill comes from the pipeline's test hook (``OPTIPFAIR_TRAIN_CRASH_AT``, see
``optipfair_train.pipeline.faults``), so each run dies at exactly the named point; before rerunning,
each test checks that the folder holds the half-done state that point leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import assert_same_model, leftovers, run_cli, write_assets, write_config

from optipfair_train import load_pruned_model
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.state import COMPLETE_NAME

# a subprocess run per kill point: the slow set (pytest -m slow); tests/test_pipeline.py kills one
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("resume-assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The final model's tensors of one uninterrupted run with the same settings."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = PruneThenHeal(load_config(write_config(assets, out))).run()
    assert not result["already_finished"]
    return {name: t.clone() for name, t in load_pruned_model(out / "final").state_dict().items()}


def _heal_dir(out: Path, k: int) -> Path:
    return out / f"round-{k}" / "heal"


def _checkpoint_marked(out: Path, k: int, step: int) -> bool:
    return (_heal_dir(out, k) / f"checkpoint-{step}" / COMPLETE_NAME).is_file()


def _recorded_rounds(out: Path) -> list[int]:
    return [r["round"] for r in json.loads((out / "state.json").read_text())["rounds"]]


# point -> what the killed run must have left (proof that it died where the name says)
KILL_POINTS = {
    # during healing: after step 3 of round 1, checkpoint-2 complete, nothing of the round finished
    "heal-step:3": lambda out: _checkpoint_marked(out, 1, 2) and not (out / "round-1" / "model").exists(),
    # during the Trainer's write of checkpoint-4: it lacks its record, the complete checkpoint-2 is kept
    "checkpoint-write:2": lambda out: (
        (_heal_dir(out, 1) / "checkpoint-4").is_dir()
        and not _checkpoint_marked(out, 1, 4)
        and _checkpoint_marked(out, 1, 2)
    ),
    # during a model save (round-1/model): weights in the temporary folder, the folder not in place
    "model-save:2": lambda out: (out / "round-1" / ".tmp-model" / "model.safetensors").is_file()
    and not (out / "round-1" / "model").exists(),
    # during the removal of round 1's heal folder: renamed away, not deleted
    "heal-removal:1": lambda out: (out / "round-1" / ".tmp-heal.removed").is_dir()
    and (out / "round-1" / "model").is_dir(),
    # between rounds: round 1 finished and recorded, round 2 not started
    "between-rounds:1": lambda out: _recorded_rounds(out) == [1] and not (out / "round-2").exists(),
    # between saving round 2's pruned weights and its events: weights written, events.json not
    "model-save:3": lambda out: (out / "round-2" / ".tmp-pruned" / "model.safetensors").is_file()
    and not (out / "round-2" / ".tmp-pruned" / "events.json").exists()
    and not (out / "round-2" / "pruned").exists(),
    # during the final card's writing: weights copied to the temporary final folder, no card
    "card-write": lambda out: (out / ".tmp-final" / "model.safetensors").is_file()
    and not (out / ".tmp-final" / "README.md").exists()
    and not (out / "final").exists(),
    # after the final folder, before report.html: the rerun writes the report and keeps the speed measured
    "report-write": lambda out: (out / "final" / "README.md").is_file()
    and not (out / "report.html").exists()
    and "speed" in json.loads((out / "state.json").read_text()),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_reaches_the_uninterrupted_model(point, assets, reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(assets, out)
    killed = run_cli(config, crash_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert KILL_POINTS[point](out), sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    resumed = run_cli(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing was redone" not in resumed.stdout
    assert_same_model(out / "final", reference)
    state = json.loads((out / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2] and state["finished"] is True
    assert leftovers(out) == []
    assert not _heal_dir(out, 1).exists() and not _heal_dir(out, 2).exists()
    manifest = json.loads((out / "final" / "pruning_manifest.json").read_text())
    assert manifest["base_model"] == str(assets / "model")  # not round-K/pruned after a resume
    assert "base_model: " + str(assets / "model") in (out / "final" / "README.md").read_text()
    if point == "checkpoint-write:2":
        assert "checkpoint-4" in resumed.stderr and COMPLETE_NAME in resumed.stderr  # reported, skipped
