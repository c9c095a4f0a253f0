"""Every benchmark script's ``--quick`` mode runs on a tiny model and writes its markdown report.

Benchmarks assert nothing about time; this only proves each documented command still works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_char_tokenizer, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OPTIPFAIR_TRAIN_DATA", ROOT.parent / "shared" / "data"))
SCRIPTS = sorted(path.stem for path in (ROOT / "bench").glob("bench_*.py"))
# one quick benchmark in the default suite keeps the shared harness (bench/common.py) covered; every
# script's quick mode runs in the slow set
FAST = "bench_probe_change"
# scripts that write a section of another script's report (bench_a_b.py writes a-b.md otherwise)
REPORTS = {"bench_zeroshot_targets": "zeroshot"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", max_position_embeddings=1024).save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def test_every_benchmark_is_covered():
    assert FAST in SCRIPTS
    assert {"bench_quality", "bench_healing", "bench_iterative", "bench_optipfair", "bench_inference"} <= set(
        SCRIPTS
    )


@pytest.mark.parametrize(
    "script", [s if s == FAST else pytest.param(s, marks=pytest.mark.slow) for s in SCRIPTS]
)
def test_quick_mode_runs_on_a_tiny_model(script, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / f"{script}.py"),
            "--quick",
            "--model-path",
            str(tiny_model_dir),
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = out / f"{REPORTS.get(script, script.removeprefix('bench_').replace('_', '-'))}.md"
    text = report.read_text()
    assert text.startswith("## ") and "|---|" in text
    assert f"Command: `python bench/{script}.py --quick --model-path {tiny_model_dir}" in text
    for image in out.glob("*.png"):
        assert image.stat().st_size > 1000


@pytest.mark.slow
def test_refit_time_compares_the_engine_with_the_pre_engine_commit(tiny_model_dir, tmp_path):
    """``--compare-ref``: the pre-engine prune_model and plan + apply leave bit-identical models, and the
    comparison is added to refit-time.md below what was there."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "refit-time.md").write_text("## Earlier section\n\nkept\n")
    command = [sys.executable, str(ROOT / "bench" / "bench_refit_time.py"), "--quick", "--repeats", "1"]
    command += ["--compare-ref", "a019fd7", "--model-path", str(tiny_model_dir), "--data", str(DATA)]
    done = subprocess.run(
        [*command, "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = (out / "refit-time.md").read_text()
    assert text.startswith("## Earlier section\n\nkept\n\n## plan + apply against the pre-engine prune_model")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "setting" not in line]
    assert len(rows) == 3 and all(row.endswith("| yes |") for row in rows)


def test_a_section_report_replaces_its_own_section_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import Report

    (tmp_path / "shared.md").write_text(
        "## Parity\n\nkept\n\n## Targets\n\nold table\n\n## Later\n\nalso kept\n"
    )
    report = Report("shared", "Targets", tmp_path, section=True)
    report.table(["a"], [[1]])
    report.write()
    text = (tmp_path / "shared.md").read_text()
    assert text.startswith("## Parity\n\nkept\n\n## Targets\n")
    assert "old table" not in text and "| 1 |" in text and text.endswith("\n\n## Later\n\nalso kept\n")
    Report("shared", "New", tmp_path, section=True).write()  # a new title is appended
    assert (tmp_path / "shared.md").read_text().startswith(text.rstrip() + "\n\n## New\n")
