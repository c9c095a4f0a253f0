"""Allocation search: how to spend 12% / 25% / 50% fewer parameters across hidden, MLP width, heads and depth.

On the demo model. Calibration (scores and refits): 32 x 256 tokens of WikiText-2 valid; perplexity:
WikiText-2 test, 16 x 512 tokens (the protocol of bench_hidden.py). For each budget every default
candidate of ``optipfair_train.pruning.search`` (each axis alone; MLP width mixed with each other axis)
is pruned one-shot with the refit (``reconstruct=True``) and measured (the proxy); then the ``--top-k``
best and the best single-axis candidate are distilled ``--distill-steps`` steps (full-parameter ``kd``
from the unpruned model, the pipeline's healing, ``--distill-batch`` blocks of 128 WikiText-2 valid
tokens a step, lr 5e-5) and measured again. The report gives each budget's table, whether the proxy's
winner is also the winner after distillation, and the rank correlation (Spearman) over the distilled
candidates when there are three or more.

    python bench/bench_search.py --threads 2          # ~35 min on 2 quiet CPU cores
    python bench/bench_search.py --quick              # one budget, three candidates, a tiny run

Each budget's search state goes to ``--state-dir`` (default /tmp/bench-search; none with ``--quick``): a
stopped run, restarted with the same command, resumes after the last finished candidate (a state written
with other settings is refused: delete it). Further flags: the shared ones of
``bench/common.py``. Writes <out>/search.md.
"""

from __future__ import annotations

from pathlib import Path

from common import Progress, Report, base_parser, fmt_ppl, load_workload, measure, setup

from optipfair_train.data import tokenize_for_lm
from optipfair_train.pruning import search
from optipfair_train.pruning.search import shares_text

QUICK_CANDIDATES = [{"mlp": 1.0}, {"mlp": 0.5, "hidden": 0.5}, {"depth": 1.0}]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (average ranks for ties).

    Example:
        >>> spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0])
        0.5
    """

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def _agreement(rows: list[dict]) -> str:
    """Proxy winner vs winner after distillation, over the distilled candidates."""
    done = [r for r in rows if r["distilled_perplexity"] is not None]
    if len(done) < 2:
        return "fewer than two candidates distilled: no ranking to compare"
    by_proxy = min(done, key=lambda r: r["proxy_perplexity"])
    by_distill = min(done, key=lambda r: r["distilled_perplexity"])
    same = "same winner" if by_proxy is by_distill else "different winners"
    text = (
        f"{same}: one-shot {shares_text(by_proxy['shares'])}, after distillation "
        f"{shares_text(by_distill['shares'])} ({len(done)} candidates distilled)"
    )
    if len(done) >= 3:
        rho = spearman([r["proxy_perplexity"] for r in done], [r["distilled_perplexity"] for r in done])
        text += f"; Spearman {rho:.2f}"
    return text


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=None, help="fractions of parameters removed"
    )
    parser.add_argument("--distill-steps", type=int, default=None)
    parser.add_argument("--distill-batch", type=int, default=2, help="128-token blocks per distillation step")
    parser.add_argument(
        "--top-k", type=int, default=2, help="candidates distilled besides the best single axis"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="search states (default /tmp/bench-search; --quick: none)",
    )
    args = parser.parse_args()
    setup(args)
    budgets = args.budgets or ([0.25] if args.quick else [0.12, 0.25, 0.5])
    state_dir = args.state_dir or (None if args.quick else Path("/tmp/bench-search"))
    steps = args.distill_steps if args.distill_steps is not None else (2 if args.quick else 40)
    report = Report("search", "Allocation search across axes (demo model)", args.out)
    work = load_workload(
        args, eval_tokens=(2 if args.quick else 16) * 512, calibration_samples=4 if args.quick else 32
    )
    log = Progress()
    base = work.model.eval()
    base_ppl = measure(base, work, crows=False)["perplexity"]
    distill_data = tokenize_for_lm(
        work.tokenizer,
        work.valid_texts(args.data),
        seq_len=128,
        num_sequences=max(1, steps * args.distill_batch),
    )
    log(f"base perplexity {base_ppl:.2f}")
    report.text(
        f"Base perplexity {base_ppl:.2f}. Calibration {sum(int(b['attention_mask'].sum()) for b in work.calibration):,} "
        f"tokens of WikiText-2 valid; perplexity on {work.eval_tokens:,} tokens of WikiText-2 test. One-shot: "
        f"scores and refit (damping 0.01) on the calibration tokens. Distillation: {steps} steps of "
        f"{args.distill_batch} x 128 WikiText-2 valid tokens, full-parameter kd from the unpruned model "
        f"(T=2, alpha 0.9, lr 5e-5, cosine), for the {args.top_k} best one-shot candidates and the best "
        "single-axis one. 'ratio' is perplexity / base."
    )
    for budget in budgets:
        result = search(
            base,
            fraction=budget,
            candidates=QUICK_CANDIDATES if args.quick else None,
            calibration=work.calibration,
            eval_batches=work.test_ids,
            reconstruct=True,
            distill_steps=steps,
            distill_top=args.top_k,
            distill_data=distill_data,
            distill_batch_size=args.distill_batch,
            seed=args.seed,
            state_path=None if state_dir is None else state_dir / f"search-{budget:g}.json",
        )
        rows = []
        for i, row in enumerate(result.rows):
            ppl, healed = row["proxy_perplexity"], row["distilled_perplexity"]
            counts = ", ".join(f"{a} {n}" for a, n in (row["counts"] or {}).items())
            rows.append(
                [
                    shares_text(row["shares"]) + (" **(chosen)**" if i == result.chosen else ""),
                    counts or "-",
                    "-" if row["parameters"] is None else f"{row['parameters']:,}",
                    "-" if ppl is None else fmt_ppl(ppl),
                    "-" if ppl is None else f"{ppl / base_ppl:.2f}x",
                    "-" if healed is None else fmt_ppl(healed),
                    "-" if healed is None else f"{healed / base_ppl:.2f}x",
                    f"{row['seconds']:.0f}",
                    row["note"][:90],
                ]
            )
        header = [
            "candidate",
            "units removed",
            "parameters",
            "one-shot",
            "ratio",
            "distilled",
            "ratio",
            "s",
            "note",
        ]
        title = f"{budget:.0%} fewer parameters (at most {result.target:,} of {result.parameters_before:,})"
        report.table(header, rows, title=title)
        report.text(f"Proxy vs distillation: {_agreement(result.rows)}.")
        log(f"budget {budget:g} done")
    report.write()


if __name__ == "__main__":
    main()
