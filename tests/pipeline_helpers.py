"""Helpers for the pipeline's crash and pre-flight tests: a tiny model on disk, YAML configs, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import make_char_tokenizer, make_tiny_model
from transformers import TrainerCallback

from optipfair_train import load_pruned_model
from optipfair_train.pipeline.faults import CRASH_ENV

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def write_assets(root: Path) -> Path:
    """A tiny LLaMA-style model (4 layers, width 128, 2 KV groups) with its tokenizer, and a text file."""
    model = make_tiny_model("llama")
    model.save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    text = WIKITEXT.read_text()[:40_000] if WIKITEXT.exists() else "A small example sentence. " * 2000
    (root / "text.txt").write_text(text)
    return root


def tiny_run_settings(assets: Path, out: Path, **overrides) -> dict:
    """Settings of a two-round run into ``out``: width and depth, LoRA, 4 steps, checkpoints every 2."""
    settings = dict(
        model_path=str(assets / "model"),
        calibration_data=str(assets / "text.txt"),
        heal_data=str(assets / "text.txt"),
        eval_data=str(assets / "text.txt"),
        num_calibration_samples=2,
        calibration_seq_len=64,
        heal_seq_len=64,
        eval_tokens=256,
        eval_seq_len=128,
        num_rounds=2,
        mlp_pruning_percentage=30,
        num_layers_to_remove=1,
        heal_steps=4,
        per_device_batch_size=2,
        save_steps=2,
        output_dir=str(out),
        report_to="none",
        show_progress=False,
        stereoset_data="",  # StereoSet at every stage: tests/test_pipeline_report.py, on a few items
        zeroshot_tasks="",  # zero-shot accuracy at every stage: tests/test_zeroshot_pipeline.py
    )
    settings.update(overrides)
    return settings


def write_config(assets: Path, out: Path, **overrides) -> Path:
    """A YAML config of :func:`tiny_run_settings` next to ``out``."""
    settings = tiny_run_settings(assets, out, **overrides)
    path = out.with_name(out.name + ".yaml")
    path.write_text(yaml.safe_dump(settings))
    return path


def run_cli(config: Path, crash_at: str | None = None, *flags: str) -> subprocess.CompletedProcess:
    """``optipfair-train run --config CONFIG`` in a subprocess; ``crash_at`` sets the crash test hook."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "optipfair_train.cli", "run", "--config", str(config), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_same_model(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model saved in ``folder`` equals ``reference`` exactly."""
    state = load_pruned_model(folder).state_dict()
    assert list(state) == list(reference)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def leftovers(out: Path) -> list[Path]:
    """Temporary files or folders anywhere under ``out`` (a finished resume leaves none)."""
    return sorted(p for p in out.rglob(".tmp-*"))


class PoisonOnce(TrainerCallback):
    """Makes the weights NaN after the second step of the first healing attempt (a divergence)."""

    def __init__(self):
        self.fired = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2 and not self.fired:
            self.fired = True
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


POISONED_ENTRY = """
import sys
sys.path.insert(0, "tests")
from pipeline_helpers import PoisonOnce
from optipfair_train.pipeline import PruneThenHeal, load_config

PruneThenHeal(load_config(sys.argv[1]), callbacks=[PoisonOnce()]).run()
"""


def run_poisoned(config: Path, crash_at: str) -> subprocess.CompletedProcess:
    """Run the pipeline with :class:`PoisonOnce` in a subprocess, killed at ``crash_at``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: crash_at}
    return subprocess.run(
        [sys.executable, "-c", POISONED_ENTRY, str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
