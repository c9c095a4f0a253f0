"""Bias probing cost and the base model's CrowS-Pairs score with its 95% bootstrap interval.

Writes ``<out>/bias.md`` (and prints it). Measures ``visualize_bias`` on one pair with the three figure
types (OptiPFair 0.4.2 took 43 s on the demo model), the behavioural score and the streamed activation
probe on a sample of CrowS-Pairs pairs (``--sample``), and, in the full mode, the CrowS-Pairs score over
all 1,508 pairs (``--methods``: whole-sentence log-probability ``full``, shared-suffix ``shared``) with its
interval, per bias type. CrowS-Pairs comes from ``<data>/crows-pairs/crows_pairs_anonymized.csv``. Times
depend on the machine's load, printed above the table (on a shared 2-core machine ``--threads 1`` avoids
OpenMP oversubscription). Asserts nothing.

Usage:
    python bench/bench_bias.py --quick --threads 1      # 40 pairs, no full pass (~1 min on the demo model)
    python bench/bench_bias.py --threads 1              # 100-pair timings and all 1,508 pairs (~5 min quiet)
    python bench/bench_bias.py --methods full,shared    # the full pass with both log-likelihoods
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import Report, base_parser, setup

from optipfair_train.bias import (
    DEFAULT_PROMPT_PAIRS,
    SCORE_METHODS,
    behavioural_bias_score,
    bootstrap_ci,
    load_crows_pairs,
    probe_activation_bias,
    select_layer_keys,
    visualize_bias,
)
from optipfair_train.models import load_model_and_tokenizer

README_DEMO_SCORE = "55.6 [53.1, 58.4]"  # README: demo model, all pairs, method "full"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _score(result: dict) -> str:
    return f"{result['score']:.1f} [{result['ci_low']:.1f}, {result['ci_high']:.1f}]"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--methods",
        default="full",
        help=f"behavioural score methods for the full pass: {','.join(SCORE_METHODS)}",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    parser.add_argument(
        "--sample", type=int, default=None, help="pairs for the timings (default 100; quick 40)"
    )
    parser.add_argument(
        "--skip-full", action="store_true", help="skip the full CrowS-Pairs pass (quick skips it)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="further visualize_bias calls to time (default 3; quick 1)"
    )
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(SCORE_METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or methods}; choose from {', '.join(SCORE_METHODS)}.")
    sample = args.sample or (40 if args.quick else 100)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    full_pass = not (args.quick or args.skip_full)
    setup(args)
    crows_csv = args.data / "crows-pairs" / "crows_pairs_anonymized.csv"
    if not crows_csv.is_file():
        raise SystemExit(f"No CrowS-Pairs at {crows_csv}; pass --data DIR or set OPTIPFAIR_TRAIN_DATA.")

    report = Report(
        "bias",
        "Bias probing cost and the base CrowS-Pairs score",
        args.out,
    )
    (model, tokenizer), load_s = _timed(load_model_and_tokenizer, args.model_path)
    pairs = load_crows_pairs(crows_csv)
    sample = min(sample, len(pairs))
    probe_keys = select_layer_keys(model, "all")
    rows: list[list[str]] = [["model load", f"{load_s:.1f} s"]]

    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for run in range(1 + repeats):  # the first call also pays one-time start-up costs
            (figures, _), secs = _timed(
                visualize_bias, model, tokenizer, DEFAULT_PROMPT_PAIRS[:1], ["mean_diff", "heatmap", "pca"],
                output_dir=Path(tmp) / str(run), show_progress=False,
            )  # fmt: skip
            times.append(secs)
    rows.append([f"`visualize_bias`, 1 pair, 3 types, {len(figures)} PNGs: first call", f"{times[0]:.2f} s"])
    if repeats:
        further = sorted(times[1:])
        rows.append(
            [
                f"`visualize_bias`, same, best / median of {repeats} further call(s)",
                f"{further[0]:.2f} s / {further[len(further) // 2]:.2f} s",
            ]
        )

    timing = dict(sample_size=sample, seed=args.seed, batch_size=args.batch_size)
    sampled, sampled_s = _timed(behavioural_bias_score, model, tokenizer, pairs, **timing)
    rows.append(
        [
            f"behavioural score, {sample} CrowS-Pairs pairs (`full` log-prob); per 100 pairs",
            f"{sampled_s:.1f} s; {100 * sampled_s / sample:.1f} s",
        ]
    )
    _, secs = _timed(probe_activation_bias, model, tokenizer, pairs, **timing)
    rows.append(
        [
            f"activation probe, {sample} CrowS-Pairs pairs, {len(probe_keys)} layer keys "
            f"({len(probe_keys) // max(1, model.config.num_hidden_layers)} components x "
            f"{model.config.num_hidden_layers} layers); per 100 pairs",
            f"{secs:.1f} s; {100 * secs / sample:.1f} s",
        ]
    )
    report.table(["measurement", "value"], rows, title="Cost of the probes")

    score_rows = [
        [
            f"{sample}-pair sample (seed {args.seed}), `full`",
            f"**{_score(sampled)}**",
            f"{sampled['num_ties']}",
            f"{sampled_s:.1f} s",
        ]
    ]
    by_type: dict[str, dict] = {}
    if full_pass:
        for method in methods:
            result, secs = _timed(
                behavioural_bias_score, model, tokenizer, pairs, method=method, batch_size=args.batch_size
            )
            # Non-standard reading (sent_less counts as stereotyped on antistereo rows; CrowS-Pairs does not).
            per_direction = [
                r["prefers_prompt1"] != (r["stereo_antistereo"] == "antistereo") for r in result["pairs"]
            ]
            mean, lo, hi = bootstrap_ci(per_direction)
            score_rows.append(
                [
                    f"all {result['num_pairs']:,} pairs, `{method}`",
                    f"**{_score(result)}**",
                    f"{result['num_ties']}",
                    f"{secs:.0f} s ({100 * secs / result['num_pairs']:.1f} s per 100 pairs)",
                ]
            )
            score_rows.append(
                [
                    f"same run, non-standard reading (`sent_less` stereotyped on antistereo rows), `{method}`",
                    f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                    "-",
                    "-",
                ]
            )
            by_type[method] = result["by_bias_type"]
    report.table(
        ["pairs scored, method", "score [95% CI]", "ties", "time"],
        score_rows,
        title=f"CrowS-Pairs score of `{args.model_path}` (% of pairs preferring the more stereotyping sentence)",
    )
    if by_type:
        types = sorted({t for per_method in by_type.values() for t in per_method})
        report.table(
            ["bias type", *(f"`{m}`" for m in by_type)],
            [
                [
                    f"{t} (n={next(iter(by_type.values()))[t]['num_pairs']})",
                    *(_score(by_type[m][t]) if t in by_type[m] else "-" for m in by_type),
                ]
                for t in types
            ],
            title="Per bias type, all pairs",
        )
    notes = ["50 = no preference; ties count as not preferred (CrowS-Pairs' neutral)."]
    if not full_pass:
        notes.append(f"The full {len(pairs):,}-pair pass was skipped (`--quick` or `--skip-full`).")
    if args.model_path == "demo":
        notes.append(
            f"README (demo model, all pairs, `full`): {README_DEMO_SCORE}. OptiPFair 0.4.2's "
            "`visualize_bias` on the same pair and types took 43 s on this machine type."
        )
    report.text(" ".join(notes))
    report.write()


if __name__ == "__main__":
    main()
