"""Does the demo's healing generalise, and what does distillation from cached teacher logits cost?

The demo's one-shot (``configs/demo.yaml``: 20% of the MLP width by ``hybrid``, scored and the kept
``down_proj`` columns refit on 32 x 256 tokens the unpruned model writes) is repeated, then copies of the pruned model heal with ``--steps`` steps of
4 x 128 tokens:

* ``lora``: LoRA r=16 CE on the demo text (what the demo does), lr 2e-4;
* ``kd``: full-parameter distillation from the unpruned model's cached top-k logits, lr 5e-5;
* ``kd_lora``: the same loss training LoRA adapters only, lr 2e-4;
* ``kd_lora_teacher``: KD into LoRA on text the teacher writes itself (``heal_data: teacher``:
  ``sample_teacher_text``, one random first token, then the full distribution at temperature 1), its
  top-k logits recorded while sampling.

Every healed model is scored on WikiText-2 test (text no healing saw) and on the demo's held-out split.
KD uses temperature ``--temperature`` (2), alpha 0.9, top-64 teacher logits (float16) plus the tail bucket; learning rates follow
``bench_healing.py``. Each method heals with the pipeline's own ``heal`` (``HealConfig``: cosine schedule,
warmup steps // 10); the healing time counts its optimizer steps, not the one checkpoint ``heal`` writes
at the end (for resuming).

Before that, the cost of one training step (forward, backward, AdamW step; batch 4 x 128) is measured
for LoRA, online KD and cached KD (full-parameter and into LoRA), interleaved (A B C ... A B C ...),
median of ``--repeats`` after one warm-up round, and the one-off cache build per 1,000 tokens.

Usage:
    python bench/bench_heal_generalisation.py --threads 2          # ~20 min on 2 cores
    python bench/bench_heal_generalisation.py --quick              # a tiny model: < 1 min

Writes ``<out>/heal-generalisation.md``.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Report, base_parser, healing_arguments, load_workload, setup
from transformers import Trainer, TrainerCallback, default_data_collator

from optipfair_train import prune_model
from optipfair_train.data import block_dataloader, load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.heal import (
    DistillationTrainer,
    add_example_ids,
    add_lora,
    build_teacher_cache,
    lm_dataset,
    sample_teacher_text,
    text_dataset,
)
from optipfair_train.pipeline.config import HealConfig, RunConfig
from optipfair_train.pipeline.healing import heal

METHODS = {
    "lora": "LoRA CE, demo text (today)",
    "kd": "cached KD full-parameter, demo text",
    "kd_lora": "cached KD into LoRA, demo text",
    "kd_lora_teacher": "cached KD into LoRA, text the teacher wrote",
}
STEP_KINDS = ["lora", "kd_online", "kd_cached", "kd_lora_online", "kd_lora_cached"]


def student(pruned: torch.nn.Module, lora: bool) -> torch.nn.Module:
    model = copy.deepcopy(pruned).requires_grad_(True).train()
    return add_lora(model, r=16, alpha=32) if lora else model


def make_trainer(kind: str, model, teacher, cache, dataset, output_dir: str, steps: int, args) -> Trainer:
    """A Trainer whose ``compute_loss`` the step-cost timing calls one step at a time (the healing runs
    themselves go through the pipeline's ``heal``)."""
    lr = args.kd_lr if kind.startswith("kd") and "lora" not in kind else args.lora_lr
    training_args = healing_arguments(
        output_dir, steps=steps, batch_size=args.batch_size, learning_rate=lr, seed=args.seed,
        warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 6),
    )  # fmt: skip
    common = dict(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    if kind == "lora":
        return Trainer(**common)
    if kind.endswith("online"):
        return DistillationTrainer(teacher=teacher, top_k=cache.k, temperature=args.temperature, alpha=0.9, **common)
    return DistillationTrainer(teacher_cache=cache, temperature=args.temperature, alpha=0.9, **common)


def heal_config(method: str, args) -> HealConfig:
    """The pipeline's healing settings for ``method`` (kd_lora_teacher heals as kd_lora on other text)."""
    return HealConfig(
        heal_method="kd_lora" if method == "kd_lora_teacher" else method,
        heal_steps=args.steps,
        per_device_batch_size=args.batch_size,
        lora_r=16,
        lora_alpha=32,
        kd_temperature=args.temperature,
        kd_alpha=0.9,
    )


class StepTimer(TrainerCallback):
    """Seconds spent in optimizer steps (not the checkpoint heal writes at the end, for resuming) and the
    Trainer's mean training loss."""

    def __init__(self):
        self.seconds, self.train_loss, self._began = 0.0, float("nan"), 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._began

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.train_loss = (logs or {}).get("train_loss", self.train_loss)


def step_costs(pruned, teacher, cache, dataset, args) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of one optimizer step of each kind, interleaved; round 0 warms up.

    CPU time of this process is less disturbed than wall time by other jobs on a shared machine (with
    one torch thread no time is spent spin-waiting), so the ratios are read from it.
    """
    batch = default_data_collator([dataset[i] for i in range(args.batch_size)])
    setups = {}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as out:
        for kind in STEP_KINDS:
            model = student(pruned, lora="lora" in kind)
            trainer = make_trainer(kind, model, teacher, cache, dataset, out, 1, args)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            setups[kind] = (trainer, model, optimizer)
        times: dict[str, dict[str, list[float]]] = {kind: {"wall": [], "cpu": []} for kind in STEP_KINDS}
        for repeat in range(args.repeats + 1):
            for kind, (trainer, model, optimizer) in setups.items():
                wall, cpu = time.perf_counter(), time.process_time()
                loss = trainer.compute_loss(model, dict(batch))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if repeat:
                    times[kind]["wall"].append(time.perf_counter() - wall)
                    times[kind]["cpu"].append(time.process_time() - cpu)
            if repeat:
                print(
                    f"step costs, round {repeat}: "
                    + ", ".join(f"{k} {v['wall'][-1]:.2f}s wall {v['cpu'][-1]:.2f}s cpu" for k, v in times.items()),
                    flush=True,
                )
    del setups
    gc.collect()
    return times


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="healing steps per method (30; quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (4; quick 2)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature (1 shares one log-softmax)")
    parser.add_argument("--repeats", type=int, default=None, help="timed step rounds (3; quick 1)")
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--kd-lr", type=float, default=5e-5)
    parser.add_argument("--eval-blocks", type=int, default=8, help="512-token blocks per perplexity")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.quick else 30)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    setup(args)
    report = Report("heal-generalisation", "Healing on the demo text: generalisation and cost", args.out)
    eval_blocks = 2 if args.quick else args.eval_blocks
    work = load_workload(args, eval_tokens=eval_blocks * 512, crows_sample=0)
    teacher, tokenizer = work.model, work.tokenizer
    teacher.requires_grad_(False)
    k = min(args.top_k, teacher.get_output_embeddings().weight.shape[0])
    demo_eval = tokenize_for_lm(
        tokenizer, load_texts("demo", split="evaluation"), seq_len=work.eval_seq_len, num_sequences=eval_blocks
    )
    # the demo's calibration: 32 x 256 tokens the unpruned model writes (calibration_data: teacher)
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as folder:
        written = sample_teacher_text(
            teacher, folder, 4 if args.quick else 32, 256, k=k, special_ids=set(tokenizer.all_special_ids),
            seed=args.seed, show_progress=False,
        )  # fmt: skip
    calibration = list(block_dataloader(written))
    dataset = add_example_ids(
        text_dataset(
            tokenizer, load_texts("demo", split="calibration"), seq_len=args.seq_len,
            num_sequences=args.steps * args.batch_size,
        )
    )  # fmt: skip

    def scores(model) -> dict[str, float]:
        return {
            "wikitext": perplexity(model, input_ids=work.test_ids, seq_len=work.eval_seq_len),
            "demo": perplexity(model, input_ids=demo_eval, seq_len=work.eval_seq_len),
        }

    pruned = copy.deepcopy(teacher)
    prune_model(
        pruned, pruning_type="MLP_GLU", neuron_selection_method="hybrid", pruning_percentage=20.0,
        dataloader=calibration, show_progress=False, seed=args.seed, reconstruct=True, damping=0.01,
    )  # fmt: skip
    base_scores, pruned_scores = scores(teacher), scores(pruned)
    tokens = dataset.num_rows * args.seq_len

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        began = time.perf_counter()
        cache = build_teacher_cache(
            teacher, dataset, cache_dir, k=k, temperature=args.temperature, show_progress=False
        )
        build_seconds = time.perf_counter() - began
        began = time.perf_counter()
        build_teacher_cache(teacher, dataset, cache_dir, k=k, temperature=args.temperature, show_progress=False)
        reuse_seconds = time.perf_counter() - began

        load_before = f"{os.getloadavg()[0]:.1f}"
        times = step_costs(pruned, teacher, cache, dataset, args)
        lora_cpu = statistics.median(times["lora"]["cpu"])
        report.text(
            f"One optimizer step (forward, backward, AdamW) of {args.batch_size} x {args.seq_len} tokens on the "
            f"demo model pruned by 20% of its MLP width; {args.repeats} interleaved rounds after a warm-up "
            f"round; wall seconds (median, min-max) and CPU seconds of this process (median; the ratio column "
            f"uses it). Teacher cache: top-{k} logits, {cache.bytes_per_token} bytes per token; building it for "
            f"{tokens:,} tokens took {build_seconds:.1f} s wall ({1000 * build_seconds / tokens:.2f} s per 1,000 "
            f"tokens), loading it again {reuse_seconds:.2f} s. Load average before / after the step timing: "
            f"{load_before} / {os.getloadavg()[0]:.1f}."
        )
        report.table(
            ["step", "wall median s", "wall min-max s", "CPU median s", "x LoRA step (CPU)"],
            [
                [kind, f"{statistics.median(t['wall']):.2f}", f"{min(t['wall']):.2f}-{max(t['wall']):.2f}",
                 f"{statistics.median(t['cpu']):.2f}", f"{statistics.median(t['cpu']) / lora_cpu:.2f}"]
                for kind, t in times.items()
            ],  # fmt: skip
            title="Step cost",
        )
        partial(report)

        rows = [
            ["base (unpruned)", "-", f"{base_scores['wikitext']:.2f}", f"{base_scores['demo']:.2f}", "-"],
            ["pruned, MLP -20%", "-", f"{pruned_scores['wikitext']:.2f}", f"{pruned_scores['demo']:.2f}", "-"],
        ]
        for method in args.methods:
            extra = 0.0
            data, method_cache = dataset, cache
            if method == "kd_lora_teacher":
                began = time.perf_counter()
                blocks = sample_teacher_text(
                    teacher, cache_dir, dataset.num_rows, args.seq_len, k=k, temperature=args.temperature,
                    special_ids=set(tokenizer.all_special_ids), seed=args.seed, show_progress=False,
                )  # fmt: skip
                data = add_example_ids(lm_dataset(blocks))
                method_cache = build_teacher_cache(  # reused: sampling saved it
                    teacher, data, cache_dir, k=k, temperature=args.temperature, show_progress=False
                )
                extra = time.perf_counter() - began
                print(f"the teacher wrote {blocks.numel():,} tokens in {extra:.0f} s", flush=True)
            elif method != "lora":
                extra = build_seconds
            torch.manual_seed(args.seed)  # the LoRA initialisation heal draws
            timer = StepTimer()
            with tempfile.TemporaryDirectory(prefix="bench-heal-") as out:
                healed, _ = heal(
                    student(pruned, lora=False), tokenizer, heal_config(method, args), Path(out),
                    args.kd_lr if method == "kd" else args.lora_lr, data,
                    run=RunConfig(seed=args.seed, save_steps=args.steps, report_to="none", show_progress=False),
                    teacher_cache=method_cache, callbacks=[timer],
                )  # fmt: skip
            result = scores(healed)
            print(f"[{method}] {result} in {timer.seconds:.0f} s (+{extra:.0f} s data/cache)", flush=True)
            rows.append(
                [METHODS[method], f"{timer.seconds:.0f} + {extra:.0f}", f"{result['wikitext']:.2f}",
                 f"{result['demo']:.2f}", f"{timer.train_loss:.3f}"]
            )  # fmt: skip
            partial(report, rows)
            del healed
            gc.collect()

    report.text(
        f"Healing: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens ({tokens:,} tokens) per method. "
        f"Perplexity on {work.eval_tokens:,} WikiText-2 test tokens and on {demo_eval.numel():,} tokens of the "
        f"demo's held-out split (blocks of {work.eval_seq_len}). Time: healing seconds + one-off seconds "
        "(teacher cache build; for the teacher's text its sampling, which records the cache)."
    )
    report.table(
        ["model", "time (s)", "WikiText-2 test perplexity", "demo held-out perplexity", "mean train loss"],
        rows,
        title="Generalisation",
    )
    report.write()


def partial(report: Report, rows: list | None = None) -> None:
    """Write what is measured so far (a long run on a shared machine may be stopped before the end)."""
    lines = list(report.lines)
    if rows:
        lines += ["### Generalisation (so far)", "", *("| " + " | ".join(r) + " |" for r in rows), ""]
    report.out.mkdir(parents=True, exist_ok=True)
    (report.out / f"{report.name}.md").write_text("\n".join(lines + ["(run still going)"]) + "\n")


if __name__ == "__main__":
    main()
