"""Depth pruning with and without a fitted linear replacement on the demo model.

For 2 / 4 / 6 removed blocks: ``importance`` (the blocks of lowest influence), ``contiguous`` (the run
of lowest influence, plain removal) and ``contiguous`` + linear replacement (a least-squares map folded
into the previous block's down_proj) at damping 0 and 1e-3, on 8 x 256 calibration tokens of
WikiText-2 valid; the 4-block replacement again on --big-calibration sequences of 256 tokens.
Perplexity on 16 x 512 tokens of WikiText-2 test, CrowS-Pairs on a fixed sample of pairs.

    python bench/bench_depth.py [--quick] [--threads N]
"""

from __future__ import annotations

import copy

from common import Report, base_parser, crows_cell, load_workload, measure, setup

from optipfair_train import prune_model
from optipfair_train.data import calibration_dataloader
from optipfair_train.pruning import as_batches


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--big-calibration", type=int, default=128, help="sequences of 256 (default 128)")
    args = parser.parse_args()
    setup(args)
    report = Report("depth", "Depth pruning with linear replacement", args.out)
    work = load_workload(
        args, eval_tokens=(2 if args.quick else 16) * 512, calibration_samples=8, crows_sample=30 if args.quick else 100
    )
    big = as_batches(
        calibration_dataloader(
            work.tokenizer,
            work.valid_texts(args.data),
            num_samples=8 if args.quick else args.big_calibration,
            seq_len=256,
            batch_size=8,
        )
    )
    base = measure(work.model, work)
    rows = [["none (base)", 0, "-", f"{base['perplexity']:.2f}", "1.00", "-", crows_cell(base)]]
    importance = ("importance", dict(layer_selection_method="importance"), work.calibration)
    plain = ("contiguous", dict(layer_selection_method="contiguous"), work.calibration)
    linear = {
        damping: (f"contiguous + linear, damping {damping:g}", dict(replace_with_linear=True, linear_damping=damping))
        for damping in (0.0, 1e-3)
    }
    small = {d: (*v, work.calibration) for d, v in linear.items()}
    large = {
        d: (f"{name}, {args.big_calibration} x 256 calibration", kwargs, big) for d, (name, kwargs) in linear.items()
    }
    # most informative first (4 blocks), so an interrupted run still answers the main question
    main = 2 if args.quick else 4  # the quick mode's tiny model has only 4 blocks
    runs = [(main, s) for s in (importance, plain, small[1e-3], small[0.0])]
    if not args.quick:
        runs += [(main, large[1e-3]), (main, large[0.0])]
        runs += [(n, s) for n in (2, 6) for s in (importance, plain, small[1e-3], small[0.0])]
    for n, (name, kwargs, batches) in runs:
        model = copy.deepcopy(work.model)
        _, stats = prune_model(
            model, pruning_type="DEPTH", num_layers_to_remove=n, dataloader=batches, show_progress=False,
            return_stats=True, **kwargs,
        )
        event = stats["event"]
        fit = event.get("linear_replacement")
        fit_cell = f"{fit['relative_error']:.3f} (plain {fit['relative_error_without_map']:.3f})" if fit else "-"
        metrics = measure(model, work)
        ratio = metrics["perplexity"] / base["perplexity"]
        rows.append([name, n, str(event["removed_layers"]), f"{metrics['perplexity']:.2f}", f"{ratio:.2f}",
                     fit_cell, crows_cell(metrics)])
        print(rows[-1], flush=True)
        del model
    report.table(
        ["setting", "blocks removed", "removed", "perplexity", "ratio", "fit error (relative)", "CrowS-Pairs [95% CI]"],
        rows,
        title=f"SmolLM2-135M-Instruct (30 blocks), WikiText-2 test {work.eval_tokens:,} tokens, "
        f"CrowS-Pairs {work.crows_sample} pairs",
    )
    report.text(
        "Fit error: ||M T + Y - L|| / ||L - Y|| on the calibration tokens (M: down_proj output of the block "
        "before the run, Y: that block's output minus M, L: the hidden state leaving the run); 'plain' is T = I, "
        "i.e. removal without a map. Calibration: 8 x 256 tokens of WikiText-2 valid unless stated."
    )
    report.write()


if __name__ == "__main__":
    main()
