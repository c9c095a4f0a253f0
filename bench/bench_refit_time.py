"""Time of scoring + refit against one plain forward pass over the calibration set, interleaved repeats.

On the demo model, calibration 16 x 512 tokens of WikiText-2 valid: per repeat, one forward pass over
the calibration batches, then ``prune_model`` at MLP -20% with the ``activation`` scorer and the ridge
refit (damping 0.01), one-shot and sequential, each on a fresh copy of the model. Each prune's time is
divided by the forward pass of the same repeat, so a change of machine load between repeats moves both.

    python bench/bench_refit_time.py --threads 2 --repeats 3    # ~8 min on 2 quiet CPU cores

Further flags: the shared ones of ``bench/common.py``. Writes <out>/refit-time.md.

``--compare-ref COMMIT`` times the engine (``pruning_request`` + ``plan`` + ``apply``, and the
``prune_model`` built on them) against ``prune_model`` of the source tree at COMMIT (extracted with
``git archive`` into a temporary folder), on the same saved model and calibration batches (WikiText-2
valid, 32 x 256 tokens; quick 4 x 64), each prune in a fresh process (``engine_time_worker.py``) with
the same torch thread count, interleaved (old, new, new's ``prune_model``; the order reversed every other
repeat), for three settings: MLP width -20% by ``hybrid`` with the refit (the demo's), one KV group of
every layer by ``activation``, and a tenth of the blocks (at least one) by ``importance``. It replaces
the comparison section of <out>/refit-time.md (the section above it stays):

    python bench/bench_refit_time.py --threads 2 --repeats 3 --compare-ref a019fd7   # ~25 min, 2 cores
"""

from __future__ import annotations

import copy
import statistics
import time

from bench_reconstruction import _forward_seconds
from common import Report, base_parser, load_workload, setup
from engine_compare import compare_with_ref

from optipfair_train import prune_model


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compare-ref", metavar="COMMIT", help="time the engine against this commit's prune_model"
    )
    args = parser.parse_args()
    setup(args)
    if args.compare_ref:
        compare_with_ref(args)
        return
    report = Report("refit-time", "Scoring + refit time against one forward pass (demo model)", args.out)
    work = load_workload(args, eval_tokens=512, calibration_samples=16, calibration_seq_len=512)
    base = work.model.eval()
    tokens = sum(int(b["attention_mask"].sum()) for b in work.calibration)
    _forward_seconds(base, work.calibration[:1])  # warm-up: the first call pays one-off allocation
    rows, ratios = [], {False: [], True: []}
    for repeat in range(args.repeats):
        forward = _forward_seconds(base, work.calibration)
        for sequential in (False, True):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            prune_model(
                model,
                pruning_type="MLP_GLU",
                pruning_percentage=20,
                neuron_selection_method="activation",
                dataloader=work.calibration,
                reconstruct=True,
                damping=0.01,
                sequential=sequential,
                show_progress=False,
            )
            seconds = time.perf_counter() - start
            ratios[sequential].append(seconds / forward)
            rows.append(
                [
                    repeat,
                    "sequential" if sequential else "one-shot",
                    f"{forward:.1f}",
                    f"{seconds:.1f}",
                    f"{seconds / forward:.2f}x",
                ]
            )
            print(rows[-1], flush=True)
            del model
    report.text(
        f"MLP -20%, `activation` scorer, ridge refit (damping 0.01) on {tokens:,} calibration tokens."
    )
    report.table(["repeat", "refit", "forward (s)", "prune_model (s)", "ratio"], rows)
    report.text(
        "Median ratio: one-shot "
        f"{statistics.median(ratios[False]):.2f}x (range {min(ratios[False]):.2f}-{max(ratios[False]):.2f}), "
        f"sequential {statistics.median(ratios[True]):.2f}x "
        f"(range {min(ratios[True]):.2f}-{max(ratios[True]):.2f}); target <= 3x."
    )
    report.write()


if __name__ == "__main__":
    main()
