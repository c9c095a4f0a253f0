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
every cut model are evaluated on the **held-out** half only (bench/heldout.py; by default all 249 held-out
gender items plus 51 of the others, 200 WinoBias items, 4096 WikiText-2 test tokens): SS / LMS / ICAT per
bias type with paired changes vs base and fairness vs control, WinoBias rates, perplexity. ``--zeroed``
adds, per count, the model whose k first-ranked heads are zeroed one by one (no GQA unit: the score's
own reference, not a cut). Asserts nothing.

Usage:
    python bench/bench_fair_heads.py --quick --threads 1   # a smoke run on tiny samples
    python bench/bench_fair_heads.py --threads 2           # -9 heads, held-out sample as above
    python bench/bench_fair_heads.py --threads 2 --heads 3 9 --zeroed   # two more models per count
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from common import Report, base_parser, load_workload, setup
from heldout import add_heldout_flags, change_tables, evaluate, scores_table, stereoset_halves

from optipfair_train.arch import get_adapter, weight_out_in
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


def _zeroed(model, heads: list[tuple[int, int]]):
    """A copy of ``model`` whose ``heads`` write nothing (their o_proj columns zeroed; shapes unchanged)."""
    out = copy.deepcopy(model)
    adapter = get_adapter(out)
    with torch.no_grad():
        for i, h in heads:
            head_dim = adapter.head_counts(i)[2]
            weight_out_in(adapter.attention(i).o)[:, h * head_dim : (h + 1) * head_dim] = 0
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    return x.argsort().argsort().astype(float)


def _screen_table(effects, lam: float) -> tuple[list[str], list[list[str]]]:
    """How the first-order estimates of the shortlisted heads compare with their exact ablation."""
    est, rows = effects.first_order, []
    for name, exact, guess in (
        ("bias reduction", effects.bias_reduction, est.bias_reduction),
        ("LM cost", effects.lm_cost, est.lm_cost),
        ("keep-importance", effects.importance(lam), est.importance(lam)),
    ):
        a = np.array([float(exact[i][h]) for i in exact for h in range(len(exact[i])) if effects.exact[i][h]])
        b = np.array([float(guess[i][h]) for i in exact for h in range(len(exact[i])) if effects.exact[i][h]])
        spearman = np.corrcoef(_ranks(a), _ranks(b))[0, 1] if len(a) > 2 else float("nan")
        rows.append(
            [name, str(len(a)), f"{np.abs(a - b).mean():.4f}", f"{np.abs(a).mean():.4f}", f"{spearman:.2f}"]
        )
    return [
        "quantity",
        "heads",
        "mean abs error of the estimate",
        "mean abs exact value",
        "rank correlation",
    ], rows


def _heads_cell(removed: list[tuple[int, int]]) -> str:
    return " ".join(f"{i}.{h}" for i, h in removed)


def main() -> None:
    parser = base_parser(__doc__)
    add_heldout_flags(parser, items=300, all_gender=True, wino=200, eval_tokens=4096)
    parser.add_argument(
        "--heads",
        type=int,
        nargs="+",
        default=None,
        help="query heads removed (default 9; quick: one unit)",
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
        help="heads ablated exactly, those a first-order estimate ranks first (default 16; 0 = all)",
    )
    parser.add_argument(
        "--zeroed",
        action="store_true",
        help="also zero the k heads ranked first one by one (no GQA unit: the method's reference, not a cut)",
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
    eval_tokens = 1024 if quick else args.eval_tokens
    work = load_workload(args, eval_tokens=eval_tokens, calibration_samples=4 if quick else 16)
    model, tokenizer = work.model, work.tokenizer
    adapter = get_adapter(model)
    n_q, n_kv, _ = adapter.head_counts(0)
    counts = args.heads or ([n_kv] if quick else [9])
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
    shortlist = args.shortlist if args.shortlist is not None else (2 if quick else 16)
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
    if effects.first_order is not None:
        report.table(
            *_screen_table(effects, args.lam),
            title="First-order estimates vs exact ablation (shortlisted heads)",
        )
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
    start = time.perf_counter()
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
        if args.zeroed:
            zeroed_heads = [(i, h) for _, i, h in ranked[:k]]
            models[f"fairness {k} heads zeroed"] = _zeroed(model, zeroed_heads)
            reduction = sum(float(effects.bias_reduction[i][h]) for i, h in zeroed_heads)
            cost = sum(float(effects.lm_cost[i][h]) for i, h in zeroed_heads)
            removed_rows.append(
                [f"zeroed {k}", _heads_cell(zeroed_heads), f"{reduction:+.4f}", f"{cost:+.4f}"]
            )
    cut_seconds = time.perf_counter() - start
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
        if args.zeroed:
            pairs += [("base", f"fairness {k} heads zeroed")]
    change_tables(report, results, pairs, types, args.seed)
    report.text(
        f"Time: head effects {ablation_seconds:.0f} s, cuts (activation scores included) {cut_seconds:.0f} s. "
        "Evaluation time per model (StereoSet + perplexity + WinoBias): "
        + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in results.items())
        + "."
    )
    report.write()


if __name__ == "__main__":
    main()
