"""The bias vector (task arithmetic) as a fairness mode: on the demo compression and on the unpruned model.

One run, one seed. StereoSet is split by item, stratified by task and bias type (``split_items``, seed
``--seed``): the **held-out** half judges every model and nothing else; the build half is split again
(seed ``--seed + 1``) into a **fit** part, whose items' stereotype and anti-stereotype sentences train the
two fine-tunes the vector is the difference of (``fit_bias_vector``: ``--epochs``, lr ``--vector-lr``,
16 items a step), and a **tune** part, on which the strength is chosen from ``--strengths``: the one whose
tune SS is nearest 50 among those that keep tune LMS within 1.5 points and WikiText-2 *valid* perplexity
within 2.5% of the model without the vector (``--tune-items`` tune items; ties go to the smaller strength).

Models: base; the demo compression (``configs/demo.yaml``: MLP -20% ``hybrid`` + refit on 32 x 256 tokens
the unpruned model writes) healed with the demo's budget (60 LoRA steps, r=16, lr 2e-4, 4 x 128 demo-text
tokens a step, through the pipeline's ``heal``, which merges the adapters); that model minus its own bias vector at
the chosen strength; the base minus its own bias vector (``--no-unpruned`` skips it). Each model: SS / LMS /
ICAT per bias type on the held-out half (all of it by default), paired changes (same items), WinoBias
(``--wino`` items: the pronoun prior separated from the stereotype), WikiText-2 test perplexity, zero-shot
accuracy (``--zeroshot-items`` a task, paired intervals), and the target checks of the issue "Fairness that
acts" (the same as ``bench_fair_heal.py``).

Usage:
    python bench/bench_bias_vector.py --quick --threads 1     # smoke run (tiny budgets), ~5 min
    python bench/bench_bias_vector.py --threads 2 --zeroshot-items 25

Time: each vector is two fine-tunes of ``--epochs`` passes over the fit items (about 7 minutes a pass
pair on 2 cores for the 135M demo model); each model's held-out evaluation is a few minutes.

Writes ``<out>/bias-vector.md`` and ``<out>/bias-vector.json`` (scores without per-item records).
"""

from __future__ import annotations

import copy
import json
import time

from bench_fair_heal import SEQ_LEN, _heal, _summary, demo_compression, measured, mode_tables
from common import Progress, Report, base_parser, load_workload, setup
from heldout import add_heldout_flags, cell, scores_table, stereoset_halves

from optipfair_train.bias import (
    fit_bias_vector,
    sample_items,
    split_items,
    stereoset_change,
    stereoset_scores,
    subtract_bias_vector,
)
from optipfair_train.data import load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.heal import text_dataset
from optipfair_train.zeroshot import load_tasks


def _choose(model, vector, tokenizer, tune, valid, strengths, seed, log) -> tuple[float, list[list[str]]]:
    """The strength chosen on the tune items (module docstring), and the rows of the choice table."""
    ref = stereoset_scores(model, tokenizer, tune, seed=seed)
    ref_ppl = perplexity(model, input_ids=valid, seq_len=valid.shape[1])
    rows = [["none", f"{ref['ss']:.1f}", f"{ref['lms']:.1f}", "-", f"{ref_ppl:.2f}", "-"]]
    best, best_gap = None, None
    for strength in strengths:
        edited = copy.deepcopy(model)
        subtract_bias_vector(edited, vector, strength)
        r = stereoset_scores(edited, tokenizer, tune, seed=seed)
        ppl = perplexity(edited, input_ids=valid, seq_len=valid.shape[1])
        del edited
        lms = stereoset_change(ref, r, seed=seed)["lms_change"]
        ok = lms >= -1.5 and ppl <= 1.025 * ref_ppl
        gap = abs(r["ss"] - 50)
        if ok and (best_gap is None or gap < best_gap):
            best, best_gap = strength, gap
        rows.append([f"{strength:g}", f"{r['ss']:.1f}", f"{r['lms']:.1f}", f"{lms:+.1f}", f"{ppl:.2f}",
                     "yes" if ok else "no"])  # fmt: skip
        log(f"strength {strength:g}: tune SS {r['ss']:.1f} LMS {r['lms']:.1f} valid perplexity {ppl:.2f}")
    return (best if best is not None else min(strengths)), rows


def main() -> None:
    parser = base_parser(__doc__)
    add_heldout_flags(parser, items=None, wino=200, eval_tokens=4096)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--epochs", type=int, default=2, help="passes over the fit items per fine-tune")
    parser.add_argument("--vector-lr", type=float, default=2e-5)
    parser.add_argument("--tune-items", type=int, default=400)
    parser.add_argument("--steps", type=int, default=None, help="LoRA healing steps (60; quick 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--fair-batch", type=int, default=8)  # read by the shared _heal (no loss here)
    parser.add_argument(
        "--zeroshot-items", type=int, default=None, help="items per zero-shot task (50; quick 5)"
    )
    parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa,winogrande")
    parser.add_argument("--no-unpruned", action="store_true", help="skip the unpruned model's vector")
    args = parser.parse_args()
    quick = args.quick
    args.steps = args.steps or (2 if quick else 60)
    args.batch = 2 if quick else args.batch
    zs_items = args.zeroshot_items or (5 if quick else 50)
    setup(args)
    log = Progress()
    work = load_workload(
        args, eval_tokens=1024 if quick else args.eval_tokens, calibration_samples=1, crows_sample=0
    )
    teacher, tokenizer = work.model.eval(), work.tokenizer
    halves = stereoset_halves(args)
    fit, tune_all = split_items(halves.build, seed=args.seed + 1)
    fit = fit[:40] if quick else fit
    tune = sample_items(tune_all, 30 if quick else args.tune_items, args.seed)
    valid = tokenize_for_lm(
        tokenizer, load_texts(str(args.data / "wikitext-2" / "valid.txt")), seq_len=512, num_sequences=2
    )
    tasks = load_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    report = Report("bias-vector", "The bias vector (task arithmetic) as a fairness mode", args.out)

    pruned, written = demo_compression(teacher, tokenizer, args)
    texts = load_texts("demo", split="calibration")
    plain = text_dataset(tokenizer, texts, seq_len=SEQ_LEN, num_sequences=args.steps * args.batch)
    healed, heal_seconds = _heal(pruned, tokenizer, plain, args, 0.0, fit)
    log(f"pruned and healed ({heal_seconds:.0f} s)")
    results, choices = {}, {}

    def measure(name: str, model, extra: dict | None = None) -> None:
        r = measured(model, work, halves, tasks, zs_items, args.seed)
        r.update(extra or {})
        results[name] = r
        partial = {n: _summary(x) for n, x in results.items()}
        (args.out / "bias-vector.partial.json").write_text(json.dumps(partial, indent=1))
        s = r["stereoset"]
        log(
            f"{name}: SS {s['ss']:.1f} LMS {s['lms']:.1f} ppl {r['ppl']:.2f} zero-shot {r['zeroshot']['mean']['acc']:.1f}"
        )

    def debiased(name: str, model) -> tuple[str, str]:
        start = time.perf_counter()
        vector = fit_bias_vector(model, tokenizer, fit, epochs=args.epochs, learning_rate=args.vector_lr,
                                 seed=args.seed, show_progress=True)  # fmt: skip
        fit_seconds = time.perf_counter() - start
        log(f"{name}: vector fitted ({fit_seconds:.0f} s)")
        strength, rows = _choose(model, vector, tokenizer, tune, valid, args.strengths, args.seed, log)
        choices[name] = (strength, rows, fit_seconds)
        edited = copy.deepcopy(model)
        subtract_bias_vector(edited, vector, strength)
        after = f"{name} - bias vector x{strength:g}"
        measure(after, edited, {"heal_seconds": fit_seconds})
        return name, after

    measure("base", teacher)
    measure("pruned + heal", healed, {"heal_seconds": heal_seconds})
    modes = [debiased("pruned + heal", healed)]
    if not args.no_unpruned:
        modes.append(debiased("base", teacher))

    report.text(
        f"Model `{args.model_path}`. {halves.describe()} The build half split again (seed {args.seed + 1}): fit "
        f"{len(fit)} items (the vector's two fine-tunes: {args.epochs} epochs, AdamW lr {args.vector_lr:g}, 16 items a "
        f"step, mean token NLL of the stereotype / anti-stereotype sentence given its context), tune {len(tune)} of "
        f"{len(tune_all)} items (the strength's choice, with {valid.numel():,} WikiText-2 valid tokens). Compression: "
        f"MLP -20% `hybrid` + refit on {written.numel():,} tokens the unpruned model wrote; healing {args.steps} LoRA "
        f"steps (r=16, alpha 32, lr {args.lr:g}) of {args.batch} x {SEQ_LEN} demo-text tokens, adapters merged. "
        f"Perplexity: {work.eval_tokens:,} WikiText-2 test tokens. Zero-shot: {zs_items} items a task "
        f"({', '.join(tasks)}), paired intervals."
    )
    for name, (strength, rows, fit_seconds) in choices.items():
        report.table(
            ["strength", "tune SS", "tune LMS", "LMS change", "valid perplexity", "admissible"], rows,
            title=f"Choice of the strength for {name} (tune items only; vector fitted in {fit_seconds:.0f} s): {strength:g}",
        )  # fmt: skip
    types = scores_table(report, results, len(halves.eval_items))
    report.table(
        ["model", "zero-shot mean acc", *tasks, "eval s"],
        [[n, cell(r["zeroshot"]["mean"], "acc")] + [f"{r['zeroshot']['tasks'][t]['acc']:.1f}" for t in tasks]
         + [f"{r['seconds']:.0f}"] for n, r in results.items()],
        title="Zero-shot accuracy (95% bootstrap intervals) and evaluation times",
    )  # fmt: skip
    pairs = modes + [("base", n) for n in results if n != "base" and ("base", n) not in modes]
    mode_tables(report, results, modes, pairs, types, args.seed)
    path = report.write()
    summary = {"command": report.lines[4], "args": {k: str(v) for k, v in vars(args).items()},
               "strengths": {n: c[0] for n, c in choices.items()},
               "models": {n: _summary(r) for n, r in results.items()}}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    (args.out / "bias-vector.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
