"""A pipeline run that dies mid-heal resumes from its last complete checkpoint to the uninterrupted model.

The fast variants for the default suite: the run is stopped in-process (an exception from a Trainer
callback after step 3, past checkpoint-2), also inside a NaN retry, and rerun in the same process. The
SIGKILL variants, at every kind of step and through the CLI, are in the slow set
(tests/test_pipeline_resume.py, tests/test_pipeline.py, tests/test_pipeline_checks.py).
"""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import PoisonOnce, assert_same_model, leftovers, tiny_run_settings, write_assets
from transformers import TrainerCallback

from optipfair_train.pipeline import PruneThenHeal, load_config


class _Died(Exception):
    """Stands for the process dying: nothing in the pipeline catches it."""


class _Steps(TrainerCallback):
    """The optimizer steps a healing Trainer starts from and runs."""

    def __init__(self):
        self.begin, self.steps = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin.append(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class _DieAfterStep3(TrainerCallback):
    """Dies after step 3 of the ``attempt``-th healing Trainer (attempt 1: the retry after a NaN)."""

    def __init__(self, attempt: int = 0):
        self.attempt, self.trainers = attempt, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainers += 1

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3 and self.trainers == self.attempt:
            raise _Died


def _config(assets, out, **overrides):
    settings = tiny_run_settings(assets, out, num_rounds=1, num_layers_to_remove=0, heal_steps=4, **overrides)
    return load_config(None, [item for k, v in settings.items() for item in (f"--{k}", str(v))])


def test_a_run_stopped_mid_heal_resumes_to_the_uninterrupted_model(tmp_path):
    assets = write_assets(tmp_path / "assets")
    out = tmp_path / "stopped"
    with pytest.raises(_Died):
        PruneThenHeal(_config(assets, out), callbacks=[_DieAfterStep3()]).run()
    assert (out / "round-1" / "heal" / "checkpoint-2").is_dir()
    assert not (out / "round-1" / "heal" / "checkpoint-4").exists()
    assert json.loads((out / "state.json").read_text())["rounds"] == []

    steps = _Steps()
    resumed = PruneThenHeal(_config(assets, out), callbacks=[steps]).run()
    assert steps.begin == [2] and steps.steps == [3, 4]  # from checkpoint-2, not from the start
    reference = PruneThenHeal(_config(assets, tmp_path / "straight")).run()
    assert_same_model(out / "final", reference["model"].state_dict())
    assert [r["round"] for r in resumed["rounds"]] == [1]
    assert leftovers(out) == []


def test_a_run_stopped_in_a_nan_retry_resumes_the_retry_at_its_learning_rate(tmp_path):
    """Attempt 0 diverges (NaN after step 2), attempt 1 runs at half the rate and dies after its step 3;
    the rerun goes on with attempt 1 from its checkpoint-2, as the uninterrupted run does."""
    assets = write_assets(tmp_path / "assets")
    settings = dict(learning_rate=1e-3, nan_lr_factor=0.5)
    reference = PruneThenHeal(
        _config(assets, tmp_path / "straight", **settings), callbacks=[PoisonOnce()]
    ).run()
    assert reference["rounds"][0]["learning_rate"] == pytest.approx(5e-4)

    out = tmp_path / "stopped"
    with pytest.raises(_Died):
        PruneThenHeal(
            _config(assets, out, **settings), callbacks=[PoisonOnce(), _DieAfterStep3(attempt=1)]
        ).run()
    state = json.loads((out / "state.json").read_text())
    assert state["retry"] == {"round": 1, "attempt": 1, "learning_rate": pytest.approx(5e-4)}

    steps = _Steps()
    PruneThenHeal(_config(assets, out, **settings), callbacks=[steps]).run()
    assert steps.begin == [2] and steps.steps == [3, 4]
    state = json.loads((out / "state.json").read_text())
    assert state["rounds"][0]["learning_rate"] == pytest.approx(5e-4) and "retry" not in state
    assert_same_model(out / "final", reference["model"].state_dict())
