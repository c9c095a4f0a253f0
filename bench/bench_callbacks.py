"""Benchmark the Trainer callbacks on the demo model (SmolLM2-135M-Instruct), side by side in one run.

Prints markdown tables:
1. training wall time without callbacks vs with ``BiasProbeCallback`` at its default settings and with the
   activation probe added (interleaved runs, so a busy machine affects all alike), and the probes' own time;
2. the cost of one in-loop pruning event (MLP width, per scorer) relative to one training step, and the
   per-step cost of ``GradientImportanceCallback``.

Usage:
    python bench/bench_callbacks.py                  # 24 steps, 3 variants + 3 pruning runs (~10 min, 2 cores)
    python bench/bench_callbacks.py --repeats 3      # medians over interleaved repeats
    python bench/bench_callbacks.py --threads 1      # steadier on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from optipfair_train.callbacks import PROBES, BiasProbeCallback, GradientImportanceCallback, PruningCallback
from optipfair_train.data import calibration_dataloader, load_texts, tokenize_for_lm
from optipfair_train.models import load_model_and_tokenizer

logger = logging.getLogger("bench_callbacks")


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), callbacks' own work excluded."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _run(model_path: str, dataset, steps: int, batch_size: int, callbacks_for) -> dict:
    model, tokenizer = load_model_and_tokenizer(model_path)
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
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        timer = StepTimer()
        trainer.add_callback(timer)
        extra = callbacks_for(trainer)
        for cb in extra:
            trainer.add_callback(cb)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return {"wall": wall, "steps": timer.times, "callbacks": extra}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default="demo")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--prune-at", type=int, default=4, help="step of the pruning event (runs prune_at + 2 steps)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("all", "probe", "pruning"), default="all", help="run one section")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    _, tokenizer = load_model_and_tokenizer(args.model_path)
    texts = load_texts("demo", split="calibration")
    blocks = tokenize_for_lm(
        tokenizer, texts, seq_len=args.seq_len, num_sequences=args.steps * args.batch_size
    )
    dataset = _Blocks(blocks)
    calibration = list(
        calibration_dataloader(tokenizer, texts, num_samples=8, seq_len=args.seq_len, batch_size=4)
    )

    if args.only in ("all", "probe"):
        _bench_probe(args, dataset)
    if args.only in ("all", "pruning"):
        _bench_pruning(args, dataset, calibration)


def _bench_probe(args: argparse.Namespace, dataset) -> None:
    """1. BiasProbeCallback at its defaults (and with the activation probe too), interleaved with plain runs."""
    variants = {
        "no callbacks": lambda t: [],
        "BiasProbeCallback() (defaults)": lambda t: [BiasProbeCallback(t)],
        'BiasProbeCallback(probes=("behaviour", "activation"))': lambda t: [
            BiasProbeCallback(t, probes=PROBES)
        ],
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, factory in variants.items():
            runs[name].append(_run(args.model_path, dataset, args.steps, args.batch_size, factory))
    wall_plain = statistics.median(r["wall"] for r in runs["no callbacks"])
    step = statistics.median(t for r in runs["no callbacks"] for t in r["steps"][1:])  # first step warms up
    print(
        f"\n## BiasProbeCallback ({args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, "
        f"demo model, {torch.get_num_threads()} threads)\n"
    )
    print(
        f"| run | wall time (median of {args.repeats}) | wall-time overhead | probes | probe time | probe time / plain run |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| no callbacks | {wall_plain:.1f} s | - | - | - | - |")
    for name in list(variants)[1:]:
        wall = statistics.median(r["wall"] for r in runs[name])
        seconds = statistics.median(r["callbacks"][0].total_seconds for r in runs[name])
        count = len(runs[name][0]["callbacks"][0].history)
        print(
            f"| {name} | {wall:.1f} s | {100 * (wall - wall_plain) / wall_plain:+.1f}% | {count} | "
            f"{seconds:.2f} s | {100 * seconds / wall_plain:.1f}% |"
        )
    print(f"\nmedian training step: {step:.2f} s")


def _bench_pruning(args: argparse.Namespace, dataset, calibration) -> None:
    """2. One in-loop pruning event vs one training step; gradient importance per step."""
    at = args.prune_at
    rows = []
    for label, factory in (
        (
            f"activation (8 x {args.seq_len} calibration tokens)",
            lambda t: [PruningCallback(t, target=20, step=at, dataloader=calibration)],
        ),
        (
            "MAW (weights only)",
            lambda t: [PruningCallback(t, target=20, step=at, neuron_selection_method="MAW")],
        ),
        (
            "taylor from training gradients",
            lambda t: (lambda g: [g, PruningCallback(t, target=20, step=at, importance=g)])(
                GradientImportanceCallback()
            ),
        ),
    ):
        run = _run(args.model_path, dataset, at + 2, args.batch_size, factory)
        pruning = run["callbacks"][-1]
        event = pruning.events_done[0]
        run_step = statistics.median(run["steps"][1:])
        rows.append((label, event["seconds"], run_step, run))
    print(f"\n## One in-loop pruning event (MLP width -20% at step {at}) vs one training step\n")
    print("| scorer | event time | training step (same run, median) | event / step |")
    print("|---|---|---|---|")
    for label, seconds, run_step, _ in rows:
        print(f"| {label} | {seconds:.2f} s | {run_step:.2f} s | {seconds / run_step:.2f} |")
    taylor_run = rows[-1][3]
    grads = taylor_run["callbacks"][0]
    per_step = grads.total_seconds / (at + 2)  # accumulated on every step of the run
    print(
        f"\nGradientImportanceCallback: {per_step:.3f} s per optimizer step "
        f"({100 * per_step / statistics.median(taylor_run['steps'][1:]):.1f}% of a training step)."
    )


if __name__ == "__main__":
    main()
