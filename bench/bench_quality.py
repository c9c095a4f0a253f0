"""One-shot pruning quality on the demo model (SmolLM2-135M-Instruct): what each pruning costs, no healing.

Everything is measured on one workload: WikiText-2 test perplexity over a fixed token count (16 x 512
tokens; --quick 4 x 512), calibration batches of WikiText-2 valid (8 x 256 tokens; --quick 4 x 256):

1. MLP width at 10/20/30/40% for every neuron scorer (MAW, VOW, PON, L2, activation, taylor, fairness,
   random): perplexity per percentage, parameters per percentage, and at 20% the CrowS-Pairs score
   with its 95% bootstrap interval (300 seeded pairs, the same for every model); plus a plot.
   Each scorer's importance is computed once on the unpruned model and reused for every percentage
   (exactly what ``prune_model`` would compute: same scores, same top-k per layer).
2. Attention: one KV group removed in every layer (``head_granularity="group"``), scorers activation,
   L2 and random.
3. Depth: 2/4/6 blocks removed, ``last`` (OptiPFair's default) vs ``importance`` (measured).
4. Cost of the calibration statistics against plain forward passes over the same batches, and the
   peak extra memory of the activation statistics with few vs many calibration tokens.

    python bench/bench_quality.py            # full run: ~20-25 min on 2 quiet CPU cores
    python bench/bench_quality.py --quick    # a few minutes: 10/30%, fewer scorers, fewer tokens
                                             # (~5 CPU-minutes; 10 min wall with --threads 1 at load 7)

Further flags: the shared ones of ``bench/common.py`` (--model-path, --data, --out, --threads, --seed),
--scorers MAW,activation,... (MLP scorers to run), --crows-sample N (CrowS-Pairs pairs scored; 0 = all
1,508), --fairness-weight W (default 0.2). Writes <out>/quality.md and <out>/quality-mlp.png.
Times depend on the machine's load (printed above the tables); nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import Counter

import torch
from common import (
    PeakRSS,
    Progress,
    Report,
    Workload,
    base_parser,
    crows_cell,
    fmt_ppl,
    load_workload,
    measure,
    setup,
    timed,
)

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.bias import DEFAULT_PROMPT_PAIRS
from optipfair_train.data import calibration_dataloader
from optipfair_train.pruning import (
    as_batches,
    get_scorer,
    mlp_activation_sumsq,
    neuron_scores,
    register_scorer,
)
from optipfair_train.pruning.taylor import taylor_importance

ALL_SCORERS = ("MAW", "VOW", "PON", "L2", "activation", "taylor", "fairness", "random")
QUICK_SCORERS = ("MAW", "activation", "random", "taylor", "fairness")
SLOW_SCORERS = ("taylor", "fairness")  # in --quick mode only at the CrowS-Pairs percentage
HEAD_SCORERS = ("activation", "L2", "random")
CACHED = "bench-cached"

# Scores of the scorer under test, computed once on the unpruned model (keyed by layer index).
_cached_scores: dict[int, torch.Tensor] = {}


@register_scorer(CACHED, replace=True)  # replaced when the script is imported again
def _cached(parts, context):
    """Precomputed scores of the scorer under test (bench_quality only)."""
    return _cached_scores[context.layer_idx]


def statistics_cost(work: Workload, args: argparse.Namespace, samples: tuple[int, int]):
    """Seconds of plain forward passes vs the statistics passes (same batches), and peak extra RSS of
    the activation statistics for two calibration sizes (same batch size, so a streaming pass should
    need the same memory for both)."""
    model, batches = work.model, work.calibration

    def forward_only():
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False)

    forward_only()  # warm-up (first-call allocations count neither as memory nor as time)
    texts = work.valid_texts(args.data)
    memory = []
    for count in samples:
        big = as_batches(
            calibration_dataloader(work.tokenizer, texts, num_samples=count, seq_len=256, batch_size=4)
        )
        tokens = sum(int(b["attention_mask"].sum()) for b in big)
        with PeakRSS() as rss:
            mlp_activation_sumsq(model, big)
        memory.append([f"{tokens:,}", f"{rss.extra / 2**20:.0f}"])

    # Interleaved rounds, medians: a background job slows one round, not one kind of pass.
    runs: dict[str, list[float]] = {"plain": [], "activation": [], "taylor": []}
    for _ in range(3):
        runs["plain"].append(timed(forward_only)[1])
        runs["activation"].append(timed(lambda: mlp_activation_sumsq(model, batches))[1])
        runs["taylor"].append(timed(lambda: taylor_importance(model, batches))[1])
    plain, activation, taylor = (statistics.median(runs[k]) for k in ("plain", "activation", "taylor"))
    cost = [
        ["plain forward passes", f"{plain:.2f}", "1.00"],
        ["forward + activation statistics (`activation`)", f"{activation:.2f}", f"{activation / plain:.2f}"],
        ["forward + backward (`taylor`)", f"{taylor:.2f}", f"{taylor / plain:.2f}"],
    ]
    return cost, memory


def mlp_width(work: Workload, args, scorers, percentages, focus, progress):
    """Perplexity per (scorer, percentage); CrowS-Pairs at ``focus``. Returns results keyed by scorer."""
    base = work.model
    results: dict[str, dict[float, dict[str, float]]] = {}
    scoring_seconds: dict[str, float] = {}
    parameters: dict[float, int] = {}
    for method in scorers:
        needs_data = get_scorer(method).needs is not None
        scores, seconds = timed(
            lambda method=method: neuron_scores(
                base,
                method,
                batches=work.calibration,
                seed=args.seed,
                bias_pairs=DEFAULT_PROMPT_PAIRS,
                tokenizer=work.tokenizer,
                fairness_weight=args.fairness_weight,
            )
        )
        scoring_seconds[method] = seconds
        progress(f"MLP {method}: scores in {seconds:.1f} s" + (" (calibration data)" if needs_data else ""))
        _cached_scores.clear()
        _cached_scores.update(scores)
        results[method] = {}
        run = [focus] if args.quick and method in SLOW_SCORERS else percentages
        for pct in run:
            model = copy.deepcopy(base)
            prune_model(
                model,
                pruning_type="MLP",
                neuron_selection_method=CACHED,
                pruning_percentage=pct,
                show_progress=False,
            )
            metrics = measure(model, work, crows=pct == focus)
            del model
            results[method][pct] = metrics
            parameters[pct] = int(metrics["parameters"])
            progress(
                f"MLP {method} -{pct:g}%: perplexity {fmt_ppl(metrics['perplexity'])}"
                + (f", CrowS-Pairs {crows_cell(metrics)}" if pct == focus else "")
            )
    _cached_scores.clear()
    return results, scoring_seconds, parameters


def attention_groups(work: Workload, report: Report, progress) -> None:
    adapter = get_adapter(work.model)
    if not adapter.family.separate_qkv:
        report.text(
            f"Attention: skipped ({adapter.family.name} fuses q/k/v; head pruning needs them separate)."
        )
        return
    (n_q, n_kv, _), *others = sorted({adapter.head_counts(i) for i in range(adapter.num_layers)})
    if others or n_q % n_kv:
        report.text("Attention: skipped (head counts differ between layers or do not form equal groups).")
        return
    if n_kv < 2:
        report.text(f"Attention: skipped (the model has {n_kv} key/value head: no group can go).")
        return
    pct = 100 / n_kv  # floors to exactly one group per layer
    rows = []
    for method in HEAD_SCORERS:
        model = copy.deepcopy(work.model)
        (_, stats), seconds = timed(
            lambda method=method, model=model: prune_model(
                model,
                pruning_type="ATTENTION",
                head_granularity="group",
                neuron_selection_method=method,
                pruning_percentage=pct,
                dataloader=work.calibration,
                show_progress=False,
                return_stats=True,
            )
        )
        removed = Counter(
            next(g for g in range(n_kv) if g not in kept) for kept in stats["event"]["kept_kv_heads"].values()
        )
        metrics = measure(model, work, crows=False)
        del model
        where = ", ".join(f"group {g} in {removed[g]}" for g in sorted(removed))
        rows.append(
            [
                method,
                f"{seconds:.1f}",
                f"{int(metrics['parameters']):,}",
                fmt_ppl(metrics["perplexity"]),
                where,
            ]
        )
        progress(f"attention {method}: perplexity {fmt_ppl(metrics['perplexity'])}")
    report.table(
        ["scorer", "scoring + surgery (s)", "parameters", "perplexity", "removed group (number of layers)"],
        rows,
        title=f"Attention: 1 of {n_kv} KV groups removed in every layer ({n_q} query heads, {n_q // n_kv} per group)",
    )


def depth(work: Workload, counts, report: Report, progress) -> None:
    n = get_adapter(work.model).num_layers
    rows = []
    for count in [c for c in counts if c < n]:
        for method in ("last", "importance"):
            model = copy.deepcopy(work.model)
            _, stats = prune_model(
                model,
                pruning_type="DEPTH",
                num_layers_to_remove=count,
                layer_selection_method=method,
                dataloader=work.calibration if method == "importance" else None,
                show_progress=False,
                return_stats=True,
            )
            metrics = measure(model, work, crows=False)
            del model
            removed = stats["event"]["removed_layers"]
            rows.append(
                [
                    count,
                    f"`{method}`",
                    ", ".join(map(str, removed)),
                    f"{int(metrics['parameters']):,}",
                    fmt_ppl(metrics["perplexity"]),
                ]
            )
            progress(f"depth -{count} {method} {removed}: perplexity {fmt_ppl(metrics['perplexity'])}")
    report.table(
        ["blocks removed", "selection", "removed blocks", "parameters", "perplexity"],
        rows,
        title=f"Depth: whole blocks removed (of {n})",
    )


def plot(results, percentages, base_ppl: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_pct in results.items():
        xs = [p for p in percentages if p in by_pct]
        ax.plot(xs, [by_pct[p]["perplexity"] for p in xs], marker="o", label=method)
    ax.axhline(base_ppl, color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_yscale("log")
    ax.set_xticks(list(percentages))
    ax.set_xlabel("MLP neurons removed per layer (%)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title("One-shot MLP width pruning, no healing")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return fig


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--scorers", default=None, help=f"comma-separated MLP scorers (default: {','.join(ALL_SCORERS)})"
    )
    parser.add_argument("--crows-sample", type=int, default=None, help="CrowS-Pairs pairs scored (0: all)")
    parser.add_argument("--fairness-weight", type=float, default=0.2)
    args = parser.parse_args()
    setup(args)
    progress = Progress()

    quick = args.quick
    percentages = (10.0, 30.0) if quick else (10.0, 20.0, 30.0, 40.0)
    focus = 30.0 if quick else 20.0
    scorers = args.scorers.split(",") if args.scorers else list(QUICK_SCORERS if quick else ALL_SCORERS)
    for method in scorers:
        try:
            get_scorer(method)  # unknown names fail before anything runs
        except ValueError as error:
            parser.error(str(error))
    crows_sample = args.crows_sample if args.crows_sample is not None else 40 if quick else 300
    eval_tokens = 4 * 512 if quick else 16 * 512
    calibration_samples = 4 if quick else 8
    work = load_workload(
        args,
        eval_tokens=eval_tokens,
        calibration_samples=calibration_samples,
        calibration_seq_len=256,
        crows_sample=crows_sample or None,
    )
    progress(f"loaded {args.model_path}")
    report = Report("quality", "One-shot pruning quality", out=args.out)
    n_pairs = len(work.crows_pairs)
    scored = min(crows_sample, n_pairs) if crows_sample else n_pairs
    report.text(
        f"Model `{args.model_path}`; no healing. Perplexity: WikiText-2 test, {work.test_ids.shape[0]} x "
        f"{work.eval_seq_len} tokens. Calibration (data-driven scorers, `importance`): {calibration_samples} x "
        f"256 tokens of WikiText-2 valid. CrowS-Pairs: {scored} of {n_pairs} pairs (seeded sample, the same "
        "for every model), % of pairs where the model prefers the stereotyped sentence (50 = no preference), "
        "95% bootstrap interval. `fairness` uses the default demographic prompt pairs "
        f"(weight {args.fairness_weight:g}); `random` is seeded."
    )

    cost, memory = statistics_cost(work, args, (4, 16) if quick else (4, 64))
    progress("statistics cost and memory measured")

    base = measure(work.model, work, crows=True)
    progress(f"unpruned: perplexity {fmt_ppl(base['perplexity'])}, CrowS-Pairs {crows_cell(base)}")

    results, scoring_seconds, parameters = mlp_width(work, args, scorers, percentages, focus, progress)
    header = ["scorer", "scoring (s)"] + [f"-{p:g}%" for p in percentages]
    rows = [["unpruned", "", *[fmt_ppl(base["perplexity"])] * len(percentages)]]
    for method, by_pct in results.items():
        rows.append(
            [f"`{method}`", f"{scoring_seconds[method]:.1f}"]
            + [fmt_ppl(by_pct[p]["perplexity"]) if p in by_pct else "-" for p in percentages]
        )
    report.table(header, rows, title="MLP width: perplexity per share of neurons removed in every layer")
    report.table(
        ["MLP neurons removed", "parameters", "% of unpruned"],
        [["0%", f"{int(base['parameters']):,}", "100.0"]]
        + [
            [f"{p:g}%", f"{parameters[p]:,}", f"{100 * parameters[p] / base['parameters']:.1f}"]
            for p in percentages
            if p in parameters
        ],
        title="MLP width: parameters",
    )
    report.table(
        ["scorer", "parameters", "perplexity", "CrowS-Pairs [95% CI]"],
        [["unpruned", f"{int(base['parameters']):,}", fmt_ppl(base["perplexity"]), crows_cell(base)]]
        + [
            [
                f"`{m}`",
                f"{int(r[focus]['parameters']):,}",
                fmt_ppl(r[focus]["perplexity"]),
                crows_cell(r[focus]),
            ]
            for m, r in results.items()
            if focus in r
        ],
        title=f"MLP -{focus:g}%: perplexity and CrowS-Pairs score [95% CI]",
    )
    report.figure(
        plot(results, percentages, base["perplexity"]), "mlp", "Perplexity vs MLP pruning percentage"
    )

    attention_groups(work, report, progress)
    depth(work, (1, 2) if quick else (2, 4, 6), report, progress)

    report.table(
        ["pass over the calibration batches", "seconds", "ratio to plain forward"],
        cost,
        title=f"Cost of the calibration statistics ({calibration_samples} x 256 tokens, batch 4; median of 3 interleaved rounds)",
    )
    report.table(
        ["calibration tokens", "peak extra RSS (MB)"],
        memory,
        title="Peak extra memory of the activation statistics (batch 4 x 256 tokens)",
    )
    report.write()


if __name__ == "__main__":
    main()
