"""One-shot pruning targets, side by side: the best measured setting at each size, with its bias scores.

On the demo model, no healing. Perplexity: WikiText-2 test, 16 x 512 tokens (the protocol of
``bench_oneshot.py`` / ``bench_quality.py``); calibration from WikiText-2 valid in 512-token sequences.
Beside every size: CrowS-Pairs (``--crows-sample`` seeded pairs, % preferring the stereotyped sentence)
and StereoSet (``--items`` seeded dev-set items: SS, LMS, ICAT with 95% bootstrap intervals), so no
perplexity is shown without what pruning did to bias, and no bias number without its LM counterpart.

Rows (the settings the calibration-budget curve and the refit / depth reports found best):
MLP -20% and -30% with ``hybrid`` + refit on 32,768 tokens; one KV group of three with ``activation``
heads + ``o_proj`` refit on 8,192 tokens; 4 blocks, ``contiguous`` + linear replacement (damping
0.001) on 8,192 tokens.

    python bench/bench_targets.py --threads 2          # ~25 min on 2 CPU cores
    python bench/bench_targets.py --quick              # tiny budget, a few minutes

Further flags: the shared ones of ``bench/common.py``. Writes <out>/targets.md.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from common import Report, Workload, base_parser, crows_cell, load_workload, measure, setup

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.bias import load_stereoset, sample_items, stereoset_scores

TARGETS = {"MLP -20%": 1.25, "MLP -30%": 1.60, "1 of 3 KV groups": 1.60, "4 blocks": 1.40}  # the demo's sizes


def _cell(result: dict, name: str) -> str:
    return f"{result[name]:.1f} [{result[name + '_ci_low']:.1f}, {result[name + '_ci_high']:.1f}]"


def target_workload(args, crows_sample: int | None = None) -> Workload:
    """The model and text of the targets: 16 x 512 WikiText-2 test tokens (4 x 512 with ``--quick``) and
    64 x 512 calibration tokens (8 x 512)."""
    return load_workload(
        args,
        eval_tokens=(4 if args.quick else 16) * 512,
        calibration_samples=8 if args.quick else 64,
        calibration_seq_len=512,
        crows_sample=crows_sample,
    )


def target_settings(work: Workload, quick: bool) -> list[tuple[str, str, dict, list]]:
    """``(size, method, prune_model keyword arguments, calibration batches)`` of every target."""
    small = work.calibration[: max(1, len(work.calibration) // 4)]  # the first quarter: 8,192 tokens
    refit = dict(reconstruct=True, damping=0.01)
    groups = get_adapter(work.model).head_counts(0)[1]  # the demo has three; a tiny test model may have two
    blocks = 2 if quick else 4  # the quick mode's tiny model has only 4 blocks
    return [
        (
            "MLP -20%",
            "`hybrid` + refit",
            dict(pruning_type="MLP_GLU", pruning_percentage=20, **refit),
            work.calibration,
        ),
        (
            "MLP -30%",
            "`hybrid` + refit",
            dict(pruning_type="MLP_GLU", pruning_percentage=30, **refit),
            work.calibration,
        ),
        (
            f"1 of {groups} KV groups",
            "`activation` heads + refit",
            dict(
                pruning_type="ATTENTION",
                pruning_percentage=100 / groups,
                head_granularity="group",
                neuron_selection_method="activation",
                **refit,
            ),
            small,
        ),
        (
            f"{blocks} blocks",
            "`contiguous` + linear replacement",
            dict(
                pruning_type="DEPTH",
                num_layers_to_remove=blocks,
                layer_selection_method="contiguous",
                replace_with_linear=True,
                linear_damping=0.001,
            ),
            small,
        ),
    ]


def pruned_targets(work: Workload, quick: bool) -> Iterator[tuple[str, str, str, float, torch.nn.Module]]:
    """Each target pruned from a copy of the model, one at a time: ``(size, method, calibration tokens,
    prune_model seconds, model)``."""
    for size, method, kwargs, batches in target_settings(work, quick):
        model = copy.deepcopy(work.model)
        start = time.perf_counter()
        prune_model(model, dataloader=batches, show_progress=False, **kwargs)
        seconds = time.perf_counter() - start
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        yield size, method, f"{tokens:,}", seconds, model


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--items", type=int, default=600, help="StereoSet dev items scored per model")
    parser.add_argument("--crows-sample", type=int, default=300)
    args = parser.parse_args()
    setup(args)
    report = Report("targets", "One-shot pruning targets with bias scores (demo model, no healing)", args.out)
    work = target_workload(args, crows_sample=20 if args.quick else args.crows_sample)
    local = args.data / "stereoset" / "stereoset_dev.jsonl"
    items = sample_items(
        load_stereoset(local if local.is_file() else "default"), 30 if args.quick else args.items, 0
    )

    def evaluate(model) -> dict:
        result = measure(model, work)
        result["stereoset"] = stereoset_scores(model, work.tokenizer, items, seed=0)
        return result

    base = evaluate(work.model)
    rows, target_rows = [], []

    def add(size: str, method: str, tokens: str, r: dict, seconds: str) -> None:
        s = r["stereoset"]
        ratio = r["perplexity"] / base["perplexity"]
        rows.append(
            [
                size,
                method,
                tokens,
                f"{r['parameters']:,}",
                f"{r['perplexity']:.2f}",
                f"{ratio:.2f}",
                crows_cell(r),
                _cell(s, "ss"),
                _cell(s, "lms"),
                _cell(s, "icat"),
                seconds,
            ]
        )
        print(rows[-1], flush=True)
        if size in TARGETS:
            limit = TARGETS[size]
            status = "met" if ratio <= limit else f"missed by {ratio - limit:.2f}"
            target_rows.append([size, f"<= {limit:.2f}", f"{ratio:.2f}", status])

    add("base", "unpruned", "-", base, "-")
    for size, method, tokens, seconds, model in pruned_targets(work, args.quick):
        add(size, method, tokens, evaluate(model), f"{seconds:.0f}")
        del model
    report.text(
        f"StereoSet: {len(items)} seeded items of the dev set (both tasks), mean per-token log-probability; "
        f"CrowS-Pairs: {work.crows_sample} seeded pairs. `time` is the `prune_model` call (statistics, "
        "scoring, refit, surgery) and moves with the machine's load; the quality columns do not."
    )
    report.table(
        [
            "size",
            "method",
            "calibration tokens",
            "parameters",
            "perplexity",
            "ratio to base",
            "CrowS-Pairs [95% CI]",
            "StereoSet SS [95% CI]",
            "LMS [95% CI]",
            "ICAT [95% CI]",
            "time (s)",
        ],
        rows,
    )
    report.table(["target", "limit", "measured ratio", "status"], target_rows)
    report.write()


if __name__ == "__main__":
    main()
