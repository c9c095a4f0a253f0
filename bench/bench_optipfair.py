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

import copy
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from common import Report, base_parser, load_workload, measure, setup
from optipfair_worker import (
    FIGURE_COMPONENTS,
    FIGURE_TYPES,
    OPTIPFAIR_VERSION,
    REQUIREMENT,
    VERSION_PACKAGES,
    Worker,
    default_venv,
    ensure_optipfair,
    kept_neurons,
)
from peer_venv import parent_site_packages

from optipfair_train import count_parameters, prune_model
from optipfair_train.bias import DEFAULT_PROMPT_PAIRS, visualize_bias
from optipfair_train.models import demo_model_dir


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
    parent_sites = [str(Path(p).resolve()) for p in parent_site_packages()]

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
