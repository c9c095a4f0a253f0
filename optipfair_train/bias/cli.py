"""``optipfair-train probe``: activation-difference metrics, behavioural score and figures for a model.

The main command line (``optipfair_train.cli``) builds the sub-parser with :func:`add_probe_arguments`
and calls :func:`run_probe`. Outputs in ``--output-dir``: the figures of the first ``--figure-pairs``
pairs, ``bias_metrics.json`` and ``summary.txt`` (also printed).

Example:
    optipfair-train probe --model-path demo --pairs crows-pairs:crows_pairs_anonymized.csv \\
        --sample-size 200 --output-dir bias_out
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .behaviour import SCORE_METHODS, behavioural_bias_score
from .capture import ALL_COMPONENTS, COMPONENTS
from .figures import FIGURE_FORMATS
from .metrics import probe_activation_bias
from .pairs import load_pairs, sample_pairs
from .report import format_summary, write_json
from .visualize import DEFAULT_FIGURE_COMPONENTS, VISUALIZATION_TYPES, visualize_bias

__all__ = ["add_probe_arguments", "run_probe"]

logger = logging.getLogger(__name__)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _layers(value: str) -> str | list[int]:
    if value in ("all", "first_middle_last"):
        return value
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--layers takes 'all', 'first_middle_last' or indices like 0,5,10: {value!r}"
        ) from err


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``probe`` flags to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_probe_arguments(p)
        >>> p.parse_args(["--model-path", "demo", "--output-dir", "out"]).pairs
        'default'
    """
    parser.add_argument("--model-path", required=True, help="'demo', a local model folder or a hub name")
    parser.add_argument(
        "--pairs",
        default="default",
        help="'default', 'crows-pairs:PATH', a .jsonl/.json/.csv file of pairs, or 'hf:NAME[:SPLIT]'",
    )
    parser.add_argument(
        "--output-dir", required=True, help="folder for figures, bias_metrics.json and summary.txt"
    )
    parser.add_argument("--sample-size", type=int, default=None, help="random subset of pairs (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the bootstrap")
    parser.add_argument(
        "--layers",
        type=_layers,
        default="first_middle_last",
        help="figure layers: 'first_middle_last', 'all' or indices like 0,5,10 (metrics cover all)",
    )
    parser.add_argument(
        "--components",
        type=_csv,
        default=list(DEFAULT_FIGURE_COMPONENTS),
        help=f"comma-separated figure components, from {','.join(ALL_COMPONENTS)}",
    )
    parser.add_argument(
        "--visualizations",
        type=_csv,
        default=list(VISUALIZATION_TYPES),
        help=f"comma-separated figure types from {','.join(VISUALIZATION_TYPES)}, or 'none'",
    )
    parser.add_argument("--figure-format", default="png", choices=FIGURE_FORMATS)
    parser.add_argument("--figure-pairs", type=int, default=1, help="draw figures for the first N pairs")
    parser.add_argument(
        "--score-method",
        default="full",
        choices=SCORE_METHODS,
        help="behavioural log-likelihood: full sentence, or shared tokens after the difference",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load_model(model_path: str, dtype: str, device: str):
    from optipfair_train.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_path, dtype=dtype, device=device)


def run_probe(args: argparse.Namespace) -> int:
    """Run the probe described by ``args`` (from :func:`add_probe_arguments`); 0 on success, 2 on bad input.

    Example:
        >>> parser = argparse.ArgumentParser(); add_probe_arguments(parser)
        >>> run_probe(parser.parse_args(["--model-path", "demo", "--output-dir", "out"]))  # doctest: +SKIP
        0
    """
    visualizations = [] if args.visualizations == ["none"] else args.visualizations
    try:
        unknown = [v for v in visualizations if v not in VISUALIZATION_TYPES]
        if unknown:
            raise ValueError(
                f"Unknown visualization type(s) {unknown}; choose from {', '.join(VISUALIZATION_TYPES)} or none"
            )
        pairs = sample_pairs(load_pairs(args.pairs), args.sample_size, args.seed)
        model, tokenizer = _load_model(args.model_path, args.dtype, args.device)
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    show = not args.no_progress
    start = time.perf_counter()
    try:
        activation = probe_activation_bias(
            model,
            tokenizer,
            pairs,
            "all",
            COMPONENTS,
            batch_size=args.batch_size,
            seed=args.seed,
            n_bootstrap=args.n_bootstrap,
            show_progress=show,
        )
        behaviour = behavioural_bias_score(
            model,
            tokenizer,
            pairs,
            args.score_method,
            seed=args.seed,
            batch_size=args.batch_size,
            n_bootstrap=args.n_bootstrap,
            show_progress=show,
        )
        figures, figure_metrics = {}, {}
        if visualizations and args.figure_pairs > 0:
            figures, figure_metrics = visualize_bias(
                model,
                tokenizer,
                pairs[: args.figure_pairs],
                visualizations,
                args.layers,
                output_dir,
                args.figure_format,
                show,
                components=args.components,
                batch_size=args.batch_size,
            )
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = format_summary(activation, behaviour, title=f"Bias probe of {args.model_path} on {args.pairs}")
    report = {
        "model_path": args.model_path,
        "pairs": args.pairs,
        "num_pairs": len(pairs),
        "sample_size": args.sample_size,
        "seed": args.seed,
        "behavioural": behaviour,
        "activation": {
            "aggregate": activation["aggregate"],
            "per_pair_overall": [
                {
                    "prompt1": r["prompt1"],
                    "prompt2": r["prompt2"],
                    "bias_type": r["bias_type"],
                    "overall_metrics": r["metrics"]["overall_metrics"],
                }
                for r in activation["pairs"]
            ],
        },
        "figure_pairs": figure_metrics,  # full OptiPFair-style metrics of the drawn pairs
        "figures": sorted(f"{name}.{args.figure_format}" for name in figures),
        "seconds": time.perf_counter() - start,
    }
    write_json(output_dir / "bias_metrics.json", report)
    (output_dir / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    print(summary)
    print(f"\nWrote {len(figures)} figures, bias_metrics.json and summary.txt to {output_dir}")
    return 0
