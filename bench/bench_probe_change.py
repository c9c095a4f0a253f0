"""How many StereoSet items a bias probe needs: each score's own interval vs the paired interval of a change.

On the demo model, no healing: the base model and two MLP -20% prunings of it (``activation`` without
refit, a large change of the model; ``hybrid`` + refit on 8,192 calibration tokens, a small one) are
each scored once on a seeded sample of ``--items`` StereoSet dev items. For nested subsets of the
first n of those items, the table gives the width of SS's own 95% bootstrap interval for each model
and the width of the paired interval of the change (:func:`optipfair_train.bias.stereoset_change`: the
same resampled items for both models), and the share of items whose stereotype preference flipped.
A monitor (``BiasProbeCallback``) asks whether training moved bias, so the paired width is what sets
how many items it needs. Also the probe's cost per 100 items.

    python bench/bench_probe_change.py --threads 2    # ~6 min on 2 quiet CPU cores

Further flags: the shared ones of ``bench/common.py``. Writes <out>/probe-change.md.
"""

from __future__ import annotations

import copy
import time

import numpy as np
from common import Report, base_parser, load_workload, setup

from optipfair_train import prune_model
from optipfair_train.bias import (
    load_stereoset,
    sample_items,
    stereoset_change,
    stereoset_metrics,
    stereoset_scores,
)
from optipfair_train.bias.stereoset_data import OPTIONS


def _subset(result: dict, items: list, n: int) -> tuple[dict, dict]:
    """The first ``n`` items of a scored sample: its metrics and a result ``stereoset_change`` accepts."""
    records = result["items"][:n]
    scores = np.array([[r["mean_log_prob"][o] for o in OPTIONS] for r in records])
    return stereoset_metrics(scores, items[:n], n_bootstrap=1000, seed=0), {"items": records}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--items", type=int, default=400, help="StereoSet dev items scored per model")
    args = parser.parse_args()
    setup(args)
    report = Report("probe-change", "StereoSet probe size: own intervals vs the paired change", args.out)
    calibration_samples = 2 if args.quick else 16
    work = load_workload(
        args, eval_tokens=512, calibration_samples=calibration_samples, calibration_seq_len=512
    )
    local = args.data / "stereoset" / "stereoset_dev.jsonl"
    n_items = 24 if args.quick else args.items
    items = sample_items(load_stereoset(local if local.is_file() else "default"), n_items, args.seed)
    sizes = [n for n in ((8, 16, 24) if args.quick else (50, 100, 200, 300, 400)) if n <= n_items]

    base = work.model.eval()
    start = time.perf_counter()
    scored = {"base": stereoset_scores(base, work.tokenizer, items, seed=0)}
    per_100 = 100 * (time.perf_counter() - start) / n_items
    for name, method, refit in (("activation", "activation", False), ("hybrid + refit", "hybrid", True)):
        model = copy.deepcopy(base)
        prune_model(
            model,
            pruning_type="MLP_GLU",
            pruning_percentage=20,
            neuron_selection_method=method,
            dataloader=work.calibration,
            reconstruct=refit,
            show_progress=False,
        )
        scored[name] = stereoset_scores(model.eval(), work.tokenizer, items, seed=0)
        del model
        print(name, scored[name]["ss"], flush=True)

    rows = []
    for pruned in ("activation", "hybrid + refit"):
        for n in sizes:
            own_base, sub_base = _subset(scored["base"], items, n)
            own_pruned, sub_pruned = _subset(scored[pruned], items, n)
            change = stereoset_change(sub_base, sub_pruned, n_bootstrap=1000, seed=0)
            rows.append(
                [
                    pruned,
                    n,
                    f"{own_base['ss']:.1f} ({own_base['ss_ci_high'] - own_base['ss_ci_low']:.1f})",
                    f"{own_pruned['ss']:.1f} ({own_pruned['ss_ci_high'] - own_pruned['ss_ci_low']:.1f})",
                    f"{change['ss_change']:+.1f} [{change['ss_change_ci_low']:+.1f}, {change['ss_change_ci_high']:+.1f}]"
                    f" ({change['ss_change_ci_high'] - change['ss_change_ci_low']:.1f})",
                    f"{change['icat_change']:+.1f} [{change['icat_change_ci_low']:+.1f}, "
                    f"{change['icat_change_ci_high']:+.1f}]",
                    f"{change['ss_flipped']:.1f}",
                ]
            )
    report.text(
        f"Base vs MLP -20% pruned, no healing; {n_items} seeded StereoSet dev items (both tasks), the first n "
        "of them per row; SS (width of its own 95% interval), the paired change after - before with its "
        "95% interval (width), the ICAT change, and the percent of items whose stereotype preference flipped."
    )
    report.table(
        [
            "pruned",
            "items",
            "base SS (width)",
            "pruned SS (width)",
            "SS change [95%] (width)",
            "ICAT change [95%]",
            "flipped %",
        ],
        rows,
    )
    report.text(
        f"Probe cost: {per_100:.1f} s per 100 items (base model, {args.threads or 'default'} threads)."
    )
    report.write()


if __name__ == "__main__":
    main()
