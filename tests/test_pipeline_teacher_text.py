"""``heal_data: teacher``: the pipeline heals on text the unpruned model writes, distilled from the logits
recorded while it wrote; the text and the cache are sampled once and reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import run_cli, tiny_run_settings, write_assets, write_config
from safetensors.torch import load_file

import optipfair_train.heal.teacher_cache as teacher_cache_module
from optipfair_train.pipeline import PruneThenHeal, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("teacher-text-assets"))


def _config(assets: Path, out: Path, **overrides):
    chosen = dict(
        heal_data="teacher", heal_method="kd_lora", kd_top_k=8, num_rounds=1, num_layers_to_remove=0
    )
    settings = tiny_run_settings(assets, out, **{**chosen, **overrides})
    return load_config(None, [item for key, value in settings.items() for item in (f"--{key}", str(value))])


def test_kd_heals_on_the_teacher_text_with_the_logits_it_was_written_with(assets, tmp_path, monkeypatch):
    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("a separate teacher pass ran although sampling had recorded the logits")

    monkeypatch.setattr(teacher_cache_module, "_teacher_topk", no_teacher_pass)
    out = tmp_path / "run"
    result = PruneThenHeal(_config(assets, out)).run()

    (text_file,) = (out / "teacher-cache").glob("text-*.safetensors")
    (topk_file,) = (out / "teacher-cache").glob("topk-*.safetensors")
    text = load_file(str(text_file))["tokens"]
    assert text.shape == (4 * 2, 64)  # heal_steps x batch blocks of heal_seq_len tokens
    assert torch.equal(load_file(str(topk_file))["tokens"], text)
    assert result["rounds"][0]["heal_tokens"] == 4 * 2 * 64
    card = (out / "final" / "README.md").read_text()
    assert "text written by the unpruned model" in card
    assert "(healing domain)" not in card  # the first perplexity is not on the healing text here


@pytest.mark.slow  # a SIGKILL crash point: two CLI subprocess runs
def test_a_run_killed_after_sampling_resumes_on_the_same_text_without_sampling_again(assets, tmp_path):
    out = tmp_path / "run"
    settings = dict(heal_data="teacher", heal_method="lora", num_rounds=1, num_layers_to_remove=0)
    config = write_config(assets, out, **settings)
    killed = run_cli(config, crash_at="teacher-text:1")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (text_file,) = (out / "teacher-cache").glob("text-*.safetensors")
    written = text_file.stat().st_mtime_ns

    resumed = run_cli(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((out / "teacher-cache").glob("text-*.safetensors")) == [text_file]
    assert text_file.stat().st_mtime_ns == written
    assert (out / "final" / "model.safetensors").is_file()


def test_teacher_text_with_sft_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="instruction data"):
        _config(assets, tmp_path / "sft", heal_method="sft")


def test_teacher_written_calibration_text_is_what_pruning_scores_on(assets, tmp_path, monkeypatch):
    import optipfair_train.pipeline.run as run_module

    seen = []
    real_plan = run_module.plan

    def recording_plan(model, requests, calibration=None, **kwargs):
        seen.append(torch.cat([batch["input_ids"] for batch in calibration]))
        return real_plan(model, requests, calibration, **kwargs)

    monkeypatch.setattr(run_module, "plan", recording_plan)
    out = tmp_path / "run"
    config = _config(
        assets, out, calibration_data="teacher", heal_data=str(assets / "text.txt"), heal_method="lora",
        num_calibration_samples=3, calibration_seq_len=32, mlp_pruning_percentage=25,
    )  # fmt: skip
    PruneThenHeal(config).run()

    (text_file,) = (out / "teacher-cache").glob("text-*.safetensors")  # calibration only: one file
    written = load_file(str(text_file))["tokens"]
    assert written.shape == (3, 32)
    assert len(seen) == 1 and torch.equal(seen[0], written.long())
