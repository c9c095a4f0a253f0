"""Zero-shot accuracy of the pruned models of docs/benchmarks/targets.md, beside the demo model's.

The models are built exactly as ``bench_targets.py`` builds them (its settings, calibration and refits:
MLP -20% and -30% with ``hybrid`` + refit on 32,768 tokens; one KV group with ``activation`` heads +
refit on 8,192; 4 blocks, ``contiguous`` + linear replacement on 8,192), no healing. Each, and the base,
is scored on the default tasks (arc_easy, hellaswag, piqa, winogrande) on the same ``--sample-size``
seeded items per task: ``acc`` and ``acc_norm`` with 95% bootstrap intervals, the mean over tasks, the
paired change vs the base (paired bootstrap over the same items), WikiText-2 test perplexity (16 x 512
tokens, the targets' protocol) and the cost of the zero-shot measurement in seconds per 100 items.

    python bench/bench_zeroshot_targets.py --threads 2                    # ~25 min on 2 quiet cores
    python bench/bench_zeroshot_targets.py --quick                        # tiny budget, a few minutes

The default ``--sample-size 100`` fits the run in about 25 minutes on 2 quiet cores (pruning the four
models takes about 13 of them, as in targets.md; scoring 100 items of each task about 2 minutes a
model). It buys a 95% interval of about +-10 points per task (binomial at acc ~50%) and about +-5 on the
mean over the four tasks; the paired change vs the base is narrower by how few answers flip.

The report is the "targets" section of <out>/zeroshot.md (the parity section of bench_zeroshot.py is
kept). Further flags: the shared ones of ``bench/common.py``.
"""

from __future__ import annotations

import time

from bench_targets import pruned_targets, target_workload
from common import Report, base_parser, measure, setup

from optipfair_train.zeroshot import DEFAULT_TASKS, load_tasks, zeroshot_change, zeroshot_scores

TITLE = "Zero-shot accuracy of the one-shot pruning targets (demo model, no healing)"


def _interval(entry: dict, key: str, signed: bool = False) -> str:
    if entry.get(key) is None:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    low, high = entry[f"{key}_ci_low"], entry[f"{key}_ci_high"]
    return f"{f.format(entry[key])} [{f.format(low)}, {f.format(high)}]"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--sample-size", type=int, default=100, help="seeded items per task, the same for every model"
    )
    args = parser.parse_args()
    setup(args)
    report = Report("zeroshot", TITLE, args.out, section=True)
    work = target_workload(args)
    sample = 4 if args.quick else args.sample_size
    tasks = load_tasks(DEFAULT_TASKS)
    rows, summary, results, base_ppl = [], [], {}, []

    def add(size: str, method: str, model, prune_seconds: str) -> None:
        quality = measure(model, work, crows=False)
        start = time.perf_counter()
        result = zeroshot_scores(model, work.tokenizer, tasks, sample_size=sample, seed=0)
        seconds = time.perf_counter() - start
        results[size] = result
        change = zeroshot_change(results["base"], result)
        n = sum(t["num_items"] for t in result["tasks"].values())
        pruned = size != "base"
        for name, entry in result["tasks"].items():
            c = change["tasks"][name]
            rows.append(
                [size, name, entry["num_items"], _interval(entry, "acc"), _interval(entry, "acc_norm"),
                 _interval(c, "acc_change", signed=True) if pruned else "-",
                 f"{c['flipped']:.0f}" if pruned else "-",
                 f"{100 * entry['seconds'] / entry['num_items']:.1f}"]
            )  # fmt: skip
        base_ppl.append(quality["perplexity"])  # the base is measured first
        summary.append(
            [size, method, f"{quality['parameters']:,}", f"{quality['perplexity']:.2f}",
             f"{quality['perplexity'] / base_ppl[0]:.2f}", _interval(result["mean"], "acc"),
             _interval(change["mean"], "acc_change", signed=True) if pruned else "-",
             f"{100 * seconds / n:.1f}", prune_seconds]
        )  # fmt: skip
        print(summary[-1], flush=True)

    add("base", "unpruned", work.model, "-")
    for size, method, _, prune_seconds, model in pruned_targets(work, args.quick):
        add(size, method, model, f"{prune_seconds:.0f}")
        del model
    report.text(
        f"{sample} seeded items per task (seed 0; the same items for every model), scored as "
        "lm-evaluation-harness 0.4.13 scores them (parity: the parity sections). Intervals: 95% percentile "
        "bootstrap over items; the change vs base is paired (each resample draws the same items for both "
        "models, so only items whose answer flipped move it). `s / 100 items` is the zero-shot measurement's "
        "time (all choices of 100 items of that task; in the mean table, per 100 items of any task) and "
        "moves with the machine's load; `prune s` is the prune_model call. Perplexity: WikiText-2 test, "
        f"{work.eval_tokens:,} tokens in {work.eval_seq_len}-token sequences. At {sample} items a task's "
        f"95% interval spans about +-{196 * (0.25 / sample) ** 0.5:.0f} points at acc ~50%, the mean over "
        f"the four tasks about +-{196 * (0.25 / (4 * sample)) ** 0.5:.0f}."
    )
    report.table(
        ["model", "method", "parameters", "perplexity", "ratio to base", "mean acc [95% CI]",
         "mean change vs base [95% CI]", "s / 100 items", "prune s"],
        summary, title="Mean over the four tasks",
    )  # fmt: skip
    report.table(
        ["model", "task", "items", "acc [95% CI]", "acc_norm [95% CI]", "acc change vs base [95% CI]",
         "items flipped %", "s / 100 items"],
        rows, title="Per task",
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
