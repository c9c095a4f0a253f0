"""``bench_refit_time.py --compare-ref COMMIT``: the engine's plan + apply against an older ``prune_model``.

See ``bench_refit_time.py`` for what is measured; the timed prunes run in ``engine_time_worker.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, Report
from transformers import AutoConfig

from optipfair_train.data import calibration_dataloader, load_texts
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pruning import as_batches

WORKER = Path(__file__).resolve().parent / "engine_time_worker.py"
SECTION = "## plan + apply against the pre-engine prune_model"
# implementations timed per setting and repeat: (label, source tree, worker --impl)
IMPLS = (("old", "ref", "prune_model"), ("new", "new", "plan_apply"), ("new_prune", "new", "prune_model"))


def settings(model_dir: Path) -> dict[str, dict]:
    """prune_model's arguments of each timed setting, sized for the model in ``model_dir``."""
    config = AutoConfig.from_pretrained(model_dir)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # OptiPFair floors the share of KV groups: 100 / kv + 1 percent removes exactly one group
    one_group = min(99.0, 100.0 / kv_heads + 1)
    return {
        "MLP width -20%, hybrid, refit": dict(
            pruning_type="MLP_GLU",
            neuron_selection_method="hybrid",
            pruning_percentage=20.0,
            reconstruct=True,
        ),
        f"heads: 1 of {kv_heads} KV groups, activation": dict(
            pruning_type="ATTENTION", neuron_selection_method="activation", pruning_percentage=one_group
        ),
        f"depth: {max(1, config.num_hidden_layers // 10)} blocks, importance": dict(
            pruning_type="DEPTH",
            num_layers_to_remove=max(1, config.num_hidden_layers // 10),
            layer_selection_method="importance",
        ),
    }


def extract(commit: str, into: Path) -> str:
    """The source tree of ``commit`` under ``into`` (``git archive``); returns the full hash."""
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if full.returncode != 0:
        raise SystemExit(f"--compare-ref {commit!r} is not a commit of {ROOT}: {full.stderr.strip()}")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", full.stdout.strip(), "optipfair_train"],
        capture_output=True,
        check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return full.stdout.strip()


def run_worker(tree: Path, impl: str, setting: dict, folder: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            "--impl",
            impl,
            "--root",
            str(tree),
            "--model",
            str(folder / "model"),
            "--calibration",
            str(folder / "calibration.pt"),
            "--threads",
            str(threads),
            "--setting",
            json.dumps(setting),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({tree}, {impl}, {setting}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def compare_with_ref(args: argparse.Namespace) -> None:
    """Time every setting ``args.repeats`` times on both trees, interleaved, and write the section."""
    threads = args.threads or torch.get_num_threads()
    samples, seq_len = (4, 64) if args.quick else (32, 256)
    report = Report("refit-time", SECTION.removeprefix("## ") + f" ({args.compare_ref})", args.out)
    with tempfile.TemporaryDirectory(prefix="bench-engine-time-") as tmp:
        folder = Path(tmp)
        commit = extract(args.compare_ref, folder / "ref")
        trees = {"ref": folder / "ref", "new": ROOT}
        model, tokenizer = load_model_and_tokenizer(args.model_path)
        model.save_pretrained(folder / "model")
        batches = as_batches(
            calibration_dataloader(
                tokenizer,
                load_texts(str(args.data / "wikitext-2" / "valid.txt")),
                num_samples=samples,
                seq_len=seq_len,
                batch_size=4,
            )
        )
        torch.save(batches, folder / "calibration.pt")
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        del model
        timed = settings(folder / "model")
        seconds = {name: {label: [] for label, _, _ in IMPLS} for name in timed}
        phases = {name: {"plan": [], "apply": []} for name in timed}
        digests = {name: set() for name in timed}
        for repeat in range(args.repeats):
            for name, setting in timed.items():
                order = IMPLS if repeat % 2 == 0 else IMPLS[::-1]
                for label, tree, impl in order:
                    result = run_worker(trees[tree], impl, setting, folder, threads)
                    seconds[name][label].append(result["seconds"])
                    digests[name].add(result["digest"])
                    if impl == "plan_apply":
                        phases[name]["plan"].append(result["plan_seconds"])
                        phases[name]["apply"].append(result["apply_seconds"])
                    print(f"repeat {repeat}, {name}, {label}: {result['seconds']:.2f} s", flush=True)
    report.text(
        f"Old: `prune_model` of commit `{commit[:12]}` (before the request -> plan -> apply engine). New: "
        "`pruning_request` + `plan` + `apply` of this checkout, and its `prune_model`. Each prune in a "
        f"fresh process ({threads} torch threads) on the same saved model and {tokens:,} calibration "
        f"tokens of WikiText-2 valid ({samples} x {seq_len}); {args.repeats} interleaved repeats; seconds "
        "as median (min-max). Same model: whether every run of the setting left bit-identical weights."
    )
    rows = []
    for name in timed:
        s, old = seconds[name], statistics.median(seconds[name]["old"])
        rows.append(
            [
                name,
                _cell(s["old"]),
                _cell(s["new"]),
                f"{_cell(phases[name]['plan'])} + {_cell(phases[name]['apply'])}",
                f"{statistics.median(s['new']) / old:.2f}",
                _cell(s["new_prune"]),
                f"{statistics.median(s['new_prune']) / old:.2f}",
                "yes" if len(digests[name]) == 1 else "no",
            ]
        )
    report.table(
        [
            "setting",
            "old prune_model (s)",
            "new plan + apply (s)",
            "of which plan + apply (s)",
            "ratio new / old",
            "new prune_model (s)",
            "ratio",
            "same model",
        ],
        rows,
    )
    write_section(report)


def write_section(report: Report) -> Path:
    """Replace (or add) this comparison's section in ``<out>/refit-time.md``; the rest of it stays."""
    report.lines.append(f"Wall time of the comparison: {time.perf_counter() - report.start:.0f} s.")
    path = report.out / f"{report.name}.md"
    kept = path.read_text().split(SECTION)[0].rstrip() + "\n\n" if path.is_file() else ""
    path.write_text(kept + "\n".join(report.lines) + "\n")
    print(f"\nWritten to {path}", flush=True)
    return path
