"""Inference speed after pruning: prefill and decode tokens/s of the base and pruned models, batch 1 and 8.

Writes ``<out>/inference.md`` and ``<out>/inference-speedup.png`` (and prints the tables). The models: the
base, MLP width -20% and -40% (``activation`` scorer), depth -6 blocks (measured block ``importance``; at
most half the blocks of a smaller model) and one KV group of attention removed (``activation`` scores;
-1/3 of the groups on the demo model), all pruned with the same calibration batches of WikiText-2 valid.
Speed comes from :func:`optipfair_train.evaluation.tokens_per_second` (greedy decoding with the KV cache;
the prompt is the start of WikiText-2 valid). The models are measured interleaved: every round measures
each model once per batch size, in a rotating order, so machine load hits all alike; the tables give the
median over rounds, and the speed-up is the median of the per-round ratios to the base. Asserts nothing.

With ``--budgets`` the pruned rows are parameter budgets instead (``budget_requests(fraction=...,
shares=...)`` for every fraction and every ``--shares`` mix, calibrated, no refit: the refit changes
values, not shapes), and a last table checks each against the target "decode at batch 1 and 8 at least
0.9x as much faster as the parameter ratio allows" (measured speed-up / ideal speed-up).

Usage:
    python bench/bench_inference.py --quick --threads 1    # ~1 min on the demo model (2 cores, loaded)
    python bench/bench_inference.py --threads 1            # ~6 min (5 rounds, 128-token prompt, 32 new tokens)
    python bench/bench_inference.py --threads 2 --budgets 0.12 0.25 0.5 --shares mlp=1 hidden=0.25,mlp=0.75
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import Report, base_parser, load_workload, setup

from optipfair_train import count_parameters, prune_model
from optipfair_train.evaluation import tokens_per_second
from optipfair_train.pruning import apply, plan
from optipfair_train.pruning.budget import budget_requests, parse_shares


def _pruned_variants(num_layers: int, num_kv_heads: int) -> tuple[dict, list[str]]:
    """``{name: (prune_model kwargs)}`` for the pruned rows, and notes on what had to be skipped."""
    variants = {
        "MLP width -20% (`activation`)": dict(pruning_type="MLP", pruning_percentage=20),
        "MLP width -40% (`activation`)": dict(pruning_type="MLP", pruning_percentage=40),
    }
    notes = []
    depth = min(6, num_layers // 2)
    if depth >= 1:
        variants[f"depth -{depth} blocks (`importance`)"] = dict(
            pruning_type="DEPTH", num_layers_to_remove=depth, layer_selection_method="importance"
        )
    else:
        notes.append("Depth pruning was skipped: the model has a single block.")
    if num_kv_heads >= 2:
        variants[f"KV groups -1/{num_kv_heads} (`activation`)"] = dict(
            pruning_type="ATTENTION", pruning_percentage=100 / num_kv_heads, head_granularity="group"
        )
    else:
        notes.append("KV-group pruning was skipped: the model has a single key/value head.")
    return variants, notes


def _budget_variants(fractions: list[float], mixes: list[str]) -> dict:
    """``{name: (fraction, shares)}`` for the ``--budgets`` rows (shares parsed, so a typo stops here)."""
    return {f"{100 * f:g}% fewer, {m}": (f, parse_shares(m)) for f in fractions for m in mixes}


def _gain_share(speedup: float, ideal: float) -> float:
    """The share of the ideal gain measured: (speed-up - 1) / (ideal - 1)."""
    return (speedup - 1) / (ideal - 1) if ideal > 1 else float("nan")


def _prompt(tokenizer, text: str, tokens: int) -> str:
    ids = tokenizer(text[: 20 * tokens]).input_ids[:tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _speedup_figure(names: list[str], speedups: dict, ideal: dict, settings: list[tuple[str, int]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2))
    ax = fig.subplots()
    width = 0.8 / (len(settings) + 1)
    for j, (kind, batch) in enumerate(settings):
        values = [speedups[name][(kind, batch)] for name in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=f"{kind}, batch {batch}")
    ax.bar(
        [i + len(settings) * width for i in range(len(names))],
        [ideal[name] for name in names],
        width,
        color="lightgrey",
        edgecolor="black",
        label="ideal (parameter ratio)",
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + len(settings) * width / 2 for i in range(len(names))])
    ax.set_xticklabels([n.replace("`", "").replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("speed-up vs base (x)")
    ax.legend(fontsize=8, ncols=3)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=None, help="prompt length (default 128; quick 32)"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32; quick 8)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--budgets", type=float, nargs="*", default=None, help="fractions removed, e.g. 0.25")
    parser.add_argument("--shares", nargs="+", default=["mlp=1"], help="budget mixes (with --budgets)")
    args = parser.parse_args()
    budgets = _budget_variants(args.budgets, args.shares) if args.budgets else {}
    rounds = args.rounds or (3 if args.quick else 5)
    prompt_tokens = args.prompt_tokens or (32 if args.quick else 128)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    setup(args)

    report = Report(
        "inference",
        "Inference speed after pruning",
        args.out,
    )
    work = load_workload(args, eval_tokens=512, calibration_samples=4 if args.quick else 8)
    base, tokenizer = work.model, work.tokenizer
    config = base.config
    num_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    variants, notes = _pruned_variants(config.num_hidden_layers, num_kv)
    if budgets:
        variants = budgets

    models = {"base": base}
    for name, kwargs in variants.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        try:
            if budgets:
                fraction, shares = kwargs
                requests = budget_requests(model, fraction=fraction, shares=shares, calibrated=True)
                apply(model, plan(model, requests, work.calibration))
            else:
                prune_model(model, dataloader=work.calibration, show_progress=False, **kwargs)
        except ValueError as err:  # e.g. a family whose attention cannot lose a group
            notes.append(f"{name} was skipped: {err}")
            continue
        print(f"pruned {name} in {time.perf_counter() - start:.1f} s", flush=True)
        models[name] = model.eval()
    params = {name: count_parameters(m) for name, m in models.items()}

    prompt = _prompt(tokenizer, "\n".join(work.valid_texts(args.data)), prompt_tokens)
    settings = [(kind, b) for b in batch_sizes for kind in ("prefill", "decode")]
    speed = {name: {s: [] for s in settings} for name in models}
    measured_prompt = None
    for model in models.values():  # warm-up, not measured
        tokens_per_second(
            model, tokenizer, prompt, max_new_tokens=2, batch_size=max(batch_sizes), warmup=0, runs=1
        )
    names = list(models)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        print(f"round {r + 1}/{rounds}: {', '.join(order)}", flush=True)
        for batch in batch_sizes:
            for name in order:
                result = tokens_per_second(
                    models[name],
                    tokenizer,
                    prompt,
                    max_new_tokens=new_tokens,
                    batch_size=batch,
                    warmup=0,
                    runs=1,
                )
                measured_prompt = result["prompt_tokens"]
                speed[name][("prefill", batch)].append(result["prefill_tokens_per_second"])
                speed[name][("decode", batch)].append(result["decode_tokens_per_second"])

    speedups = {
        name: {
            s: statistics.median(p / b for p, b in zip(speed[name][s], speed["base"][s], strict=True))
            for s in settings
        }
        for name in names
    }
    ideal = {name: params["base"] / params[name] for name in names}
    header = ["model", "parameters", "vs base", "ideal speed-up"] + [
        f"{kind} tok/s, batch {b} (speed-up)" for kind, b in settings
    ]
    rows = []
    for name in names:
        cells = [
            f"{statistics.median(speed[name][s]):,.0f}"
            + ("" if name == "base" else f" ({speedups[name][s]:.2f}x)")
            for s in settings
        ]
        rows.append(
            [name, f"{params[name]:,}", f"{params[name] / params['base']:.3f}", f"{ideal[name]:.2f}x", *cells]
        )
    report.text(
        f"Model `{args.model_path}`; prompt of {measured_prompt} tokens (start of WikiText-2 valid), "
        f"{new_tokens} greedy tokens decoded with the KV cache; batch sizes {', '.join(map(str, batch_sizes))} "
        f"(tokens/s count every sequence of the batch); {rounds} interleaved rounds, medians; "
        f"{torch.get_num_threads()} torch thread(s). Calibration for the pruning: "
        f"{sum(int(b['attention_mask'].sum()) for b in work.calibration):,} tokens of WikiText-2 valid."
    )
    report.table(
        header, rows, title="Tokens per second, base and pruned (speed-up = median of per-round ratios)"
    )

    embedding = base.get_input_embeddings().weight.numel()
    tied = base.get_output_embeddings() is not None and (
        base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    )
    report.text(
        "The ideal speed-up is base parameters / pruned parameters: what time proportional to parameter count "
        "would give. The embeddings and the lm_head limit it: only the hidden axis touches them (the embedding matrix "
        f"has {embedding:,} parameters, {100 * embedding / params['base']:.0f}% of the base"
        + (", and is tied with the lm_head" if tied else "")
        + "), so the parameter ratio cannot fall below their share, and the lm_head multiplies every position "
        "by a vocabulary-sized matrix whatever was pruned. Measured speed-ups can differ from the ideal either "
        "way: attention over the KV cache, norms and per-block overheads are not parameters and shrink only "
        "when whole blocks (depth) or heads go, while smaller matrices can also run more efficiently. "
        "Differences of a few percent are within the run-to-run noise of a shared machine."
    )
    if notes:
        report.text(" ".join(notes))
    if budgets:
        decode = [s for s in settings if s[0] == "decode"]
        target_rows = [
            [name, f"{ideal[name]:.2f}x"]
            + [
                f"{speedups[name][s]:.2f}x: gain {_gain_share(speedups[name][s], ideal[name]):.2f} of ideal "
                + ("(met)" if _gain_share(speedups[name][s], ideal[name]) >= 0.9 else "(missed)")
                for s in decode
            ]
            for name in names
            if name != "base"
        ]
        report.table(
            ["budget", "ideal"] + [f"decode, batch {b}" for _, b in decode],
            target_rows,
            title="Target: decode at least 0.9x as much faster as the parameter ratio allows",
        )
        report.text(
            "Gain share = (measured speed-up - 1) / (ideal speed-up - 1): the part of the speed the removed "
            "parameters could give that decoding actually gets; the target asks for 0.9 or more."
        )
    report.figure(
        _speedup_figure([n for n in names if n != "base"], speedups, ideal, settings),
        "speedup",
        "Measured speed-up vs base per setting, and the ideal (parameter ratio)",
    )
    report.write()


if __name__ == "__main__":
    main()
