"""``optipfair-train probe``: activation-difference metrics, behavioural score and figures for a model.

The main command line (``optipfair_train.cli``) builds the sub-parser with
:func:`optipfair_train.cli_parser_measure.add_probe_arguments` (no torch, so ``--help`` answers at once)
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

from .behaviour import behavioural_bias_score
from .capture import COMPONENTS
from .metrics import probe_activation_bias
from .pairs import load_pairs, sample_pairs
from .report import format_summary, write_json
from .visualize import visualize_bias

__all__ = ["run_probe"]

logger = logging.getLogger(__name__)


def _load_model(model_path: str, dtype: str, device: str):
    from optipfair_train.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model_path, dtype=dtype, device=device)


def run_probe(args: argparse.Namespace) -> int:
    """Run the probe described by ``args`` (from the ``probe`` parser); 0 on success, 2 on bad input.

    Example:
        >>> from optipfair_train.cli_parser import build_parser
        >>> args = build_parser("probe").parse_args(["probe", "--model-path", "demo", "--output-dir", "out"])
        >>> run_probe(args)  # doctest: +SKIP
        0
    """
    visualizations = args.visualizations  # names checked by the parser ([] for 'none')
    try:
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
