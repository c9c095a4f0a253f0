"""The OptiPFair 0.4.2 side of ``bench_optipfair.py``: its separate venv and the worker process.

OptiPFair is never a dependency of the package: :func:`ensure_optipfair` creates (once) a venv that sees
this interpreter's site-packages through a ``.pth`` file and adds ``optipfair[viz]==0.4.2``;
:class:`Worker` runs OptiPFair there on the same model folder, answering one JSON command per line.
:func:`kept_neurons` recovers which neurons a pruned GLU MLP kept; both sides run the same function.

Example:
    >>> python, seconds = ensure_optipfair(default_venv())  # doctest: +SKIP
    >>> worker = Worker(python, Path("/tmp/w")); worker("load", model=folder)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from optipfair_train.models import default_cache_dir

OPTIPFAIR_VERSION = "0.4.2"
REQUIREMENT = f"optipfair[viz]=={OPTIPFAIR_VERSION}"  # viz: seaborn and scikit-learn, for visualize_bias
FIGURE_TYPES = ("mean_diff", "heatmap", "pca")
# OptiPFair draws mean_diff and heatmap figures for these four components (PCA for the first two only)
FIGURE_COMPONENTS = ("mlp_output", "attention_output", "gate_proj", "up_proj")
PTH_NAME = "_optipfair_train_bench_parent.pth"
VERSION_PACKAGES = ("torch", "transformers", "numpy", "matplotlib", "seaborn", "scikit-learn")


def kept_neurons(original_mlp, pruned_mlp) -> list[int]:
    """Indices of the intermediate neurons a pruned GLU MLP kept, recovered from its weights.

    Each kept neuron's gate and up rows must equal one original neuron's rows, and the down columns must
    follow; anything else (a rescaled or merged neuron) raises.
    """
    import torch

    def rows(mlp):
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1).detach().float().contiguous()

    index = {row.numpy().tobytes(): i for i, row in enumerate(rows(original_mlp))}
    kept = [index.get(row.numpy().tobytes(), -1) for row in rows(pruned_mlp)]
    if -1 in kept or len(set(kept)) != len(kept):
        raise ValueError("a pruned neuron's gate/up rows match no original neuron")
    if not torch.equal(original_mlp.down_proj.weight[:, kept], pruned_mlp.down_proj.weight):
        raise ValueError("the pruned down_proj columns are not the kept neurons' columns")
    return kept


# The OptiPFair side: reads one JSON command per line on stdin, answers one JSON line on the original
# stdout (everything the library prints or logs goes to stderr, i.e. the log file).
WORKER_BODY = textwrap.dedent(
    """
    import copy, importlib.metadata, json, os, sys, time, traceback
    from pathlib import Path

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optipfair
    from optipfair import prune_model

    state = {}


    def layers(model):
        return model.model.layers


    def parameters(model):
        return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


    def versions(names):
        out = {}
        for name in names:
            try:
                dist = importlib.metadata.distribution(name)
                out[name] = {"version": dist.version, "location": str(Path(dist.locate_file("")).resolve())}
            except importlib.metadata.PackageNotFoundError:
                out[name] = {"version": "not installed", "location": ""}
        return out


    def op_load(model, threads, calibration, packages):
        if threads:
            torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        state.update(
            base=base,
            tokenizer=AutoTokenizer.from_pretrained(model),
            calibration=torch.load(calibration, weights_only=True),
        )
        checksum = sum(float(p.detach().double().sum()) for p in base.parameters())
        return {
            "parameters": parameters(base),
            "checksum": checksum,
            "threads": torch.get_num_threads(),
            "python": sys.executable,
            "sys_path": sys.path,
            "versions": versions(["optipfair", *packages]),
        }


    def op_warmup():
        with torch.no_grad():
            state["base"](**state["calibration"][0], use_cache=False)
        return {}


    def op_prune(method, percentage, data_driven, kept, save):
        model = copy.deepcopy(state["base"])
        start = time.perf_counter()
        prune_model(
            model,
            pruning_type="MLP_GLU",
            neuron_selection_method=method,
            pruning_percentage=percentage,
            dataloader=state["calibration"] if data_driven else None,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "parameters": parameters(model)}
        if kept:
            base = layers(state["base"])
            out["kept"] = [kept_neurons(base[i].mlp, layer.mlp) for i, layer in enumerate(layers(model))]
        if save:
            model.save_pretrained(save)
        return out


    def op_visualize(pair, types, out):
        import matplotlib.pyplot as plt
        from optipfair.bias import visualize_bias

        start = time.perf_counter()
        _, metrics = visualize_bias(
            state["base"], state["tokenizer"], [tuple(pair)], visualization_types=types,
            layers="first_middle_last", output_dir=out, figure_format="png", show_progress=False,
        )
        seconds = time.perf_counter() - start
        plt.close("all")
        overall = metrics.get("pair_1", {}).get("metrics", {}).get("overall_metrics", {})
        return {
            "seconds": seconds,
            "figures": [f.stat().st_size for f in Path(out).glob("*.png")],
            "mean_difference": overall.get("mean_difference"),
        }


    OPS = {"load": op_load, "warmup": op_warmup, "prune": op_prune, "visualize": op_visualize}
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
)


def worker_source() -> str:
    return "import torch\n\n\n" + inspect.getsource(kept_neurons) + WORKER_BODY


def default_venv() -> Path:
    return default_cache_dir() / f"bench-optipfair-{OPTIPFAIR_VERSION}"


def parent_site_packages() -> list[str]:
    paths = [*site.getsitepackages(), site.getusersitepackages() if site.ENABLE_USER_SITE else ""]
    return [p for p in dict.fromkeys(paths) if p and Path(p).is_dir()]


def _probe(python: Path) -> bool:
    """True when ``python`` runs our Python version and imports OptiPFair 0.4.2 with its viz extras."""
    if not python.is_file():
        return False
    check = (
        "import sys, importlib.metadata as m\n"
        f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}\n"
        f"assert m.version('optipfair') == {OPTIPFAIR_VERSION!r}\n"
        "import optipfair, torch, transformers, seaborn, sklearn\n"
    )
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    return done.returncode == 0


def ensure_optipfair(venv: Path) -> tuple[Path, float | None]:
    """The python of a venv with OptiPFair 0.4.2, creating it (once) when needed.

    The venv is created without pip; a ``.pth`` file appends this interpreter's site-packages AFTER the
    venv's own, so pip sees torch, transformers, numpy... as installed and adds only what is missing (its
    own copies when OptiPFair's pins would not accept ours). Returns ``(python, install seconds or None
    when it was already there)``; exits with a clear message when the install fails (no network?).
    """
    venv = venv.expanduser().resolve()
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits, then finds it installed
        created = False
        if python.is_file():
            _write_pth(python)  # this interpreter's site-packages may have moved since the venv was made
            if _probe(python):
                return python, None
        start = time.perf_counter()
        print(f"Installing {REQUIREMENT} into {venv} (once; needs PyPI) ...", flush=True)
        if not python.is_file():
            _run_or_exit([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv, "create the venv")
            created = True
            _write_pth(python)
        pip = [sys.executable, "-m", "pip", "--python", str(python)]  # pip >= 22.3 in this interpreter
        if subprocess.run([*pip, "--version"], capture_output=True).returncode:
            _run_or_exit([str(python), "-m", "ensurepip"], venv, "bootstrap pip", cleanup=created)
            pip = [str(python), "-m", "pip"]
        _run_or_exit(
            [*pip, "install", "--disable-pip-version-check", "--no-input", REQUIREMENT],
            venv,
            f"pip install {REQUIREMENT}",
            cleanup=created,
        )
        if not _probe(python):
            raise SystemExit(
                f"{REQUIREMENT} was installed into {venv} but does not import; remove the folder."
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


def _run_or_exit(command: list[str], venv: Path, what: str, cleanup: bool = False) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        if cleanup:
            shutil.rmtree(venv, ignore_errors=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(
            f"Could not {what} for the OptiPFair comparison in {venv} (exit code {done.returncode}). "
            f"Installing OptiPFair needs PyPI: without network this benchmark cannot run; with a venv "
            f"that has {REQUIREMENT} already, pass --optipfair-venv DIR.\n{tail}"
        )


class Worker:
    """The OptiPFair side: one process with the separate venv's python, answering JSON commands."""

    def __init__(self, python: Path, tmp: Path):
        script = tmp / "optipfair_worker.py"
        script.write_text(worker_source())
        self.log_path = tmp / "optipfair_worker.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the worker sees OptiPFair's venv and our site-packages, not the repo
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
            raise SystemExit(f"The OptiPFair worker died during {op!r}; end of its log:\n{self._tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"The OptiPFair side failed in {op!r}:\n{answer['error']}")
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
