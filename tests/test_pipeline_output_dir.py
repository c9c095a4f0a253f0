"""One run at a time per output folder (a lock, refused at once naming the other process), and a finished
run whose ``final/`` was deleted rebuilds it on rerun."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_helpers import ROOT, assert_same_model, leftovers, run_cli, write_assets, write_config

from optipfair_train import load_pruned_model
from optipfair_train.cli import main
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.lock import LOCK_NAME, OutputGuard, OutputInUseError, OutputLock
from optipfair_train.pipeline.state import COMPLETE_NAME

HOLDER = """
import sys
from pathlib import Path
from optipfair_train.pipeline.lock import OutputLock

lock = OutputLock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()  # held until the test closes stdin or kills this process
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("output-dir-assets"))


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_second_run_is_refused_at_once_and_a_killed_holder_does_not_block(assets, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(assets, out)
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = (line.strip() for line in iter(holder.stdout.readline, ""))
        assert "locked" in lines  # lines before it: import chatter; EOF (a failed holder) ends the search
        before = _files(out)
        assert list(before) == [LOCK_NAME]
        assert main(["run", "--config", str(config)]) == 2
        error = capsys.readouterr().err
        assert f"error: {out} is in use by another optipfair-train run (pid {holder.pid} on " in error
        assert socket.gethostname() in error
        assert _files(out) == before  # nothing written, not even the lock file
        with pytest.raises(OutputInUseError):
            OutputLock(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputLock(out).release()  # the kernel dropped the killed holder's lock: the next run may go


class _Ranks:
    """What OutputGuard reads of accelerate's PartialState, for one rank of a two-process run."""

    num_processes = 2

    def __init__(self, main: bool):
        self.is_main_process = main


@pytest.mark.parametrize("main_process", [True, False])
def test_every_rank_takes_part_in_the_lock_exactly_once(tmp_path, monkeypatch, main_process):
    """Ranks may see an existing folder at different moments: none locks early, each joins the one
    broadcast of the main process's answer when the folder is opened (a second one would hang)."""
    broadcasts = []
    monkeypatch.setattr(
        "accelerate.utils.broadcast_object_list", lambda objects: broadcasts.append(objects) or objects
    )
    with OutputGuard(tmp_path, _Ranks(main_process)) as guard:
        guard.lock(early=True)
        assert broadcasts == []
        guard.lock()
        guard.lock()
        assert broadcasts == [[None]] and (guard.held is not None) == main_process
        if main_process:
            with pytest.raises(OutputInUseError):
                OutputLock(tmp_path)
    OutputLock(tmp_path).release()  # released when the run ends


def test_a_finished_run_whose_final_folder_was_deleted_rebuilds_it(assets, tmp_path, capsys):
    out = tmp_path / "done"
    config = write_config(assets, out, num_rounds=1, heal_method="none", num_layers_to_remove=0)
    PruneThenHeal(load_config(config)).run()
    final = out / "final"
    card = (final / "README.md").read_text()
    last = load_pruned_model(out / "round-1" / "model").state_dict()

    weights = final / "model.safetensors"  # damaged: named, with what to delete; nothing is replaced
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["run", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"error: {weights} was changed or truncated" in error and f"Delete {final} and rerun" in error
    assert weights.stat().st_size == 1000

    shutil.rmtree(final)
    result = PruneThenHeal(load_config(config)).run()
    assert not result["already_finished"]
    assert_same_model(final, last)
    assert (final / "README.md").read_text() == card
    assert leftovers(out) == []
    assert PruneThenHeal(load_config(config)).run()["already_finished"]


def test_a_full_disk_while_healing_is_named_and_nothing_half_written_is_kept(
    assets, tmp_path, capsys, monkeypatch
):
    """torch reports a full disk as ``[enforce fail at inline_container.cc:672] . unexpected pos``."""
    out = tmp_path / "full"
    config = write_config(assets, out, num_rounds=1, num_layers_to_remove=0)
    save = torch.save

    def fail_on_optimizer(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_on_optimizer)
    assert main(["run", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"error: [Errno 28] No space left on device at {out} (RuntimeError: [enforce fail at" in error
    checkpoint = out / "round-1" / "heal" / "checkpoint-2"
    assert checkpoint.is_dir() and not (checkpoint / COMPLETE_NAME).exists()  # never resumed from
    assert not (out / "round-1" / "model").exists() and leftovers(out) == []


@pytest.mark.slow
def test_two_cli_runs_on_one_folder_one_is_refused(assets, tmp_path):
    """Two real `optipfair-train run` processes: the second starts while the first heals."""
    out = tmp_path / "run"
    config = write_config(assets, out, heal_steps=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "optipfair_train.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "round-1" / "pruned").is_dir():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    second = run_cli(config)
    assert second.returncode == 2
    assert f"{out} is in use by another optipfair-train run (pid {first.pid} on" in second.stderr
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert load_pruned_model(out / "final") is not None and leftovers(out) == []


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse flock (ENOLCK): the run goes on and says it is unguarded."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="optipfair_train.pipeline.lock"):
        OutputLock(tmp_path).release()
    assert f"Cannot lock {tmp_path} ([Errno {errno.ENOLCK}] No locks available)" in caplog.text
