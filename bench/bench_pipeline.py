"""The prune-then-heal demo's before/after table: parameters, WikiText-2 perplexity, CrowS-Pairs score
with its 95% interval, and generation speed, base vs final model measured side by side in one run.

The pipeline itself evaluates on the demo text (always on the machine); this script re-measures its
result on the benchmark data, so the README's demo command can be judged on standard text.

Usage:
    python bench/bench_pipeline.py --run-dir outputs/demo   # a finished run (README's first command)
    python bench/bench_pipeline.py                          # runs configs/demo.yaml first (~8 min)
    python bench/bench_pipeline.py --quick                  # 1 round, 6 healing steps, 40 pairs

Full mode scores 16 x 512 WikiText-2 test tokens and all 1,508 CrowS-Pairs pairs per model
(~10 min on 2 CPU cores after the run).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import ROOT, Report, base_parser, crows_cell, load_workload, measure, setup

from optipfair_train.evaluation import tokens_per_second
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pruning import load_pruned_model


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


def speed(models: dict, tokenizer, rounds: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Median prefill/decode tokens/s per model, measured in alternating order, round after round."""
    samples: dict[str, list[dict]] = {name: [] for name in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            samples[name].append(tokens_per_second(models[name], tokenizer, batch_size=batch_size, runs=1))
    return {
        name: {
            key: statistics.median(s[key] for s in runs)
            for key in ("prefill_tokens_per_second", "decode_tokens_per_second")
        }
        for name, runs in samples.items()
    }


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
        report = Report("pipeline", "The prune-then-heal demo, before and after", args.out)
        work = load_workload(
            args,
            eval_tokens=(2 if args.quick else 16) * 512,
            crows_sample=args.crows_sample or (40 if args.quick else None),
        )
        models = {"base": work.model, "final": load_pruned_model(final)}
        rounds = [
            line for line in (final / "README.md").read_text().splitlines() if line.startswith("- round")
        ]
        report.text(
            f"Final model: `{final}`, from `{args.config.name if not args.run_dir else args.run_dir}`. Pruning:\n"
            + "\n".join(rounds)
        )
        quality = {name: measure(model, work) for name, model in models.items()}
        pairs = work.crows_sample or len(work.crows_pairs)
        batch1 = speed(models, work.tokenizer, rounds=3 if args.quick else 7, batch_size=1)
        batch8 = speed(models, work.tokenizer, rounds=2 if args.quick else 5, batch_size=8)
        rows = []
        for name in models:
            q = quality[name]
            rows.append(
                [
                    name,
                    f"{q['parameters']:,}",
                    f"{q['perplexity']:.2f}",
                    crows_cell(q),
                    f"{batch1[name]['prefill_tokens_per_second']:.0f}",
                    f"{batch1[name]['decode_tokens_per_second']:.1f}",
                    f"{batch8[name]['decode_tokens_per_second']:.1f}",
                ]
            )
        b1, b8 = batch1, batch8
        rows.append(
            [
                "final / base",
                f"{quality['final']['parameters'] / quality['base']['parameters']:.3f}",
                f"{quality['final']['perplexity'] / quality['base']['perplexity']:.3f}",
                f"{quality['final'].get('crows', 0) - quality['base'].get('crows', 0):+.1f} points",
                f"x{b1['final']['prefill_tokens_per_second'] / b1['base']['prefill_tokens_per_second']:.2f}",
                f"x{b1['final']['decode_tokens_per_second'] / b1['base']['decode_tokens_per_second']:.2f}",
                f"x{b8['final']['decode_tokens_per_second'] / b8['base']['decode_tokens_per_second']:.2f}",
            ]
        )
        report.table(
            [
                "model",
                "parameters",
                f"WikiText-2 perplexity ({work.eval_tokens:,} tokens)",
                f"CrowS-Pairs [95% CI] ({pairs} pairs)",
                "prefill tok/s (b1)",
                "decode tok/s (b1)",
                "decode tok/s (b8)",
            ],
            rows,
        )
        report.write()


if __name__ == "__main__":
    main()
