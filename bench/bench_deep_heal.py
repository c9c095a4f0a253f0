"""The healing curve of a deep cut: 25% fewer parameters, healed by full-student distillation.

On the demo model: ``budget_requests(model, fraction=--fewer, shares=--shares, calibrated=True,
reconstruct=True)`` (default MLP width only), scored and refit on 32 x 256 tokens the unpruned model
writes itself (the demo's ``calibration_data: teacher``), then one healing run of the pipeline's own
``heal`` with ``heal_method="kd"``: every parameter of the student trains on the unpruned model's cached
top-64 logits (temperature 2, alpha 0.9), on blocks of 128 tokens the unpruned model writes (its logits
are recorded while it writes, so the teacher never runs during training), 4 blocks per step, AdamW at
``--lr`` with the pipeline's schedule (warmup a tenth of the steps, cosine decay to ``--max-tokens``).

Perplexity on WikiText-2 test (16 x 512 tokens, text healing never sees) and on the demo's held-out
split (8 x 512) at 0, 16k, 32k, 64k, ... healing tokens and at the end. The points come from one run,
so an early point is a model in mid-schedule (learning rate still high), not one healed with that budget.
Healing throughput (tokens per second, measurements excluded) and the teacher's writing time are reported,
so the cost of a longer run can be read off.

The teacher's text is kept in ``--text-cache`` (default ``~/.cache/optipfair_train/bench-deep-heal``): a
rerun with the same sizes and seed reuses it.

    python bench/bench_deep_heal.py --threads 2                        # 98,304 tokens: ~30 min on 2 cores
    python bench/bench_deep_heal.py --threads 2 --max-tokens 1048576   # the issue's ~1M tokens: ~3.5 h
    python bench/bench_deep_heal.py --quick                            # 2,048 tokens, a few minutes

Cost measured on 2 cores at load ~3 (``--quick --max-tokens 4096``): 153 training tokens/s (one step of
4 x 128 tokens in 3.3 s), and the teacher wrote 32 blocks of 128 tokens in 23 s (5.6 s per 1,000 tokens).
The default run: ~8 min of writing, ~11-14 min of training, ~2 min of measuring. The writing is cached
per size and seed; 1M tokens is ~2 h of training plus ~1.5 h of writing.

Further flags: the shared ones of ``bench/common.py``. Writes <out>/deep-heal.md and deep-heal-curve.png.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from bench_heal_generalisation import StepTimer
from common import Progress, Report, base_parser, fmt_ppl, load_workload, setup
from transformers import TrainerCallback

from optipfair_train.analysis import count_parameters
from optipfair_train.arch import get_adapter
from optipfair_train.data import block_dataloader, load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.heal import add_example_ids, build_teacher_cache, lm_dataset, sample_teacher_text
from optipfair_train.models import default_cache_dir
from optipfair_train.pipeline.config import HealConfig, RunConfig
from optipfair_train.pipeline.healing import heal
from optipfair_train.pruning import apply, plan
from optipfair_train.pruning.budget import budget_requests, parse_shares

SEQ_LEN, BATCH, TOP_K, TEMPERATURE, ALPHA = 128, 4, 64, 2.0, 0.9
CHECKPOINTS = [2**i * 1024 for i in range(4, 11)]  # 16k, 32k, ... 1M tokens


class Curve(TrainerCallback):
    """Measures the student at the chosen optimizer steps (after the step timer has stopped)."""

    def __init__(self, steps: set[int], measure):
        self.steps, self.measure = steps, measure
        self.points: list[tuple[int, dict[str, float]]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            model.eval()
            self.points.append((state.global_step, self.measure(model)))
            model.train()
        return control


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--fewer", type=float, default=0.25, help="share of the parameters removed (0.25)")
    parser.add_argument("--shares", default="mlp=1", help="budget shares per axis, e.g. hidden=0.25,mlp=0.75")
    parser.add_argument("--max-tokens", type=int, default=None, help="healing tokens (98304; quick 2048)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the full-student KD")
    parser.add_argument("--text-cache", type=Path, default=default_cache_dir() / "bench-deep-heal")
    args = parser.parse_args()
    shares = parse_shares(args.shares)
    max_tokens = args.max_tokens or (2048 if args.quick else 98304)
    steps = max_tokens // (BATCH * SEQ_LEN)
    if steps < 1 or not 0 < args.fewer < 1:
        parser.error(f"--max-tokens must be >= {BATCH * SEQ_LEN} and --fewer in (0, 1)")
    setup(args)
    report = Report(
        "deep-heal", f"Healing a deep cut ({args.fewer:.0%} fewer parameters) by distillation", args.out
    )
    log = Progress()
    work = load_workload(args, eval_tokens=(2 if args.quick else 16) * 512, calibration_samples=1)
    teacher, tokenizer = work.model.eval(), work.tokenizer
    teacher.requires_grad_(False)
    demo_eval = tokenize_for_lm(
        tokenizer, load_texts("demo", split="evaluation"), seq_len=512, num_sequences=1 if args.quick else 8
    )

    def measure(model) -> dict[str, float]:
        return {
            "wikitext": perplexity(model, input_ids=work.test_ids, seq_len=work.eval_seq_len),
            "demo": perplexity(model, input_ids=demo_eval, seq_len=512),
        }

    text = dict(k=TOP_K, temperature=TEMPERATURE, special_ids=set(tokenizer.all_special_ids), seed=args.seed)
    start = time.perf_counter()
    written = sample_teacher_text(teacher, args.text_cache, 4 if args.quick else 32, 256, **text)
    calibration = list(block_dataloader(written))
    blocks = sample_teacher_text(teacher, args.text_cache, steps * BATCH, SEQ_LEN, **text)
    writing = time.perf_counter() - start
    log(f"teacher text: {written.numel():,} calibration + {blocks.numel():,} healing tokens, {writing:.0f} s")

    base = measure(teacher)
    student = copy.deepcopy(teacher)
    total = count_parameters(teacher)
    start = time.perf_counter()
    requests = budget_requests(student, fraction=args.fewer, shares=shares, calibrated=True, reconstruct=True)
    apply(student, plan(student, requests, calibration))
    prune_seconds = time.perf_counter() - start
    adapter = get_adapter(student)
    widths = f"hidden {adapter.hidden_size}, MLP {adapter.intermediate_sizes()[0]}"
    params = count_parameters(student)
    log(f"pruned to {params:,} ({widths}) in {prune_seconds:.0f} s")

    rows: list[list[str]] = []
    points: list[tuple[int, float, float]] = []  # tokens, WikiText-2 and demo ratios to the unpruned model

    def row(tokens: int, scores: dict[str, float]) -> None:
        points.append((tokens, scores["wikitext"] / base["wikitext"], scores["demo"] / base["demo"]))
        rows.append(
            [f"{tokens:,}", fmt_ppl(scores["wikitext"]), f"{scores['wikitext'] / base['wikitext']:.2f}x",
             fmt_ppl(scores["demo"]), f"{scores['demo'] / base['demo']:.2f}x"]
        )  # fmt: skip
        log(" | ".join(rows[-1]))
        partial = args.out / "deep-heal.partial.md"  # readable while a long run goes on
        partial.write_text("\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n")

    row(0, measure(student))
    per_step = BATCH * SEQ_LEN
    at = {c // per_step for c in CHECKPOINTS if c < max_tokens} | {steps}
    curve = Curve(at, measure)
    dataset = add_example_ids(lm_dataset(blocks))
    cache = build_teacher_cache(  # recorded while the teacher wrote: read, not recomputed
        teacher, dataset, args.text_cache, k=TOP_K, temperature=TEMPERATURE, show_progress=False
    )
    config = HealConfig(
        heal_method="kd", heal_steps=steps, learning_rate=args.lr, per_device_batch_size=BATCH,
        kd_top_k=TOP_K, kd_temperature=TEMPERATURE, kd_alpha=ALPHA,
    )  # fmt: skip
    run = RunConfig(seed=args.seed, report_to="none", save_steps=steps + 1, show_progress=False)
    torch.manual_seed(args.seed)
    student.requires_grad_(True)
    timer = StepTimer()  # optimizer steps only: not the measurements, not heal's final checkpoint
    with tempfile.TemporaryDirectory(prefix="bench-deep-heal-") as folder:
        healed, tokens = heal(
            student,
            tokenizer,
            config,
            Path(folder),
            args.lr,
            dataset,
            run=run,
            teacher_cache=cache,
            callbacks=[timer, curve],
        )
    healing = timer.seconds
    for step, scores in curve.points:
        row(step * per_step, scores)
    throughput = tokens / healing
    report.text(
        f"Model `{args.model_path}`: {total:,} parameters, perplexity {base['wikitext']:.2f} on {work.eval_tokens:,} "
        f"WikiText-2 test tokens and {base['demo']:.2f} on {demo_eval.numel():,} demo held-out tokens. Pruned by "
        f"`budget_requests(fraction={args.fewer:g}, shares={shares})` with the refit, on "
        f"{written.numel():,} tokens the unpruned model wrote: {params:,} parameters "
        f"({100 * (1 - params / total):.1f}% fewer; {widths}), in {prune_seconds:.0f} s. Healing: `heal` with "
        f"`heal_method='kd'` (every parameter trains), {steps} steps of {BATCH} x {SEQ_LEN} teacher-written tokens "
        f"({tokens:,} tokens), peak learning rate {args.lr:g}, warmup {max(1, steps // 10)} steps then cosine, "
        f"top-{TOP_K} cached logits, temperature {TEMPERATURE:g}, alpha {ALPHA:g}. The teacher wrote "
        f"{written.numel() + blocks.numel():,} tokens in {writing:.0f} s (0 when reused from the cache). "
        f"Healing {healing:.0f} s in optimizer steps: {throughput:.0f} tokens/s, so 1,048,576 tokens "
        f"would take about {1048576 / throughput / 3600:.1f} h of training here."
    )
    report.table(["healing tokens", "WikiText-2 test", "x base", "demo held-out", "x base"], rows)
    figure(report, points, args.fewer)
    report.write()
    (args.out / "deep-heal.partial.md").unlink(missing_ok=True)
    del healed


def figure(report: Report, points: list[tuple[int, float, float]], fewer: float) -> None:
    """Perplexity ratio to the unpruned model against healing tokens, both texts (the issue's target
    after healing drawn for the 25% cut)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    tokens = [p[0] for p in points]
    ax.plot(tokens, [p[1] for p in points], "o-", label="WikiText-2 test")
    ax.plot(tokens, [p[2] for p in points], "s-", label="demo held-out")
    if abs(fewer - 0.25) < 1e-9:
        ax.axhline(1.20, color="grey", linestyle="--", linewidth=1, label="target after healing (1.20x)")
    ax.set_xscale("symlog", linthresh=16384)
    ax.set_xlabel("healing tokens (0, then log scale)")
    ax.set_ylabel("perplexity / unpruned")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    report.figure(fig, "curve", "Perplexity ratio to the unpruned model against distillation tokens")


if __name__ == "__main__":
    main()
