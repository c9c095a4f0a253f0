"""The prune-then-heal run's card, re-measured independently, then on a wider protocol.

1. **Card check**: the run's base model and its final folder are loaded again (the final one with plain
   ``AutoModelForCausalLM.from_pretrained``) and the card's numbers are measured a second time: perplexity
   by this script's own loop (mean of the model's token loss over the same blocks, not the library's
   ``perplexity``), on the held-out ``eval_data`` and on the same WikiText-2 test tokens, and StereoSet
   SS / LMS / ICAT on the same seeded item sample. Card and re-measurement must agree (a column says by
   how much they differ).
2. **Wider protocol**: WikiText-2 test over 16 x 512 tokens (the benchmarks' protocol) and CrowS-Pairs
   (all 1,508 pairs; --crows-sample N), and generation speed, base vs final interleaved (batch 1 and 8).

Usage:
    python bench/bench_pipeline.py --run-dir outputs/demo   # a finished run (README's first command)
    python bench/bench_pipeline.py                          # runs configs/demo.yaml first
    python bench/bench_pipeline.py --quick                  # 1 round, 6 healing steps, 40 pairs
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from common import ROOT, Report, base_parser, crows_cell, load_workload, measure, setup
from transformers import AutoModelForCausalLM

from optipfair_train.bias import load_stereoset, sample_items, stereoset_scores
from optipfair_train.data import load_texts, tokenize_for_lm
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.evaluate import resolve_general_text
from optipfair_train.pipeline.run_state import STATE_NAME, RunState
from optipfair_train.speed import compare_speed, speed_line

CARD_METRICS = ("perplexity", "perplexity/general", "stereoset/ss", "stereoset/lms", "stereoset/icat")


def run_pipeline(args, out: Path) -> Path:
    """Run ``args.config`` (with ``--model-path`` and, in quick mode, a short schedule) into ``out``."""
    overrides = ["--model_path", args.model_path, "--output_dir", str(out), "--report_to", "none"]
    if args.quick:
        overrides += [
            "--num_rounds",
            "1",
            "--heal_steps",
            "6",
            "--eval_tokens",
            "1024",
            "--save_steps",
            "100",
        ]
    PruneThenHeal(load_config(args.config, overrides)).run()
    return out / "final"


def own_perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token loss) over ``blocks``, each block one forward pass with the model's own loss."""
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for block in blocks:
            ids = block.unsqueeze(0)
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def remeasure(model, tokenizer, config: dict, seed: int) -> dict[str, float]:
    """The card's metrics of ``model``, measured again on the same tokens and items."""
    d = config["data"]
    blocks = max(1, d["eval_tokens"] // d["eval_seq_len"])

    def held_out(source: str) -> torch.Tensor:
        texts = load_texts(source, split="evaluation")
        return tokenize_for_lm(tokenizer, texts, seq_len=d["eval_seq_len"], num_sequences=blocks)

    result = {"perplexity": own_perplexity(model, held_out(d["eval_data"]))}
    general, _ = resolve_general_text(d["general_eval_data"])
    if general:
        result["perplexity/general"] = own_perplexity(model, held_out(general))
    if d["stereoset_data"]:
        items = sample_items(load_stereoset(d["stereoset_data"]), d["stereoset_sample_size"], seed=seed)
        scores = stereoset_scores(model, tokenizer, items, seed=seed)
        result.update({f"stereoset/{name}": scores[name] for name in ("ss", "lms", "icat")})
    return result


def card_check(report: Report, run_dir: Path, final: Path) -> None:
    state = RunState.load(run_dir / STATE_NAME)
    if state is None:
        raise SystemExit(f"{run_dir} holds no {STATE_NAME}: pass the output folder of a finished run.")
    config, seed = state.config, state.config["run"]["seed"]
    base, tokenizer = load_model_and_tokenizer(config["model"]["model_path"])
    card = {"base": state.baseline, "final": state.rounds[-1]["healed"]}
    models = {"base": base, "final": AutoModelForCausalLM.from_pretrained(final)}
    rows = []
    for stage, model in models.items():
        again = remeasure(model, tokenizer, config, seed)
        for metric in CARD_METRICS:
            if metric in again and metric in card[stage]:
                on_card, measured = card[stage][metric], again[metric]
                rows.append(
                    [stage, metric, f"{on_card:.4f}", f"{measured:.4f}", f"{abs(measured - on_card) / abs(on_card):.2e}"]
                )
    report.text(
        f"Card check: `{run_dir}/{STATE_NAME}` (the card's numbers) against a re-measurement of `{final}` "
        "reloaded with plain `from_pretrained` (perplexity by this script's own loss loop)."
    )
    report.table(["stage", "metric", "card", "re-measured", "relative difference"], rows)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, help="a finished PruneThenHeal output_dir (has final/)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--crows-sample", type=int, default=None, help="pairs scored (default all; quick 40)")
    args = parser.parse_args()
    setup(args)

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        final = args.run_dir / "final" if args.run_dir else run_pipeline(args, Path(tmp) / "run")
        if not (final / "config.json").is_file():
            raise SystemExit(f"No finished run in {final.parent}: {final} has no model.")
        report = Report("pipeline", "The prune-then-heal demo: its card re-measured, then a wider protocol", args.out)
        rounds = [
            line for line in (final / "README.md").read_text().splitlines() if line.startswith("- round")
        ]
        report.text(
            f"Final model: `{final}`, from `{args.config.name if not args.run_dir else args.run_dir}`. Pruning:\n"
            + "\n".join(rounds)
        )
        card_check(report, final.parent, final)
        work = load_workload(
            args,
            eval_tokens=(2 if args.quick else 16) * 512,
            crows_sample=args.crows_sample or (40 if args.quick else None),
        )
        models = {"base": work.model, "final": AutoModelForCausalLM.from_pretrained(final)}
        quality = {name: measure(model, work) for name, model in models.items()}
        pairs = work.crows_sample or len(work.crows_pairs)
        rows = [[name, f"{q['parameters']:,}", f"{q['perplexity']:.2f}", crows_cell(q)] for name, q in quality.items()]
        base, final_q = quality["base"], quality["final"]
        rows.append(
            [
                "final / base",
                f"{final_q['parameters'] / base['parameters']:.3f}",
                f"{final_q['perplexity'] / base['perplexity']:.3f}",
                f"{final_q.get('crows', 0) - base.get('crows', 0):+.1f} points",
            ]
        )
        report.table(
            ["model", "parameters", f"WikiText-2 perplexity ({work.eval_tokens:,} tokens)",
             f"CrowS-Pairs [95% CI] ({pairs} pairs)"],
            rows,
        )  # fmt: skip
        for batch_size in (1, 8):
            verdict = compare_speed(
                models["base"], models["final"], work.tokenizer, repeats=3 if args.quick else 7, batch_size=batch_size
            )
            report.text(f"Speed, batch {batch_size}: {speed_line(verdict)}")
        report.write()


if __name__ == "__main__":
    main()
