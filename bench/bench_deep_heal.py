"""The healing curve of a deep cut: 25% fewer parameters, healed by full-student distillation.

On the demo model: ``budget_requests(model, fraction=--fewer, shares=--shares, calibrated=True,
reconstruct=True)`` (default MLP width only), scored and refit on 32 x 256 tokens the unpruned model
writes itself (the demo's ``calibration_data: teacher``), then one healing run of the pipeline's own
``heal`` with ``heal_method="kd"``: every parameter of the student trains on the unpruned model's cached
top-64 logits (temperature 2, alpha 0.9), on blocks of 128 tokens, ``--batch`` blocks per step, AdamW at
``--lr`` with the pipeline's schedule (warmup a tenth of the steps, cosine decay to ``--max-tokens``),
under bfloat16 autocast with ``--bf16`` (the config's ``bf16: true``). The healing text (``--text``):

* ``teacher`` (default): blocks the unpruned model writes (its logits are recorded while it writes, so
  the teacher never runs during training), as many as the run needs;
* ``mix``: every block of WikiText-2 valid (about 2,000 of 128 tokens) plus ``--teacher-blocks`` blocks the
  unpruned model writes, shuffled together; the teacher's logits on the WikiText blocks are cached once
  before training; a run longer than the text goes through it several times (epochs).

Perplexity on WikiText-2 test (16 x 512 tokens, text healing never sees) and on the demo's held-out
split (8 x 512) at 0, 16k, 32k, 64k, ... healing tokens and at the end; zero-shot accuracy
(``--zeroshot-items`` a task of ARC-Easy, HellaSwag, PIQA, WinoGrande, 0 = skip) of the unpruned, the
pruned and the healed model, with paired changes. The points come from one run,
so an early point is a model in mid-schedule (learning rate still high), not one healed with that budget.
Healing throughput (tokens per second, measurements excluded) and the teacher's writing time are reported,
so the cost of a longer run can be read off.

The teacher's text is kept in ``--text-cache`` (default ``~/.cache/optipfair_train/bench-deep-heal``): a
rerun with the same sizes and seed reuses it.

    python bench/bench_deep_heal.py --threads 2                        # 98,304 tokens: ~30 min on 2 cores
    python bench/bench_deep_heal.py --threads 2 --max-tokens 1048576   # the issue's ~1M tokens: ~3.5 h
    python bench/bench_deep_heal.py --threads 2 --max-tokens 1048576 --text mix --bf16 --batch 8 --lr 1e-4
    #   ^ docs/benchmarks/deep-heal-1m.md: ~1.5 h on 2 cores with bfloat16 arithmetic (13 min of teacher logits)
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
from optipfair_train.zeroshot import load_tasks, zeroshot_change, zeroshot_scores

SEQ_LEN, TOP_K, TEMPERATURE, ALPHA = 128, 64, 2.0, 0.9
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
    parser.add_argument(
        "--text", choices=["teacher", "mix"], default="teacher", help="healing text (teacher)"
    )
    parser.add_argument("--teacher-blocks", type=int, default=768, help="--text mix: teacher-written blocks")
    parser.add_argument("--batch", type=int, default=4, help="blocks of 128 tokens per optimizer step (4)")
    parser.add_argument("--bf16", action="store_true", help="heal under bfloat16 autocast (HealConfig.bf16)")
    parser.add_argument("--zeroshot-items", type=int, default=0, help="items per zero-shot task (0 = skip)")
    args = parser.parse_args()
    shares = parse_shares(args.shares)
    max_tokens = args.max_tokens or (2048 if args.quick else 98304)
    batch = args.batch
    steps = max_tokens // (batch * SEQ_LEN)
    if steps < 1 or not 0 < args.fewer < 1 or batch < 1 or args.teacher_blocks < 0:
        parser.error(f"--max-tokens must be >= {batch * SEQ_LEN}, --fewer in (0, 1), --batch >= 1")
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
    own = (
        steps * batch
        if args.text == "teacher"
        else (min(4, args.teacher_blocks) if args.quick else args.teacher_blocks)
    )
    blocks = sample_teacher_text(teacher, args.text_cache, own, SEQ_LEN, **text) if own else None
    writing = time.perf_counter() - start
    log(f"teacher text: {written.numel():,} calibration + {own * SEQ_LEN:,} healing tokens, {writing:.0f} s")
    if args.text == "mix":  # real text beside the teacher's, shuffled once with the seed
        wiki = tokenize_for_lm(tokenizer, work.valid_texts(args.data), seq_len=SEQ_LEN)
        if args.quick:
            wiki = wiki[:16]
        blocks = wiki if blocks is None else torch.cat([blocks, wiki])
        blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))]
        log(f"healing text: {len(wiki):,} WikiText-2 valid + {own:,} teacher blocks of {SEQ_LEN}")
    zs_tasks = load_tasks(["arc_easy", "hellaswag", "piqa", "winogrande"]) if args.zeroshot_items else None

    def zeroshot(model) -> dict | None:
        if zs_tasks is None:
            return None
        return zeroshot_scores(model, tokenizer, zs_tasks, sample_size=args.zeroshot_items, seed=args.seed)

    base = measure(teacher)
    zs = {"unpruned": zeroshot(teacher)}
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
    zs["pruned"] = zeroshot(student)
    per_step = batch * SEQ_LEN
    at = {c // per_step for c in CHECKPOINTS if c < max_tokens} | {steps}
    curve = Curve(at, measure)
    dataset = add_example_ids(lm_dataset(blocks))
    start = time.perf_counter()
    cache = build_teacher_cache(  # teacher text: recorded while the teacher wrote, read, not recomputed
        teacher, dataset, args.text_cache, k=TOP_K, temperature=TEMPERATURE, show_progress=args.text == "mix"
    )
    caching = time.perf_counter() - start
    config = HealConfig(
        heal_method="kd", heal_steps=steps, learning_rate=args.lr, per_device_batch_size=batch,
        kd_top_k=TOP_K, kd_temperature=TEMPERATURE, kd_alpha=ALPHA, bf16=args.bf16,
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
    zs["healed"] = zeroshot(healed)
    throughput = tokens / healing
    text_line = (
        f"{batch} x {SEQ_LEN} teacher-written tokens"
        if args.text == "teacher"
        else f"{batch} x {SEQ_LEN} tokens drawn from {len(blocks):,} blocks ({own:,} teacher-written, the rest "
        f"every block of WikiText-2 valid; {tokens / blocks.numel():.1f} passes), the teacher's logits on "
        f"them cached in {caching:.0f} s"
    )
    report.text(
        f"Model `{args.model_path}`: {total:,} parameters, perplexity {base['wikitext']:.2f} on {work.eval_tokens:,} "
        f"WikiText-2 test tokens and {base['demo']:.2f} on {demo_eval.numel():,} demo held-out tokens. Pruned by "
        f"`budget_requests(fraction={args.fewer:g}, shares={shares})` with the refit, on "
        f"{written.numel():,} tokens the unpruned model wrote: {params:,} parameters "
        f"({100 * (1 - params / total):.1f}% fewer; {widths}), in {prune_seconds:.0f} s. Healing: `heal` with "
        f"`heal_method='kd'` (every parameter trains{', bf16 autocast' if args.bf16 else ''}), {steps} steps of "
        f"{text_line} ({tokens:,} tokens), peak learning rate {args.lr:g}, warmup {max(1, steps // 10)} steps then cosine, "
        f"top-{TOP_K} cached logits, temperature {TEMPERATURE:g}, alpha {ALPHA:g}. The teacher wrote "
        f"{written.numel() + own * SEQ_LEN:,} tokens in {writing:.0f} s (0 when reused from the cache). "
        f"Healing {healing:.0f} s in optimizer steps: {throughput:.0f} tokens/s, so 1,048,576 tokens "
        f"would take about {1048576 / throughput / 3600:.1f} h of training here."
    )
    report.table(["healing tokens", "WikiText-2 test", "x base", "demo held-out", "x base"], rows)
    if zs_tasks is not None:
        zeroshot_table(report, zs, args.zeroshot_items, args.seed)
    figure(report, points, args.fewer)
    report.write()
    (args.out / "deep-heal.partial.md").unlink(missing_ok=True)
    del healed


def zeroshot_table(report: Report, zs: dict[str, dict], items: int, seed: int) -> None:
    """Zero-shot accuracy of the unpruned, pruned and healed models, with the paired change vs unpruned."""
    rows = []
    for name, scores in zs.items():
        mean = scores["mean"]
        change = "-"
        if name != "unpruned":
            c = zeroshot_change(zs["unpruned"], scores, seed=seed)["mean"]
            change = f"{c['acc_change']:+.1f} [{c['acc_change_ci_low']:+.1f}, {c['acc_change_ci_high']:+.1f}]"
        tasks = " / ".join(f"{t['acc']:.1f}" for t in scores["tasks"].values())
        rows.append(
            [name, f"{mean['acc']:.1f} [{mean['acc_ci_low']:.1f}, {mean['acc_ci_high']:.1f}]", tasks, change]
        )
    report.text(
        f"Zero-shot accuracy, {items} seeded items a task (the same items for every model), 95% bootstrap "
        "intervals; the change is paired (same items) against the unpruned model."
    )
    names = " / ".join(next(iter(zs.values()))["tasks"])
    report.table(["model", "mean accuracy", names, "change vs unpruned (points)"], rows)


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
