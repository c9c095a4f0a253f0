"""Healing under bfloat16 autocast (``HealConfig(bf16=True)``) against float32: step time side by side.

On the demo model: one full-parameter distillation step (the pipeline's ``DistillationTrainer`` on the
unpruned model's cached top-64 logits, temperature 2, alpha 0.9; forward, backward, AdamW step) on
``--batch`` blocks of 128 WikiText-2 valid tokens, through ``Trainer.training_step`` with the Trainer
arguments ``training_args`` builds from ``HealConfig(bf16=False)`` and ``HealConfig(bf16=True)``, the model
wrapped by the Trainer's Accelerator as ``train()`` wraps it, so the autocast is the one healing uses.
The two students are copies of the same model; the steps are
interleaved (fp32, bf16, fp32, bf16, ...), round 0 warms up, the medians of ``--repeats`` rounds are
reported with their ratio. The learning rate is tiny (1e-7) so both students stay the model whose loss is
compared: the loss of the first step's batch at the same weights, float32 vs bfloat16 autocast.

Whether bfloat16 is faster depends on the CPU: it needs AVX512-BF16 or AMX (this report states the
CPU's flags); elsewhere it can be slower than float32.

Usage:
    python bench/bench_bf16.py --threads 2      # ~3 min on 2 cores
    python bench/bench_bf16.py --quick          # 2 blocks, 1 round

Writes ``<out>/bf16.md``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Progress, Report, base_parser, load_workload, setup
from transformers import default_data_collator

from optipfair_train.data import tokenize_for_lm
from optipfair_train.heal import DistillationTrainer, add_example_ids, build_teacher_cache, lm_dataset
from optipfair_train.pipeline.config import HealConfig
from optipfair_train.pipeline.healing import training_args

SEQ_LEN, TOP_K, TEMPERATURE, ALPHA = 128, 64, 2.0, 0.9


def cpu_flags() -> str:
    """The CPU's bfloat16-related flags (Linux ``/proc/cpuinfo``), or 'unknown'."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    wanted = [f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    return ", ".join(wanted) or "none of avx512f / avx512_bf16 / amx_bf16"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8, help="blocks of 128 tokens per step (8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (5; quick 1)")
    args = parser.parse_args()
    batch_size = 2 if args.quick else args.batch
    repeats = args.repeats or (1 if args.quick else 5)
    setup(args)
    report = Report("bf16", "Healing under bfloat16 autocast vs float32 (step time, loss)", args.out)
    log = Progress()
    work = load_workload(args, eval_tokens=512, calibration_samples=1)
    teacher, tokenizer = work.model.eval(), work.tokenizer
    blocks = tokenize_for_lm(
        tokenizer, work.valid_texts(args.data), seq_len=SEQ_LEN, num_sequences=batch_size
    )
    dataset = add_example_ids(lm_dataset(blocks))
    batch = default_data_collator([dataset[i] for i in range(batch_size)])
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    first_loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as folder:
        cache = build_teacher_cache(
            teacher, dataset, folder, k=TOP_K, temperature=TEMPERATURE, show_progress=False
        )
        setups = {}
        for name, flag in (("float32", False), ("bfloat16", True)):
            config = HealConfig(
                heal_method="kd", heal_steps=repeats + 1, per_device_batch_size=batch_size, bf16=flag
            )
            student = copy.deepcopy(teacher).train().requires_grad_(True)
            trainer = DistillationTrainer(
                model=student,
                args=training_args(config, Path(folder) / name, 1e-7),
                train_dataset=dataset,
                teacher_cache=cache,
                temperature=TEMPERATURE,
                alpha=ALPHA,
                data_collator=default_data_collator,
            )
            trainer.current_gradient_accumulation_steps = 1  # set by train(), which is not called here
            # train() lets Accelerate wrap the model, and that wrapper is where the autocast lives
            model = trainer.accelerator.prepare_model(student)
            setups[name] = (trainer, model, torch.optim.AdamW(student.parameters(), lr=1e-7))
        for repeat in range(repeats + 1):
            for name, (trainer, student, optimizer) in setups.items():
                start = time.perf_counter()
                loss = trainer.training_step(student, dict(batch))  # the Trainer's autocast and backward
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
                if repeat == 0:
                    first_loss[name] = float(loss)
                else:
                    times[name].append(seconds)
            if repeat:
                log(f"round {repeat}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    fp32, bf16 = (statistics.median(times[n]) for n in ("float32", "bfloat16"))
    tokens = batch_size * SEQ_LEN
    report.text(
        f"Model `{args.model_path}`, one full-parameter distillation step (cached top-{TOP_K} logits, "
        f"T={TEMPERATURE:g}, alpha {ALPHA:g}, AdamW) on {batch_size} x {SEQ_LEN} WikiText-2 valid tokens, through "
        f"`Trainer.training_step` with `training_args(HealConfig(bf16=...))`. Interleaved, one warm-up round, "
        f"median of {repeats} rounds. CPU flags: {cpu_flags()}."
    )
    report.table(
        ["setting", "median s / step", "all rounds (s)", "tokens / s", "loss at the same weights"],
        [
            [n, f"{statistics.median(t):.2f}", " ".join(f"{x:.2f}" for x in t),
             f"{tokens / statistics.median(t):.0f}", f"{first_loss[n]:.4f}"]
            for n, t in times.items()
        ],
    )  # fmt: skip
    report.text(
        f"bfloat16 / float32 step time: {bf16 / fp32:.2f} ({fp32 / bf16:.2f}x the float32 speed); the loss "
        f"differs by {abs(first_loss['bfloat16'] - first_loss['float32']) / first_loss['float32']:.2%}."
    )
    report.write()


if __name__ == "__main__":
    main()
