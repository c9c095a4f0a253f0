"""Benchmark of the bias probes on the demo model (SmolLM2-135M-Instruct); prints a markdown table.

Measures: ``visualize_bias`` on one pair with the three figure types (OptiPFair 0.4.2: 43 s here),
the behavioural score and the streamed activation probe per 100 CrowS-Pairs pairs, and the demo
model's CrowS-Pairs score over all 1,508 pairs with its 95% bootstrap interval. Times depend on the
machine's load, which is printed with the table (on a shared 2-core machine, ``--threads 1`` avoids
OpenMP oversubscription). Does not assert anything.

    python bench/bench_bias.py [--model-path demo] [--methods full,shared] [--skip-full] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from optipfair_train.bias import (
    DEFAULT_PROMPT_PAIRS,
    behavioural_bias_score,
    bootstrap_ci,
    load_crows_pairs,
    probe_activation_bias,
    visualize_bias,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="demo")
    parser.add_argument("--crows-pairs", default=str(DATA / "crows-pairs" / "crows_pairs_anonymized.csv"))
    parser.add_argument(
        "--methods", default="full", help="behavioural score methods for the full run: full,shared"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-full", action="store_true", help="skip the full CrowS-Pairs run (minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="further visualize_bias calls to time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from optipfair_train.models import load_model_and_tokenizer

    (model, tokenizer), load_s = _timed(load_model_and_tokenizer, args.model_path)
    pairs = load_crows_pairs(args.crows_pairs)
    rows: list[tuple[str, str]] = [("model load", f"{load_s:.1f} s")]

    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for run in range(1 + args.repeats):  # the first call also pays one-time start-up costs
            (figures, _), secs = _timed(
                visualize_bias, model, tokenizer, DEFAULT_PROMPT_PAIRS[:1], ["mean_diff", "heatmap", "pca"],
                output_dir=Path(tmp) / str(run), show_progress=False,
            )  # fmt: skip
            times.append(secs)
        rows.append((f"visualize_bias, 1 pair, 3 types, {len(figures)} PNGs: first call; OptiPFair 0.4.2: 43 s",
                     f"{times[0]:.2f} s"))  # fmt: skip
        rows.append((f"visualize_bias, same, best / median of {args.repeats} further calls",
                     f"{min(times[1:]):.2f} s / {sorted(times[1:])[len(times[1:]) // 2]:.2f} s"))  # fmt: skip

    sample = dict(sample_size=100, seed=0, batch_size=args.batch_size)
    _, secs = _timed(behavioural_bias_score, model, tokenizer, pairs, **sample)
    rows.append(("behavioural score, 100 CrowS-Pairs pairs (full log-prob)", f"{secs:.1f} s"))
    _, secs = _timed(probe_activation_bias, model, tokenizer, pairs, **sample)
    rows.append(("activation probe, 100 CrowS-Pairs pairs, 6 components x 30 layers", f"{secs:.1f} s"))

    if not args.skip_full:
        for method in args.methods.split(","):
            result, secs = _timed(behavioural_bias_score, model, tokenizer, pairs, method=method,
                                  batch_size=args.batch_size)  # fmt: skip
            rows.append((
                f"CrowS-Pairs score, all {result['num_pairs']} pairs, {method} (FIELD-NOTES full: 48.7 [46.3, 51.1])",
                f"**{result['score']:.1f}** [{result['ci_low']:.1f}, {result['ci_high']:.1f}]"
                + (f", {result['num_ties']} ties" if result["num_ties"] else ""),
            ))  # fmt: skip
            # FIELD-NOTES read "stereotyped" per direction (sent_less on antistereo rows); CrowS-Pairs does not.
            per_direction = [
                r["prefers_prompt1"] != (r["stereo_antistereo"] == "antistereo") for r in result["pairs"]
            ]
            mean, lo, hi = bootstrap_ci(per_direction)
            rows.append(("  same run, non-standard reading: sent_less counts as stereotyped on antistereo rows",
                         f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"))  # fmt: skip
            rows.append((f"  time for all pairs ({method}); per 100 pairs",
                         f"{secs:.0f} s; {100 * secs / result['num_pairs']:.1f} s"))  # fmt: skip
            for bias_type, e in result["by_bias_type"].items():
                rows.append((f"  {method}: {bias_type} (n={e['num_pairs']})",
                             f"{e['score']:.1f} [{e['ci_low']:.1f}, {e['ci_high']:.1f}]"))  # fmt: skip

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nBias probes on {args.model_path}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load}\n")  # fmt: skip
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
