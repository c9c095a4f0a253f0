"""With ``report_to: tensorboard`` the healing event files survive the round (``round-K/heal`` does not)."""

from __future__ import annotations

from pathlib import Path

from pipeline_helpers import tiny_run_settings, write_assets

from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.healing import tensorboard_dir


def test_tensorboard_events_land_in_output_runs_and_survive_the_round(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)

    assets = write_assets(tmp_path / "assets")
    out = tmp_path / "run"
    settings = tiny_run_settings(
        assets, out, report_to="tensorboard", num_rounds=1, num_layers_to_remove=0, heal_steps=2
    )
    PruneThenHeal(load_config(None, [i for k, v in settings.items() for i in (f"--{k}", str(v))])).run()

    assert not (out / "round-1" / "heal").exists()  # deleted when the round finished
    events = list((out / "runs" / "round-1").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]


def test_tensorboard_dir_honours_the_users_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert tensorboard_dir(Path("out/round-2")) == Path("out/runs/round-2")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert tensorboard_dir(Path("out/round-2")) == tmp_path / "tb" / "round-2"
