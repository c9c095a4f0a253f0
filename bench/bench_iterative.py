"""Iterative vs one-shot pruning to the same final size, with the same total LoRA healing tokens.

On the demo model (SmolLM2-135M-Instruct), MLP width -30% (``--percentage``, ``activation`` scorer,
calibrated on WikiText-2 valid) is reached two ways:

* one-shot: prune 30% at once, then heal with LoRA for T tokens;
* iterative: ``--rounds`` (3) rounds, each pruning an equal share of the ORIGINAL width (10 points: the
  pipeline's conversion, ``units_to_remove``: round 2 removes 10% of the original width from the
  current one, and the last round lands exactly on the one-shot width), re-scored on the current
  model's activations, then healed with LoRA for T / rounds tokens and merged (``merge_and_unload``)
  before the next round.

LoRA: r=16, alpha=32 on every projection, lr 2e-4 (the pipeline's default), batches of 4 x 256 tokens
(quick: 2 x 256), a fresh ``Trainer`` per healing with a cosine schedule over that healing and no
warmup (Transformers' warmup spends its first step at learning rate 0, which would cost the iterative
schedule one step per round). Each round heals on the next slice of the WikiText-2 valid blocks, so
both schedules see the same text once. T = 24,576 tokens (quick: 1,536).

Reported: final parameters and MLP width, WikiText-2 test perplexity (8 x 512 tokens; quick 2 x 512),
CrowS-Pairs score with its 95% bootstrap CI (200 pairs; quick 30), healing time, and the perplexity
right after each pruning step and after each healing.

Usage:
    python bench/bench_iterative.py            # ~15 min on 2 CPU cores (48 LoRA steps + measurements)
    python bench/bench_iterative.py --quick    # a few minutes (< 1 min on a tiny model)
    python bench/bench_iterative.py --percentage 40 --rounds 4

Writes ``<out>/iterative.md``.
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time

import torch
from common import Report, Workload, base_parser, crows_cell, healing_arguments, load_workload, measure, setup
from transformers import Trainer, default_data_collator

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.heal import add_lora, text_dataset
from optipfair_train.pruning import MLPWidthRequest, apply, plan
from optipfair_train.pruning.targets import units_to_remove


def width(model: torch.nn.Module) -> int:
    return get_adapter(model).mlp(0).intermediate_size


def prune(model: torch.nn.Module, work: Workload, percentage: float, seed: int) -> None:
    """MLP width -``percentage``% of the width, scored on ``model``'s own activations."""
    prune_model(
        model,
        pruning_type="MLP_GLU" if get_adapter(model).family.is_glu else "MLP",
        neuron_selection_method="activation",
        pruning_percentage=percentage,
        dataloader=work.calibration,
        show_progress=False,
        seed=seed,
    )


def heal(model: torch.nn.Module, dataset, args, seed: int, label: str) -> tuple[torch.nn.Module, float]:
    """LoRA-heal ``model`` on every block of ``dataset`` (one pass); returns the merged model and seconds.

    Its own Trainer, not the pipeline's ``heal``: this comparison needs no warmup (``heal`` warms up for
    steps // 10, at least one step, at learning rate 0 first, which would cost each iterative round a step).
    """
    torch.manual_seed(seed)
    peft_model = add_lora(model, r=16, alpha=32)
    steps = len(dataset) // args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-iterative-") as output_dir:
        training_args = healing_arguments(
            output_dir,
            steps=steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=seed,
            logging_steps=max(1, steps // 8),
        )
        trainer = Trainer(
            model=peft_model,
            args=training_args,
            train_dataset=dataset,
            data_collator=default_data_collator,
        )
        print(
            f"\n[{label}] LoRA healing: {steps} steps of {args.batch_size} x {args.seq_len} tokens",
            flush=True,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    merged = trainer.model.merge_and_unload()
    del trainer, peft_model
    gc.collect()
    return merged, seconds


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=30.0, help="final MLP width removed (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the iterative schedule")
    parser.add_argument(
        "--heal-tokens", type=int, default=None, help="total healing tokens T (24576; quick 1536)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (4; quick 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per healing sequence")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    args = parser.parse_args()
    args.heal_tokens = args.heal_tokens or (1536 if args.quick else 24576)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    setup(args)
    report = Report("iterative", "Iterative vs one-shot pruning", args.out)
    work = load_workload(
        args,
        eval_tokens=(2 if args.quick else 8) * 512,
        calibration_samples=4 if args.quick else 8,
        crows_sample=30 if args.quick else 200,
    )
    tokens_per_step = args.batch_size * args.seq_len
    steps_per_round = max(1, args.heal_tokens // tokens_per_step // args.rounds)
    sequences_per_round = steps_per_round * args.batch_size
    total_tokens = steps_per_round * args.rounds * tokens_per_step
    dataset = text_dataset(
        work.tokenizer,
        work.valid_texts(args.data),
        seq_len=args.seq_len,
        num_sequences=sequences_per_round * args.rounds,
    )
    if len(dataset) < sequences_per_round * args.rounds:
        raise SystemExit(f"Not enough WikiText-2 valid text for {total_tokens:,} healing tokens.")

    base_model = work.model
    original_width = width(base_model)
    print("Measuring the base model ...", flush=True)
    base = measure(base_model, work)

    # one-shot: prune everything, then heal for all T tokens
    trajectory = []
    model = copy.deepcopy(base_model)
    prune(model, work, args.percentage, args.seed)
    pruned_ppl = measure(model, work, crows=False)["perplexity"]
    print(f"[one-shot] width {width(model)}: perplexity {pruned_ppl:.2f} after pruning", flush=True)
    model, one_shot_seconds = heal(model, dataset, args, args.seed, "one-shot")
    one_shot = measure(model, work)
    trajectory.append(
        [
            "one-shot",
            f"-{original_width - width(model)} neurons ({args.percentage:g}% of {original_width})",
            width(model),
            f"{pruned_ppl:.2f}",
            f"{one_shot['perplexity']:.2f}",
        ]
    )
    one_shot.update(width=width(model), seconds=one_shot_seconds)
    del model
    gc.collect()

    # iterative: equal shares of the ORIGINAL width per round, each re-scored and healed on its own slice
    model = copy.deepcopy(base_model)
    iterative_seconds = 0.0
    for k in range(1, args.rounds + 1):
        current = width(model)
        neurons = units_to_remove(current, original_width, args.percentage * k / args.rounds)
        percentage = 100.0 * neurons / current
        if neurons:  # the round's unit count, scored on the current model's own activations
            request = MLPWidthRequest(remove=neurons, method="activation", calibrated=True, seed=args.seed)
            apply(model, plan(model, request, work.calibration))
        pruned_ppl = measure(model, work, crows=False)["perplexity"]
        print(f"[round {k}] width {width(model)}: perplexity {pruned_ppl:.2f} after pruning", flush=True)
        piece = dataset.select(range((k - 1) * sequences_per_round, k * sequences_per_round))
        model, seconds = heal(model, piece, args, args.seed + k, f"round {k}")
        iterative_seconds += seconds
        healed = measure(model, work, crows=k == args.rounds)  # CrowS-Pairs for the final model only
        healed_ppl = healed["perplexity"]
        print(f"[round {k}] perplexity {healed_ppl:.2f} after healing", flush=True)
        trajectory.append(
            [
                f"iterative, round {k}",
                f"-{neurons} neurons ({percentage:.1f}% of {current})",
                width(model),
                f"{pruned_ppl:.2f}",
                f"{healed_ppl:.2f}",
            ]
        )
    iterative = {**healed, "width": width(model), "seconds": iterative_seconds}

    report.text(
        f"MLP width -{args.percentage:g}% of {original_width} neurons per layer (`activation` scorer on "
        f"WikiText-2 valid), one-shot vs {args.rounds} rounds of equal shares of the original width. Both "
        f"heal with LoRA (r=16, alpha=32, every projection, lr {args.lr:g}, cosine, no warmup) for "
        f"{total_tokens:,} tokens in all ({args.batch_size} x {args.seq_len} tokens per step; the iterative "
        f"schedule {steps_per_round} steps per round on its own slice of WikiText-2 valid). Perplexity over "
        f"{work.eval_tokens:,} WikiText-2 test tokens (blocks of {work.eval_seq_len}); CrowS-Pairs score "
        f"(50 = unbiased) with 95% bootstrap CI on {work.crows_sample} pairs."
    )
    report.table(
        [
            "schedule",
            "parameters",
            "MLP width",
            "perplexity",
            "CrowS-Pairs [95% CI]",
            "healing tokens",
            "healing time (s)",
        ],
        [
            [
                "base (unpruned)",
                f"{base['parameters']:,}",
                original_width,
                f"{base['perplexity']:.2f}",
                crows_cell(base),
                0,
                "-",
            ],
            *[
                [
                    name,
                    f"{m['parameters']:,}",
                    m["width"],
                    f"{m['perplexity']:.2f}",
                    crows_cell(m),
                    f"{total_tokens:,}",
                    f"{m['seconds']:.0f}",
                ]
                for name, m in (("one-shot", one_shot), (f"iterative ({args.rounds} rounds)", iterative))
            ],
        ],
        title="Final models",
    )
    report.table(
        ["step", "pruned", "MLP width after", "perplexity after pruning", "perplexity after healing"],
        trajectory,
        title="Perplexity after each pruning step",
    )
    better = "iterative" if iterative["perplexity"] < one_shot["perplexity"] else "one-shot"
    report.text(
        f"Lower final perplexity: {better} ({iterative['perplexity']:.2f} iterative vs "
        f"{one_shot['perplexity']:.2f} one-shot, base {base['perplexity']:.2f}). The iterative rounds pay "
        f"{args.rounds} activation-scoring passes instead of one (not in the healing time)."
    )
    if one_shot["parameters"] != iterative["parameters"]:
        report.text(
            f"Note: the two schedules ended at different sizes ({one_shot['parameters']:,} vs "
            f"{iterative['parameters']:,} parameters)."
        )
    report.write()


if __name__ == "__main__":
    main()
