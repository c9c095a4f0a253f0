"""Training-loop overheads: BiasProbeCallback, GradientImportanceCallback and in-loop pruning events.

Writes ``<out>/callbacks.md`` (and prints it):

1. each callback's overhead as a share of training wall time: runs without callbacks and with
   ``BiasProbeCallback`` (defaults: the StereoSet probe; and the pairs probes, behavioural + activation) and ``GradientImportanceCallback``,
   interleaved (each repeat runs every variant, in a rotated order) so a busy machine affects all alike.
   The headline share is the callback's own measured time over the plain run's wall time; the difference
   of the runs' wall times is shown next to it as a (noisier) cross-check;
2. one in-loop pruning event (MLP width -20%, per scorer) in units of the same run's training steps
   (before the event) and as a share of a run of N steps.

Training: WikiText-2 ``valid.txt`` (from ``--data``) in blocks of ``--seq-len`` tokens, batch ``--batch-size``,
AdamW, full fine-tuning on the CPU; the calibration batches of the ``activation`` scorer come from the same
file (8 x ``--seq-len`` tokens).

Usage:
    python bench/bench_callbacks.py --quick --threads 1   # 6-step runs, 1 repeat: 38 steps in all (~4 min on the demo model)
    python bench/bench_callbacks.py --threads 1           # 24-step runs, 2 interleaved repeats: 230 steps (~20 min)
    python bench/bench_callbacks.py --only probe          # one section

Times are for a quiet 2-core machine, one thread (about 4.5 s of CPU per demo-model training step); on a
busy machine everything stretches alike (the quick run took 7.7 min at load average 7).
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time

import torch
import transformers
from common import Report, base_parser, load_workload, setup
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from optipfair_train.callbacks import PROBES, BiasProbeCallback, GradientImportanceCallback, PruningCallback
from optipfair_train.data import tokenize_for_lm

LONG_RUN = 1000  # steps of the longer run the pruning event is also compared with


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer); added first, so the ``on_step_end``
    work of the callbacks under test (probes, pruning events) is not included."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _train(base_model, tokenizer, dataset, steps: int, batch_size: int, seed: int, callbacks_for) -> dict:
    """Train a fresh copy of ``base_model`` for ``steps`` steps with ``callbacks_for(trainer)`` added."""
    model = copy.deepcopy(base_model)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=5e-5,
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            optim="adamw_torch",
            disable_tqdm=True,
            seed=seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # keep stdout for the report
        timer = StepTimer()
        trainer.add_callback(timer)
        extra = callbacks_for(trainer)
        for cb in extra:
            trainer.add_callback(cb)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"wall": wall, "steps": timer.times, "callbacks": extra}


def _median(values) -> float:
    return statistics.median(list(values))


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per overhead run (default 24; quick 6)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; quick 1)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--prune-at",
        type=int,
        default=None,
        help="step of the pruning event; the run stops one step later (default 5; quick 3)",
    )
    parser.add_argument("--only", choices=("all", "probe", "pruning"), default="all", help="run one section")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.quick else 24)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.prune_at = args.prune_at or (3 if args.quick else 5)
    if args.steps < 3 or args.prune_at < 2:
        parser.error("--steps must be at least 3 and --prune-at at least 2 (the first step is a warm-up).")
    setup(args)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()

    report = Report(
        "callbacks",
        "Training-loop overheads",
        args.out,
    )
    work = load_workload(args, eval_tokens=args.seq_len, calibration_seq_len=args.seq_len)
    num_blocks = max(args.steps, args.prune_at + 1) * args.batch_size
    blocks = tokenize_for_lm(
        work.tokenizer, work.valid_texts(args.data), seq_len=args.seq_len, num_sequences=num_blocks
    )
    dataset = _Blocks(blocks)
    report.text(
        f"Model `{args.model_path}` ({sum(p.numel() for p in work.model.parameters()):,} parameters), full "
        f"fine-tuning with AdamW on WikiText-2 valid, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{torch.get_num_threads()} torch threads, {args.repeats} interleaved repeat(s)"
        + (" (`--quick`)." if args.quick else ".")
    )
    # One short untimed run first: one-time costs (lazy initialisation, first calls of the probe and
    # scoring code) would otherwise land on whichever variant runs first.
    _train(
        work.model,
        work.tokenizer,
        dataset,
        2,
        args.batch_size,
        args.seed,
        lambda t: [BiasProbeCallback(t, probes=PROBES, stereoset_sample_size=8), GradientImportanceCallback()],
    )
    if args.only in ("all", "probe"):
        _bench_overheads(args, work, dataset, report)
    if args.only in ("all", "pruning"):
        _bench_pruning(args, work, dataset, report)
    report.write()


def _bench_overheads(args, work, dataset, report: Report) -> None:
    """1. Callbacks' overhead as a share of training time, interleaved with plain runs."""
    variants = {
        "no callbacks": lambda t: [],
        "`BiasProbeCallback()` (defaults: StereoSet, 300 items)": lambda t: [BiasProbeCallback(t)],
        '`BiasProbeCallback(probes=("behaviour", "activation"))` (8 built-in pairs)': lambda t: [
            BiasProbeCallback(t, probes=("behaviour", "activation"))
        ],
        "`GradientImportanceCallback()`": lambda t: [GradientImportanceCallback()],
    }
    names = list(variants)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # rotate so no variant always runs first
            runs[name].append(
                _train(
                    work.model,
                    work.tokenizer,
                    dataset,
                    args.steps,
                    args.batch_size,
                    args.seed,
                    variants[name],
                )
            )
    plain = runs["no callbacks"]
    wall_plain = _median(r["wall"] for r in plain)
    step = _median(t for r in plain for t in r["steps"][1:])  # the first step warms up
    rows = [["no callbacks", f"{wall_plain:.1f} s", "-", "-", "-", "-", "-"]]
    summary = []
    for name in names[1:]:
        wall = _median(r["wall"] for r in runs[name])
        own = _median(r["callbacks"][0].total_seconds for r in runs[name])
        callback = runs[name][0]["callbacks"][0]
        if isinstance(callback, BiasProbeCallback):
            count = len(callback.history)
            per_call = own / count
            calls = f"{count} probes"
        else:  # GradientImportanceCallback accumulates on every optimizer step
            count = args.steps
            per_call = own / count
            calls = f"{count} steps"
        rows.append(
            [
                name,
                f"{wall:.1f} s",
                _pct((wall - wall_plain) / wall_plain),
                calls,
                f"{own:.2f} s",
                f"{per_call / step:.2f}",
                f"**{_pct(own / wall_plain)}**",
            ]
        )
        summary.append(f"- {name.replace('`', '')}: **{_pct(own / wall_plain)} of training wall time**")
    report.table(
        [
            f"run ({args.steps} steps)",
            f"wall time (median of {args.repeats})",
            "wall-time difference",
            "callback calls",
            "callback's own time",
            "per call, in training steps",
            "overhead: own time / plain wall time",
        ],
        rows,
        title=f"Overhead of the callbacks on a {args.steps}-step run (interleaved runs)",
    )
    report.text(
        "\n".join(summary)
        + f"\n\nMedian training step {step:.2f} s (plain runs, first step excluded). The probes at train "
        "begin and end are a fixed cost per run, so their share shrinks as 1/N on longer runs; with "
        "`every_n_steps=k` each further probe adds (per call, in training steps) / k. The wall-time "
        "difference of separate runs includes the machine's noise; the callback's own time is measured "
        "inside the run."
    )


def _bench_pruning(args, work, dataset, report: Report) -> None:
    """2. One in-loop pruning event in training steps (same run, before the event) and as a share of a run."""
    at = args.prune_at
    scorers = {
        f"activation (8 x {args.seq_len} calibration tokens)": lambda t: [
            PruningCallback(t, target=20, step=at, dataloader=work.calibration)
        ],
        "MAW (weights only)": lambda t: [
            PruningCallback(t, target=20, step=at, neuron_selection_method="MAW")
        ],
        "taylor from the training's gradients": lambda t: (
            lambda g: [g, PruningCallback(t, target=20, step=at, importance=g)]
        )(GradientImportanceCallback()),
    }
    names = list(scorers)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(
                _train(work.model, work.tokenizer, dataset, at + 1, args.batch_size, args.seed, scorers[name])
            )
    rows = []
    for name in names:
        seconds = _median(r["callbacks"][-1].events_done[0]["seconds"] for r in runs[name])
        step = _median(t for r in runs[name] for t in r["steps"][1:at])  # unpruned steps after the warm-up
        rows.append(
            [
                name,
                f"{seconds:.2f} s",
                f"{step:.2f} s",
                f"**{seconds / step:.2f}**",
                _pct(seconds / (args.steps * step)),
                _pct(seconds / (LONG_RUN * step)),
            ]
        )
    report.table(
        [
            "scorer",
            f"event time (median of {args.repeats})",
            "training step (same runs, before the event)",
            "event, in training steps",
            f"share of a {args.steps}-step run",
            f"share of a {LONG_RUN:,}-step run",
        ],
        rows,
        title=f"One in-loop pruning event (MLP width -20% at step {at}) vs training steps",
    )
    report.text(
        "The event includes scoring, cutting the weights and Adam's moments in place, and the checks; "
        "the steps after it are cheaper (fewer parameters) and not counted here. The `taylor` run also "
        "carries `GradientImportanceCallback` on every step (its cost is in the table above)."
    )


if __name__ == "__main__":
    main()
