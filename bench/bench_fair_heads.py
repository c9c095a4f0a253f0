"""Fairness-aware attention-head removal vs the same number of heads removed by activation, on held-out items.

Writes ``<out>/fair-heads.md``. Each query head's removal is measured once on StereoSet **build** items
(``head_ablation_effects``: bias reduction and LM cost per head, estimated to first order for all heads,
then ablated exactly for the ``--shortlist`` ranked first; ``--build-items`` of the build half,
``--build-types`` to keep some bias types only, plus ``--text-seqs`` WikiText-2 valid sequences whose
NLL rise joins the LM cost). Then, for every count in ``--heads`` (query heads removed in all; a
multiple of the KV heads per layer, since a unit is one query head in every group of a layer), two
models are cut through ``prune_model(pruning_type="ATTENTION", head_granularity="query",
layer_allocation="global")``: by the ``fairness`` score (``--lam`` weighs the LM cost) and by the plain
``activation`` score (the control: is a bias change the mode's, or any head removal's?). The base and
every cut model are evaluated on the **held-out** half only (bench/heldout.py): SS / LMS / ICAT per bias
type with paired changes vs base and fairness vs control, WinoBias rates, WikiText-2 test perplexity.
Asserts nothing.

Usage:
    python bench/bench_fair_heads.py --quick --threads 1   # a smoke run on tiny samples
    python bench/bench_fair_heads.py --threads 2 --all-gender --items 400 --wino 300 --eval-tokens 4096
"""

from __future__ import annotations

import copy
import time

from common import Report, base_parser, load_workload, setup
from heldout import add_heldout_flags, change_tables, evaluate, scores_table, stereoset_halves

from optipfair_train.arch import get_adapter
from optipfair_train.bias import sample_items
from optipfair_train.data import calibration_dataloader, load_texts
from optipfair_train.pruning import as_batches, prune_model
from optipfair_train.pruning.fair_heads import head_ablation_effects


def _cut(model, method: str, heads: int, **kwargs) -> tuple[object, list[tuple[int, int]]]:
    """A copy of ``model`` without ``heads`` query heads chosen globally by ``method``; the removed heads."""
    adapter = get_adapter(model)
    n_q, n_kv, _ = adapter.head_counts(0)
    units = adapter.num_layers * (n_q // n_kv)  # one unit: a query head in each KV group of a layer
    cut = copy.deepcopy(model)
    _, stats = prune_model(
        cut,
        pruning_type="ATTENTION",
        neuron_selection_method=method,
        head_granularity="query",
        layer_allocation="global",
        pruning_percentage=100 * (heads // n_kv) / units,
        return_stats=True,
        show_progress=False,
        **kwargs,
    )
    kept = {int(i): set(q) for i, q in stats["event"]["kept_query_heads"].items()}
    removed = [(i, h) for i in sorted(kept) for h in range(n_q) if h not in kept[i]]
    assert len(removed) == heads, (removed, heads)  # the engine removed exactly what was asked
    return cut, removed


def _heads_cell(removed: list[tuple[int, int]]) -> str:
    return " ".join(f"{i}.{h}" for i, h in removed)


def main() -> None:
    parser = base_parser(__doc__)
    add_heldout_flags(parser)
    parser.add_argument(
        "--heads", type=int, nargs="+", default=None, help="query heads removed (default 3 9)"
    )
    parser.add_argument(
        "--build-items", type=int, default=None, help="build items scored (default 48; quick 4)"
    )
    parser.add_argument(
        "--build-types", default="", help="comma-separated bias types to build on (default all)"
    )
    parser.add_argument("--lam", type=float, default=1.0, help="fairness_lambda: weight of the LM cost")
    parser.add_argument(
        "--shortlist",
        type=int,
        default=None,
        help="heads ablated exactly, those a first-order estimate ranks first (default 24; 0 = all)",
    )
    parser.add_argument(
        "--text-seqs",
        type=int,
        default=None,
        help="WikiText-2 valid sequences of 128 tokens in the LM cost (default 2)",
    )
    args = parser.parse_args()
    quick = args.quick
    setup(args)
    eval_tokens = args.eval_tokens or (1024 if quick else 8192)
    work = load_workload(args, eval_tokens=eval_tokens, calibration_samples=4 if quick else 16)
    model, tokenizer = work.model, work.tokenizer
    adapter = get_adapter(model)
    n_q, n_kv, _ = adapter.head_counts(0)
    counts = args.heads or ([n_kv] if quick else [3, 9])
    bad = [k for k in counts if k % n_kv or k <= 0]
    if bad:
        raise SystemExit(
            f"--heads {bad}: give multiples of the {n_kv} KV heads per layer (one head per group)."
        )
    halves = stereoset_halves(args)
    build = halves.build
    if args.build_types:
        wanted = set(args.build_types.split(","))
        build = [item for item in build if item.bias_type in wanted]
    build_items = sample_items(build, args.build_items or (4 if quick else 48), args.seed)
    text_seqs = 1 if quick else (2 if args.text_seqs is None else args.text_seqs)
    text = (
        as_batches(
            calibration_dataloader(
                tokenizer,
                load_texts(str(args.data / "wikitext-2" / "valid.txt")),
                num_samples=text_seqs,
                seq_len=128,
                batch_size=text_seqs,
            )
        )
        if text_seqs
        else None
    )

    report = Report("fair-heads", "Fairness-aware attention-head removal", args.out)
    report.text(
        f"Model `{args.model_path}` ({adapter.num_layers} layers x {n_q} query heads, {n_kv} KV heads). "
        + halves.describe()
        + f" Head scores from {len(build_items)} build items"
        + (f" of types {args.build_types}" if args.build_types else "")
        + f" and {text_seqs} x 128 tokens of WikiText-2 valid; fairness_lambda {args.lam:g}. Control: "
        f"`activation` head scores on {len(work.calibration)} calibration batches of WikiText-2 valid. "
        f"Perplexity: {work.eval_tokens} tokens of WikiText-2 test. Heads are removed globally "
        "(`layer_allocation='global'`, `head_granularity='query'`: one query head in every KV group of a "
        "layer per unit), no healing."
    )

    start = time.perf_counter()
    shortlist = args.shortlist if args.shortlist is not None else (2 if quick else 24)
    effects = head_ablation_effects(
        model,
        tokenizer,
        build_items,
        batches=text,
        shortlist=shortlist or None,
        fairness_lambda=args.lam,
        show_progress=True,
    )
    ablation_seconds = time.perf_counter() - start
    total_heads = adapter.num_layers * n_q
    report.text(
        f"Head effects on {len(build_items)} build items in {ablation_seconds:.0f} s: "
        + (
            f"first-order estimates of all {total_heads} heads, then exact ablation of the {shortlist} "
            "ranked first (the others keep their estimate). "
            if shortlist
            else f"exact ablation of all {total_heads} heads. "
        )
        + f"Intact model on the build items: bias margin {effects.base_bias_margin:+.4f} nats "
        f"(stereotype minus anti-stereotype), LM margin {effects.base_lm_margin:+.4f}"
        + (f", text NLL {effects.base_nll:.3f}" if effects.base_nll is not None else "")
        + "."
    )
    importance = effects.importance(args.lam)
    ranked = sorted((float(importance[i][h]), i, h) for i in importance for h in range(len(importance[i])))
    report.table(
        ["head (layer.head)", "bias reduction (nats)", "LM cost (nats)", "keep-importance", "measured"],
        [
            [f"{i}.{h}", f"{effects.bias_reduction[i][h]:+.4f}", f"{effects.lm_cost[i][h]:+.4f}", f"{v:+.4f}"]
            + ["exact" if effects.exact[i][h] else "first order"]
            for v, i, h in ranked[:12]
        ],
        title="The 12 heads the fairness score removes first (build items)",
    )

    models = {"base": model}
    removed_rows = []
    for k in counts:
        fair, fair_heads = _cut(
            model, "fairness", k, head_ablation=effects, fairness_lambda=args.lam, tokenizer=tokenizer
        )
        control, control_heads = _cut(model, "activation", k, dataloader=work.calibration)
        models[f"fairness -{k} heads"], models[f"activation -{k} heads"] = fair, control
        for name, heads in (("fairness", fair_heads), ("activation", control_heads)):
            reduction = sum(float(effects.bias_reduction[i][h]) for i, h in heads)
            cost = sum(float(effects.lm_cost[i][h]) for i, h in heads)
            removed_rows.append([f"{name} -{k}", _heads_cell(heads), f"{reduction:+.4f}", f"{cost:+.4f}"])
        print(
            f"-{k} heads: fairness {_heads_cell(fair_heads)}; activation {_heads_cell(control_heads)}",
            flush=True,
        )
    report.table(
        ["cut", "removed heads (layer.head)", "sum of bias reductions (build)", "sum of LM costs (build)"],
        removed_rows,
        title="Removed heads and their measured single-head effects on the build items",
    )

    results = {}
    for name, m in models.items():
        results[name] = r = evaluate(m, work, halves, args.seed)
        print(
            name,
            f"SS {r['stereoset']['ss']:.1f} LMS {r['stereoset']['lms']:.1f} ppl {r['ppl']:.2f}",
            flush=True,
        )
    types = scores_table(report, results, len(halves.eval_items))
    pairs = []
    for k in counts:
        fair, control = f"fairness -{k} heads", f"activation -{k} heads"
        pairs += [("base", fair), ("base", control), (control, fair)]
    change_tables(report, results, pairs, types, args.seed)
    report.text(
        "Evaluation time per model (StereoSet + perplexity + WinoBias): "
        + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in results.items())
        + "."
    )
    report.write()


if __name__ == "__main__":
    main()
