"""Healing after 20% MLP pruning: LoRA vs knowledge distillation vs both, measured along the way.

The demo model (SmolLM2-135M-Instruct) loses 20% of its MLP width (``activation`` scorer, calibrated on
WikiText-2 valid); three copies of the pruned model are then healed on WikiText-2 valid blocks:

* ``lora``: LoRA r=16, alpha=32 on every projection, plain ``transformers.Trainer``, lr 2e-4 (the
  pipeline's default);
* ``kd``: full-parameter distillation from the unpruned model (``DistillationTrainer``, temperature 2,
  alpha 0.9), lr 5e-5 (every weight moves, so a LoRA-sized rate would overshoot; checked on the tiny
  model and in the demo model's ``--quick`` run that the logged loss goes down);
* ``kd_lora``: the same distillation loss training LoRA adapters only, lr 2e-4.

Each method trains in ONE run; a ``TrainerCallback`` measures the model (eval mode, no gradients, train
mode restored) when the step count reaches each healing-token checkpoint: WikiText-2 test perplexity,
the fraction of the pruning gap closed ``(ppl_pruned - ppl_healed) / (ppl_pruned - ppl_base)`` and the
CrowS-Pairs score with its 95% bootstrap CI. Checkpoint 0 is the pruned model itself, measured once
(LoRA starts as an exact no-op). The learning-rate schedule is constant with a linear warmup of
``min(4096, max_tokens / 8)`` tokens (4 steps in full mode, none in ``--quick``), no decay: a
checkpoint is "healed for that many tokens", and the 8k/16k/32k points of a ``--max-tokens 65536`` run
follow the same schedule as those of the default run (a cosine schedule would anneal only at its own
end, so its early checkpoints would not be comparable). Healing time excludes the measurements.

Full mode: batches of 4 x 256 tokens (1,024 tokens per step), checkpoints at 0, 1/8, 1/4, 1/2 and all
of ``--max-tokens`` (default 32,768: 0, 4k, 8k, 16k, 32k); each measurement scores 8 x 512 test tokens
and 200 CrowS-Pairs pairs (about 40-60 s on 2 cores, 12 of them plus base and pruned: ~10 min of the
total). ``--quick``: batches of 2 x 256, checkpoints 0, 1k, 2k tokens, 2 x 512 test tokens, 30 pairs.

Usage:
    python bench/bench_healing.py                       # checkpoints up to 32k tokens (~25 min, 2 cores)
    python bench/bench_healing.py --max-tokens 65536    # up to 64k tokens (~45 min)
    python bench/bench_healing.py --quick               # a few minutes (< 2 min on a tiny model)
    python bench/bench_healing.py --methods lora kd     # a subset of the methods

Writes ``<out>/healing.md`` and ``<out>/healing-curves.png``.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
import time

import torch
from common import (
    Report,
    Workload,
    base_parser,
    crows_cell,
    gap_closed,
    healing_arguments,
    load_workload,
    measure,
    setup,
)
from transformers import Trainer, TrainerCallback, default_data_collator

from optipfair_train import prune_model
from optipfair_train.heal import DistillationTrainer, add_lora, text_dataset

METHODS = {
    "lora": "LoRA",
    "kd": "KD full-parameter",
    "kd_lora": "KD + LoRA",
}
AIM = 0.8  # the healing aim: close 80% of the perplexity gap the pruning opened


class CheckpointEval(TrainerCallback):
    """Measures the model when ``state.global_step`` reaches one of ``steps`` (inside the training run).

    ``seconds`` of each row is the wall time of healing so far, the measurements themselves excluded.
    """

    def __init__(self, work: Workload, steps: list[int], tokens_per_step: int, label: str):
        self.work, self.steps, self.tokens_per_step, self.label = work, set(steps), tokens_per_step, label
        self.rows: list[dict[str, float]] = []
        self.start = 0.0
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.eval_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        began = time.perf_counter()
        healing = began - self.start - self.eval_seconds
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = measure(model, self.work)
        finally:
            model.train(was_training)
        self.eval_seconds += time.perf_counter() - began
        metrics.update(tokens=state.global_step * self.tokens_per_step, seconds=healing)
        self.rows.append(metrics)
        print(
            f"[{self.label}] {metrics['tokens']:,} tokens: perplexity {metrics['perplexity']:.2f}, "
            f"CrowS {crows_cell(metrics)}, healing {healing:.0f} s (measuring took "
            f"{time.perf_counter() - began:.0f} s)",
            flush=True,
        )


def heal(
    method: str,
    pruned: torch.nn.Module,
    teacher: torch.nn.Module,
    work: Workload,
    dataset,
    args,
    total_steps: int,
    checkpoint_steps: list[int],
) -> tuple[list[dict[str, float]], list[float]]:
    """Heal a copy of ``pruned`` with ``method``; returns the checkpoint rows and the logged losses.

    Its own Trainer, not the pipeline's ``heal``: the curve needs a constant learning rate after warmup
    (``heal``'s is cosine, so its early points would not be comparable across run lengths).
    """
    torch.manual_seed(args.seed)
    model = copy.deepcopy(pruned).requires_grad_(True)
    if method in ("lora", "kd_lora"):
        model = add_lora(model, r=16, alpha=32)
    learning_rate = args.kd_lr if method == "kd" else args.lora_lr
    tokens_per_step = args.batch_size * args.seq_len
    warmup_steps = warmup(args)
    callback = CheckpointEval(work, checkpoint_steps, tokens_per_step, METHODS[method])
    with tempfile.TemporaryDirectory(prefix="bench-healing-") as output_dir:
        training_args = healing_arguments(
            output_dir,
            steps=total_steps,
            batch_size=args.batch_size,
            learning_rate=learning_rate,
            seed=args.seed,
            scheduler="constant_with_warmup",
            warmup_steps=warmup_steps,
            logging_steps=max(1, total_steps // 16),
        )
        kwargs = dict(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=default_data_collator,
            callbacks=[callback],
        )
        if method in ("kd", "kd_lora"):
            trainer = DistillationTrainer(teacher=teacher, temperature=2.0, alpha=0.9, **kwargs)
        else:
            trainer = Trainer(**kwargs)
        print(
            f"\n[{METHODS[method]}] {total_steps} steps of {tokens_per_step} tokens, lr {learning_rate:g} "
            f"(constant after {warmup_steps} warmup steps)",
            flush=True,
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    del trainer, model
    gc.collect()
    return callback.rows, losses


def loss_trend(losses: list[float]) -> str:
    """Mean logged training loss over the first and the last quarter of the run (batches differ a lot)."""
    if not losses:
        return "-"
    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    return f"{first:.3f} -> {last:.3f}"


def warmup(args) -> int:
    """Warmup steps: ``min(4096, max_tokens / 8)`` tokens' worth, rounded down (0 in ``--quick``).

    Transformers' warmup gives the first step a learning rate of 0, a real loss in a 4-step run.
    """
    return min(4096, args.max_tokens // 8) // (args.batch_size * args.seq_len)


def checkpoint_tokens(max_tokens: int, tokens_per_step: int, points: int) -> list[int]:
    """0 and ``max_tokens / 2**k`` for k < ``points`` (in whole steps, at least one step, no repeats)."""
    steps = {max(1, round(max_tokens / 2**k / tokens_per_step)) for k in range(points)}
    return [0] + [step * tokens_per_step for step in sorted(steps)]


def plot(report: Report, base: dict, pruned: dict, curves: dict[str, list[dict]]) -> None:
    from matplotlib.figure import Figure

    with_crows = "crows" in base
    fig = Figure(figsize=(11 if with_crows else 6, 4))
    axes = fig.subplots(1, 2 if with_crows else 1, squeeze=False)[0]
    ax = axes[0]
    for method, rows in curves.items():
        ax.plot(
            [r["tokens"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=METHODS[method]
        )
    ax.axhline(base["perplexity"], color="black", linestyle="--", label="base (unpruned)")
    ax.axhline(pruned["perplexity"], color="red", linestyle=":", label="pruned, not healed")
    ax.set_xlabel("healing tokens")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title("Perplexity while healing")
    ax.legend()
    if with_crows:
        ax = axes[1]
        for method, rows in curves.items():
            tokens = [r["tokens"] for r in rows]
            (line,) = ax.plot(tokens, [r["crows"] for r in rows], marker="o", label=METHODS[method])
            ax.fill_between(
                tokens,
                [r["crows_low"] for r in rows],
                [r["crows_high"] for r in rows],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.axhline(base["crows"], color="black", linestyle="--", label="base (unpruned)")
        ax.axhline(50.0, color="gray", linestyle=":", label="unbiased (50)")
        ax.set_xlabel("healing tokens")
        ax.set_ylabel("CrowS-Pairs score (95% CI band)")
        ax.set_title("CrowS-Pairs while healing")
        ax.legend()
    report.figure(fig, "curves", "Perplexity and CrowS-Pairs score against healing tokens")


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=20.0, help="MLP width removed (default 20)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="healing tokens per method (32768; quick 2048)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (4; quick 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per healing sequence")
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="learning rate of lora and kd_lora")
    parser.add_argument("--kd-lr", type=float, default=5e-5, help="learning rate of full-parameter kd")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (2048 if args.quick else 32768)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    setup(args)
    report = Report("healing", "Healing after 20% MLP pruning", args.out)
    work = load_workload(
        args,
        eval_tokens=(2 if args.quick else 8) * 512,
        calibration_samples=4 if args.quick else 8,
        crows_sample=30 if args.quick else 200,
    )
    tokens_per_step = args.batch_size * args.seq_len
    checkpoints = checkpoint_tokens(args.max_tokens, tokens_per_step, 2 if args.quick else 4)
    checkpoint_steps = [tokens // tokens_per_step for tokens in checkpoints[1:]]
    total_steps = checkpoint_steps[-1]

    base_model = work.model
    print("Measuring the base model ...", flush=True)
    base = measure(base_model, work)
    pruned_model = copy.deepcopy(base_model)
    prune_model(
        pruned_model,
        pruning_type="MLP_GLU",
        neuron_selection_method="activation",
        pruning_percentage=args.percentage,
        dataloader=work.calibration,
        show_progress=False,
        seed=args.seed,
    )
    print("Measuring the pruned model ...", flush=True)
    pruned = {**measure(pruned_model, work), "tokens": 0, "seconds": 0.0}
    dataset = text_dataset(
        work.tokenizer,
        work.valid_texts(args.data),
        seq_len=args.seq_len,
        num_sequences=total_steps * args.batch_size,
    )

    calibration_sequences = sum(batch["input_ids"].shape[0] for batch in work.calibration)
    report.text(
        f"MLP width -{args.percentage:g}% (`activation` scorer, {calibration_sequences} calibration "
        f"sequences of WikiText-2 valid), then each method heals its own copy on WikiText-2 valid blocks "
        f"({args.batch_size} x {args.seq_len} = {tokens_per_step:,} tokens per step, {total_steps} steps) "
        f"in one training run, measured at {', '.join(f'{t:,}' for t in checkpoints)} healing tokens. "
        f"Learning rate constant after a warmup of {warmup(args)} steps: LoRA and KD + LoRA {args.lora_lr:g}, KD "
        f"full-parameter {args.kd_lr:g}; KD from the unpruned model, temperature 2, alpha 0.9; LoRA r=16, "
        f"alpha=32 on every projection. Perplexity over {work.eval_tokens:,} WikiText-2 test tokens "
        f"(blocks of {work.eval_seq_len}); CrowS-Pairs score (50 = unbiased) with 95% bootstrap CI on "
        f"{work.crows_sample} pairs; healing seconds exclude the measurements."
    )
    report.table(
        ["model", "parameters", "perplexity", "CrowS-Pairs [95% CI]"],
        [
            ["base", f"{base['parameters']:,}", f"{base['perplexity']:.2f}", crows_cell(base)],
            [
                f"pruned (MLP -{args.percentage:g}%)",
                f"{pruned['parameters']:,}",
                f"{pruned['perplexity']:.2f}",
                crows_cell(pruned),
            ],
        ],
        title="Before healing",
    )

    curves: dict[str, list[dict]] = {}
    losses: dict[str, list[float]] = {}
    for method in args.methods:
        rows, losses[method] = heal(
            method, pruned_model, base_model, work, dataset, args, total_steps, checkpoint_steps
        )
        curves[method] = [pruned, *rows]
        report.table(
            ["healing tokens", "perplexity", "gap closed", "CrowS-Pairs [95% CI]", "healing time (s)"],
            [
                [
                    f"{r['tokens']:,}",
                    f"{r['perplexity']:.2f}",
                    f"{gap_closed(base['perplexity'], pruned['perplexity'], r['perplexity']):.0%}",
                    crows_cell(r),
                    f"{r['seconds']:.0f}",
                ]
                for r in curves[method]
            ],
            title=METHODS[method],
        )

    summary = []
    verdicts = []
    for method, rows in curves.items():
        final = rows[-1]
        gaps = [gap_closed(base["perplexity"], pruned["perplexity"], r["perplexity"]) for r in rows]
        summary.append(
            [
                METHODS[method],
                f"{final['perplexity']:.2f}",
                f"{gaps[-1]:.0%}",
                crows_cell(final),
                f"{final['seconds']:.0f}",
                loss_trend(losses[method]),
            ]
        )
        reached = [
            r["tokens"] for r, gap in zip(rows, gaps, strict=True) if not math.isnan(gap) and gap >= AIM
        ]
        if reached:
            verdicts.append(f"{METHODS[method]} reached it at {reached[0]:,} tokens")
        else:
            verdicts.append(f"{METHODS[method]} did not (best {max(gaps):.0%})")
    report.table(
        [
            "method",
            f"perplexity at {args.max_tokens:,} tokens",
            "gap closed",
            "CrowS-Pairs [95% CI]",
            "healing time (s)",
            "train loss, first -> last quarter of the run",
        ],
        summary,
        title="Summary",
    )
    report.text(
        f"Aim: close {AIM:.0%} of the perplexity gap (base {base['perplexity']:.2f}, pruned "
        f"{pruned['perplexity']:.2f}) within {args.max_tokens:,} healing tokens. " + "; ".join(verdicts) + "."
    )
    plot(report, base, pruned, curves)
    report.write()


if __name__ == "__main__":
    main()
