"""Side by side with OptiPFair 0.4.2: pruning speed, data-driven quality, bias figures and kept neurons.

Writes ``<out>/optipfair.md`` (and prints it). OptiPFair is never a dependency of the package: the first
run creates a separate venv (``--optipfair-venv``, default ``~/.cache/optipfair_train/bench-optipfair-0.4.2``)
that sees this interpreter's site-packages through a ``.pth`` file, so pip reuses torch and transformers
and only adds ``optipfair[viz]==0.4.2`` and what it lacks (30-50 s once; needs PyPI). OptiPFair then runs in a
worker process with that venv's python, on the same model folder and the same calibration batches
(``torch.save``), answering JSON commands. Timings are taken inside each process (no start-up, no model
loading, no copying), after one warm-up forward pass on each side, alternating which side goes first;
medians over ``--repeats`` (3; quick 1). Measured:

1. MLP width pruning -20% with MAW (full mode: also VOW and PON), both sides;
2. data-driven pruning on the same calibration batches: OptiPFair's hybrid (PPM weights x down_proj input
   norms) vs our ``activation`` scorer (different scores); WikiText-2 test perplexity of the MAW and the
   data-driven models of both sides;
3. one ``visualize_bias`` pair with the same figure types (full: mean_diff, heatmap, pca; quick: mean_diff)
   and OptiPFair's components, PNG at OptiPFair's 300 dpi, into temporary folders;
4. kept-neuron agreement: for every layer, the set of neurons each side kept (recovered from the pruned
   weights) for MAW (full mode: VOW and PON too).

Usage:
    python bench/bench_optipfair.py --quick --threads 1    # ~2 min on the demo model (+ ~30-50 s install once)
    python bench/bench_optipfair.py --threads 1            # ~10 min
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import inspect
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from common import Report, base_parser, load_workload, measure, setup

from optipfair_train import count_parameters, prune_model
from optipfair_train.bias import DEFAULT_PROMPT_PAIRS, visualize_bias
from optipfair_train.models import default_cache_dir, demo_model_dir

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


def _parent_site_packages() -> list[str]:
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
    (Path(purelib) / PTH_NAME).write_text("\n".join(_parent_site_packages()) + "\n")


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


def model_folder(model_path: str) -> str:
    """The folder (or hub name) both sides load: the demo model's converted folder for 'demo'."""
    if model_path == "demo":
        return str(demo_model_dir())
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.is_dir() else model_path


@dataclass
class Task:
    """One pruning to time on both sides; ``quality``: also score both pruned models' perplexity."""

    label: str
    ours_method: str
    their_method: str
    data_driven: bool
    quality: bool
    ours_name: str = ""
    their_name: str = ""


def pruning_tasks(weight_methods: list[str], pct: float) -> list[Task]:
    tasks = [
        Task(m, m, m, False, m == "MAW", f"ours `{m}`, -{pct:g}%", f"OptiPFair `{m}`, -{pct:g}%")
        for m in weight_methods
    ]
    tasks.append(
        Task(
            "data-driven",
            "activation",
            "MAW",
            True,
            True,
            f"ours `activation` (root of summed squared down_proj inputs x W_down column norm), -{pct:g}%",
            f"OptiPFair data-driven `MAW` (PPM of gate/up/down x down_proj input norm), -{pct:g}%",
        )
    )
    return tasks


def _quality_row(name: str, model: torch.nn.Module, work) -> list[str]:
    metrics = measure(model, work, crows=False)
    return [name, f"{metrics['parameters']:,}", f"{metrics['perplexity']:.2f}"]


def run_ours(
    task: Task, work, calib: list, pct: float, first: bool
) -> tuple[float, list | None, list | None]:
    """Time our prune of a copy of the base; on the first run also return kept neurons (and quality)."""
    model = copy.deepcopy(work.model)
    start = time.perf_counter()
    prune_model(
        model,
        pruning_type="MLP_GLU",
        neuron_selection_method=task.ours_method,
        pruning_percentage=pct,
        dataloader=calib if task.data_driven else None,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    if not first:
        return seconds, None, None
    kept = [
        kept_neurons(b.mlp, p.mlp) for b, p in zip(work.model.model.layers, model.model.layers, strict=True)
    ]
    return seconds, kept, _quality_row(task.ours_name, model, work) if task.quality else None


def run_theirs(
    task: Task, worker: Worker, work, pct: float, tmp: Path, first: bool
) -> tuple[float, list | None, list | None]:
    """The same on the OptiPFair side; its pruned model comes back through ``save_pretrained``."""
    save = tmp / f"optipfair-{task.label}" if first and task.quality else None
    answer = worker(
        "prune",
        method=task.their_method,
        percentage=pct,
        data_driven=task.data_driven,
        kept=first,
        save=str(save) if save else None,
    )
    if not first:
        return answer["seconds"], None, None
    row = None
    if save:
        from transformers import AutoModelForCausalLM

        row = _quality_row(
            task.their_name, AutoModelForCausalLM.from_pretrained(save, dtype=torch.float32).eval(), work
        )
        shutil.rmtree(save)
    return answer["seconds"], answer["kept"], row


def run_visualize(
    side: str, worker: Worker, work, figure_types: list[str], out: Path
) -> tuple[float, list[int], float]:
    """One ``visualize_bias`` call: seconds, sizes of the PNG files written, overall mean |difference|."""
    pair = DEFAULT_PROMPT_PAIRS[0]
    if side == "optipfair":
        answer = worker("visualize", pair=list(pair), types=figure_types, out=str(out))
        return answer["seconds"], answer["figures"], answer["mean_difference"]
    start = time.perf_counter()
    _, metrics = visualize_bias(
        work.model, work.tokenizer, [pair], figure_types, layers="first_middle_last", output_dir=out,
        show_progress=False, components=FIGURE_COMPONENTS, dpi=300,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    overall = metrics["pair_1"]["metrics"]["overall_metrics"]
    return seconds, [f.stat().st_size for f in out.glob("*.png")], overall.get("mean_difference")


def _order(i: int) -> list[str]:
    return ["ours", "optipfair"] if i % 2 == 0 else ["optipfair", "ours"]


def _seconds(values: list[float]) -> str:
    median = statistics.median(values)
    return f"{median:.3f}" if len(values) == 1 else f"{median:.3f} (n={len(values)})"


def _pngs(sizes: list[int]) -> str:
    return f"{len(sizes)}, {sum(sizes) / 1e6:.1f} MB"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _versions_here() -> dict[str, str]:
    out = {}
    for name in ("optipfair-train", *VERSION_PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _agreement_row(name: str, ours: list[list[int]], theirs: list[list[int]], overlap: bool = False) -> list:
    identical = [set(a) == set(b) for a, b in zip(ours, theirs, strict=True)]
    differing = [str(i) for i, same in enumerate(identical) if not same]
    if overlap:
        mean = statistics.mean(len(set(a) & set(b)) / len(a) for a, b in zip(ours, theirs, strict=True))
        detail = f"mean kept-set overlap {100 * mean:.1f}%"
    else:
        detail = ", ".join(differing[:10]) + (" ..." if len(differing) > 10 else "") or "none"
    return [
        name,
        len(identical),
        f"{sum(identical)} ({100 * sum(identical) / len(identical):.1f}%)",
        detail,
        sum(len(set(a) - set(b)) for a, b in zip(ours, theirs, strict=True)),
    ]


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--optipfair-venv",
        type=Path,
        default=None,
        help=f"venv for OptiPFair (created once; default {default_venv()})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3; quick 1)")
    parser.add_argument("--percentage", type=float, default=20.0, help="MLP neurons removed per layer (%%)")
    parser.add_argument(
        "--figure-types",
        default=None,
        help="visualize_bias types, comma-separated, or 'none' (default mean_diff,heatmap,pca; quick mean_diff)",
    )
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    figure_types = args.figure_types or ("mean_diff" if args.quick else ",".join(FIGURE_TYPES))
    figure_types = [] if figure_types == "none" else [t.strip() for t in figure_types.split(",") if t.strip()]
    if set(figure_types) - set(FIGURE_TYPES) or repeats < 1:
        parser.error(f"--figure-types: choose from {', '.join(FIGURE_TYPES)} or 'none'; --repeats >= 1")
    weight_methods = ["MAW"] if args.quick else ["MAW", "VOW", "PON"]
    pct = args.percentage
    setup(args)

    report = Report(
        "optipfair",
        f"Side by side with OptiPFair {OPTIPFAIR_VERSION}",
        args.out,
    )
    venv = args.optipfair_venv or default_venv()
    python, install_seconds = ensure_optipfair(venv)
    installed = "cached" if install_seconds is None else f"installed in {install_seconds:.0f} s"
    print(f"OptiPFair venv: {venv} ({installed})", flush=True)

    eval_tokens = 4 * 512 if args.quick else 16 * 512
    work = load_workload(args, eval_tokens=eval_tokens, calibration_samples=4 if args.quick else 8)
    base = work.model
    calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in work.calibration]
    tasks = pruning_tasks(weight_methods, pct)
    times: dict[str, dict[str, list[float]]] = {}
    kept: dict[str, dict[str, list]] = {}
    figures: dict[str, list[int]] = {}
    mean_diff: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="bench-optipfair-") as tmp_name:
        tmp = Path(tmp_name)
        torch.save(calib, tmp / "calibration.pt")
        worker = Worker(python, tmp)
        try:
            print("Loading the model on the OptiPFair side ...", flush=True)
            theirs_info = worker(
                "load",
                model=model_folder(args.model_path),
                threads=args.threads,
                calibration=str(tmp / "calibration.pt"),
                packages=list(VERSION_PACKAGES),
            )
            ours_checksum = sum(float(p.detach().double().sum()) for p in base.parameters())
            same_weights = abs(ours_checksum - theirs_info["checksum"]) <= 1e-9 * max(1.0, abs(ours_checksum))
            quality = [_quality_row("base", base, work)]
            with torch.no_grad():  # one untimed forward pass on each side (first-call set-up)
                base(**calib[0], use_cache=False)
            worker("warmup")

            for rep in range(repeats):
                for t, task in enumerate(tasks):
                    print(f"[{rep + 1}/{repeats}] {task.label}: {' then '.join(_order(rep + t))}", flush=True)
                    for side in _order(rep + t):
                        if side == "ours":
                            seconds, kept_now, row = run_ours(task, work, calib, pct, rep == 0)
                        else:
                            seconds, kept_now, row = run_theirs(task, worker, work, pct, tmp, rep == 0)
                        times.setdefault(task.label, {}).setdefault(side, []).append(seconds)
                        if kept_now is not None:
                            kept.setdefault(task.label, {})[side] = kept_now
                        if row:
                            quality.append(row)

            for rep in range(repeats if figure_types else 0):
                print(
                    f"[{rep + 1}/{repeats}] visualize_bias {figure_types}: {' then '.join(_order(rep))}",
                    flush=True,
                )
                for side in _order(rep):
                    out = tmp / f"figures-{side}-{rep}"
                    seconds, figures[side], mean_diff[side] = run_visualize(
                        side, worker, work, figure_types, out
                    )
                    times.setdefault("visualize", {}).setdefault(side, []).append(seconds)
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            worker.close()

    # --- report ---------------------------------------------------------------------------------------
    ours_versions, theirs_versions = _versions_here(), theirs_info["versions"]
    parent_sites = [str(Path(p).resolve()) for p in _parent_site_packages()]

    def where(info: dict) -> str:
        if not info["location"]:
            return ""
        return "shared with ours" if info["location"] in parent_sites else "own copy in the OptiPFair venv"

    report.text(
        f"Model `{args.model_path}` ({count_parameters(base):,} parameters; weights identical on both sides: "
        f"{'yes' if same_weights else 'NO (checksums differ)'}); calibration {len(calib)} batch(es), "
        f"{sum(int(b['attention_mask'].sum()) for b in calib):,} tokens of WikiText-2 valid, the same tensors "
        f"on both sides; perplexity on {work.eval_tokens:,} tokens of WikiText-2 test. torch threads: ours "
        f"{torch.get_num_threads()}, OptiPFair {theirs_info['threads']}. OptiPFair venv `{venv}`: "
        + (
            "already installed (cached)."
            if install_seconds is None
            else f"created and `{REQUIREMENT}` installed in {install_seconds:.0f} s in this run."
        )
    )
    report.table(
        ["package", "ours", "OptiPFair side", "OptiPFair side's copy"],
        [["optipfair", "-", theirs_versions["optipfair"]["version"], where(theirs_versions["optipfair"])]]
        + [["optipfair-train", ours_versions["optipfair-train"], "-", "-"]]
        + [
            [n, ours_versions[n], theirs_versions[n]["version"], where(theirs_versions[n])]
            for n in VERSION_PACKAGES
        ],
        title="Versions",
    )

    labels = {m: f"MLP width -{pct:g}%, `{m}` (weights only)" for m in weight_methods}
    labels["data-driven"] = (
        f"MLP width -{pct:g}%, data-driven: ours `activation` vs OptiPFair `MAW` + dataloader"
    )
    if figure_types:
        labels["visualize"] = (
            f"`visualize_bias`, 1 pair, {', '.join(figure_types)}, first/middle/last layers "
            f"(PNG files: ours {_pngs(figures['ours'])}, OptiPFair {_pngs(figures['optipfair'])})"
        )
    rows = []
    for key, label in labels.items():
        ours_t, theirs_t = times[key]["ours"], times[key]["optipfair"]
        ratio = statistics.median(theirs_t) / statistics.median(ours_t)
        rows.append([label, _seconds(ours_t), _seconds(theirs_t), f"{ratio:.1f}x"])
    report.table(
        ["task", "ours (s)", "OptiPFair (s)", "ratio OptiPFair / ours"],
        rows,
        title=f"Wall time inside each process (median of {repeats} run(s) per side, sides alternated)",
    )
    report.table(
        ["model", "parameters", "WikiText-2 test perplexity"], quality, title="Quality of the pruned models"
    )
    agreement = [
        _agreement_row(f"`{m}` -{pct:g}%", kept[m]["ours"], kept[m]["optipfair"]) for m in weight_methods
    ]
    agreement.append(
        _agreement_row(
            "data-driven (different scores: overlap, not agreement)",
            kept["data-driven"]["ours"],
            kept["data-driven"]["optipfair"],
            overlap=True,
        )
    )
    report.table(
        [
            "method",
            "layers",
            "layers with identical kept neurons",
            "differing layers",
            "neurons kept by us only",
        ],
        agreement,
        title="Kept-neuron agreement with OptiPFair (recovered from the pruned weights on both sides)",
    )

    notes = [
        "Timings exclude process start-up, model loading and the copy of the base model each prune works on;",
        "both processes use the same number of torch threads and never run at the same time.",
        "The ratio is OptiPFair's time over ours (above 1: ours is faster).",
        "The data-driven scores differ: OptiPFair multiplies normalised PPM weight magnitudes of gate, up and",
        "down by each neuron's down_proj-input L2 norm summed over batches (padding counted); ours multiplies",
        "the root of the summed squared down_proj inputs (padding masked) by the norm of the neuron's W_down",
        "column. The perplexity rows show what each keeps.",
    ]
    if figure_types:
        pair = DEFAULT_PROMPT_PAIRS[0]
        notes += [
            f"visualize_bias: the pair {pair[0]!r} / {pair[1]!r}; ours is asked for OptiPFair's four",
            f"components ({', '.join(FIGURE_COMPONENTS)}), so it also draws PCA for gate_proj and up_proj",
            "(OptiPFair: attention and MLP output only), at OptiPFair's 300 dpi; ours draws mean_diff as one",
            "figure with a panel per component, OptiPFair one figure per component. Overall mean |difference|",
            f"of the pair: ours {_number(mean_diff['ours'])}, OptiPFair {_number(mean_diff['optipfair'])}.",
        ]
    report.text(" ".join(notes))
    report.write()


if __name__ == "__main__":
    main()
