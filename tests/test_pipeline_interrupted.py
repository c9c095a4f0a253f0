"""A pipeline run that dies mid-heal resumes from its last complete checkpoint to the uninterrupted model.

The fast variant for the default suite: the run is stopped in-process (an exception from a Trainer
callback after step 3, past checkpoint-2) and rerun in the same process. The SIGKILL variants, at every
kind of step and through the CLI, are in the slow set (tests/test_pipeline_resume.py, tests/test_pipeline.py).
"""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import assert_same_model, leftovers, tiny_run_settings, write_assets
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
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise _Died


def _config(assets, out):
    settings = tiny_run_settings(assets, out, num_rounds=1, num_layers_to_remove=0, heal_steps=4)
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
