"""A peer library's own venv and a worker process in it: how the side-by-side benchmarks run OptiPFair
and Torch-Pruning without making either a dependency of the package.

:func:`ensure_venv` creates (once) a venv that sees this interpreter's site-packages through a ``.pth``
file appended AFTER the venv's own, so pip finds torch, transformers, numpy... already installed and adds
only the peer library and what it lacks (its own copies when the peer's pins would not accept ours).
:class:`JsonWorker` runs a worker script with that venv's python, one JSON command per line on stdin,
one JSON answer per line back.

Example:
    >>> python, seconds = ensure_venv(venv, "torch-pruning==1.6.1", probe="import torch_pruning")  # doctest: +SKIP
    >>> worker = JsonWorker(python, Path("/tmp/w"), source, "torch-pruning"); worker("load", model=folder)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

PTH_NAME = "_optipfair_train_bench_parent.pth"


def parent_site_packages() -> list[str]:
    """This interpreter's site-packages folders (what a peer venv sees after its own)."""
    paths = [*site.getsitepackages(), site.getusersitepackages() if site.ENABLE_USER_SITE else ""]
    return [p for p in dict.fromkeys(paths) if p and Path(p).is_dir()]


def _probe(python: Path, probe: str) -> bool:
    """True when ``python`` runs our Python version and ``probe`` (import checks) succeeds there."""
    if not python.is_file():
        return False
    check = f"import sys\nassert sys.version_info[:2] == {tuple(sys.version_info[:2])}\n{probe}\n"
    return subprocess.run([str(python), "-c", check], capture_output=True, text=True).returncode == 0


def ensure_venv(venv: Path, requirement: str, *, probe: str) -> tuple[Path, float | None]:
    """The python of a venv where ``requirement`` is installed, creating the venv (once) when needed.

    ``probe``: Python statements that succeed only when the venv is usable (version asserts, imports).
    Returns ``(python, install seconds, or None when it was already there)``; exits with a clear
    message when the install fails (no network?). Two runs at once: the second waits, then finds it.
    """
    venv = venv.expanduser().resolve()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        created = False
        if python.is_file():
            _write_pth(python)  # this interpreter's site-packages may have moved since the venv was made
            if _probe(python, probe):
                return python, None
        start = time.perf_counter()
        print(f"Installing {requirement} into {venv} (once; needs PyPI) ...", flush=True)
        if not python.is_file():
            _run_or_exit(
                [sys.executable, "-m", "venv", "--without-pip", str(venv)], venv, requirement, "create it"
            )
            created = True
            _write_pth(python)
        pip = [sys.executable, "-m", "pip", "--python", str(python)]  # pip >= 22.3 in this interpreter
        if subprocess.run([*pip, "--version"], capture_output=True).returncode:
            _run_or_exit(
                [str(python), "-m", "ensurepip"], venv, requirement, "bootstrap pip", cleanup=created
            )
            pip = [str(python), "-m", "pip"]
        _run_or_exit(
            [*pip, "install", "--disable-pip-version-check", "--no-input", requirement],
            venv,
            requirement,
            "pip install",
            cleanup=created,
        )
        if not _probe(python, probe):
            raise SystemExit(
                f"{requirement} was installed into {venv} but does not import; remove the folder."
            )
        return python, time.perf_counter() - start


def _write_pth(python: Path) -> None:
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / PTH_NAME).write_text("\n".join(parent_site_packages()) + "\n")


def _run_or_exit(command: list[str], venv: Path, requirement: str, what: str, cleanup: bool = False) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        if cleanup:
            shutil.rmtree(venv, ignore_errors=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(
            f"Could not {what} for {requirement} in {venv} (exit code {done.returncode}). Installing it "
            f"needs PyPI: without network this benchmark cannot run; with a venv that has {requirement} "
            f"already, pass its folder with the benchmark's venv flag.\n{tail}"
        )


# The worker side of the protocol, around each worker's source: the answers go to the original stdout,
# everything the peer library prints to stderr (the log); the source defines OPS = {name: function}.
WORKER_PRELUDE = """import json, os, sys, traceback

protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

"""
WORKER_LOOP = """

for line in sys.stdin:
    command = json.loads(line)
    op = command.pop("op")
    if op == "quit":
        break
    try:
        answer = OPS[op](**command)
    except Exception:
        answer = {"error": traceback.format_exc()}
    protocol.write(json.dumps(answer) + "\\n")
"""


class JsonWorker:
    """A worker process with a peer venv's python running ``source``, answering JSON commands.

    ``source`` defines ``OPS`` (op name -> function of the command's fields); :data:`WORKER_PRELUDE` and
    :data:`WORKER_LOOP` around it make the script, which reads one ``{"op": ..., **fields}`` line per command and writes one JSON answer line
    (``{"error": traceback}`` on failure); what the peer library prints goes to ``<name>_worker.log``.
    """

    def __init__(self, python: Path, tmp: Path, source: str, name: str):
        self.name = name
        script = tmp / f"{name}_worker.py"
        script.write_text(WORKER_PRELUDE + source + WORKER_LOOP)
        self.log_path = tmp / f"{name}_worker.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the worker sees the peer's venv and our site-packages, not the repo
        self.proc = subprocess.Popen(
            [str(python), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=tmp,
        )

    def __call__(self, op: str, **fields) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"The {self.name} worker died during {op!r}; end of its log:\n{self._tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"The {self.name} side failed in {op!r}:\n{answer['error']}")
        return answer

    def _tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
