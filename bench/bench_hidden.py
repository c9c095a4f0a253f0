"""Hidden-dimension pruning, one-shot: alone, and against / combined with MLP pruning at matched sizes.

On the demo model, no healing. Perplexity: WikiText-2 test, 16 x 512 tokens; calibration: 32 x 256 tokens
of WikiText-2 valid. Rows: the hidden axis alone at -10% / -20% of the channels (kept widths rounded down to
a multiple of the head count), with and without the refit of its readers (damping 0.01); the rotated basis
(``pca``) against ``activation`` at -20% on a copy whose head is untied (rotation needs that; the copy has
vocab x hidden more parameters); then at 12% and 25% fewer parameters: MLP width alone
(``target_parameters``, ``hybrid`` scores, with its refit), the hidden axis alone (the widest multiple of
the head count within the budget) with its refit, and half the removed parameters from each axis (hidden
first, then MLP width to the budget), both refit.

    python bench/bench_hidden.py --threads 2         # ~13 min on 2 CPU cores
    python bench/bench_hidden.py --quick             # a tiny budget, a minute

Further flags: the shared ones of ``bench/common.py``. Writes <out>/hidden.md.
"""

from __future__ import annotations

import copy
import time

import torch
from common import Progress, Report, base_parser, fmt_ppl, load_workload, measure, setup

from optipfair_train import prune_model
from optipfair_train.analysis import count_parameters
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import HiddenPlan, apply_hidden


def _per_channel(model) -> int:
    """Parameters one residual channel costs (the count is linear in the hidden size)."""
    adapter = get_adapter(model)
    step = adapter.config.num_attention_heads
    trial = copy.deepcopy(model)
    apply_hidden(trial, HiddenPlan(torch.arange(adapter.hidden_size - step), adapter.hidden_size))
    return (count_parameters(model) - count_parameters(trial)) // step


def _hidden_width(model, remove_params: float, per_channel: int) -> int:
    """Widest multiple of the head count that removes at least ``remove_params`` parameters."""
    adapter = get_adapter(model)
    step = adapter.config.num_attention_heads
    channels = -(-int(remove_params) // per_channel)  # ceil
    return (adapter.hidden_size - channels) // step * step


def _untie(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose LM head is its own parameter (rotation needs an untied head)."""
    untied = copy.deepcopy(model)
    head, embedding = untied.get_output_embeddings(), untied.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        untied.config.tie_word_embeddings = False
    return untied


def main() -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args()
    setup(args)
    report = Report("hidden", "Hidden-dimension pruning, one-shot (demo model, no healing)", args.out)
    work = load_workload(
        args,
        eval_tokens=(2 if args.quick else 16) * 512,
        calibration_samples=8 if args.quick else 32,
        calibration_seq_len=256,
    )
    log = Progress()
    base = work.model.eval()
    total = count_parameters(base)
    d = get_adapter(base).hidden_size
    per_channel = _per_channel(base)
    base_ppl = measure(base, work, crows=False)["perplexity"]
    log(f"base perplexity {base_ppl:.2f}, {total:,} parameters, {per_channel:,} per residual channel")
    rows: list[list[object]] = [["none", "-", f"{total:,}", "0.0%", fmt_ppl(base_ppl), "1.00x", "-"]]

    def run(name: str, size: str, steps: list[dict], source: torch.nn.Module = base) -> None:
        model = copy.deepcopy(source)
        start = time.perf_counter()
        for kwargs in steps:
            prune_model(model, dataloader=work.calibration, show_progress=False, **kwargs)
        seconds = time.perf_counter() - start
        ppl = measure(model, work, crows=False)["perplexity"]
        params = count_parameters(model)
        widths = f"hidden {model.config.hidden_size}, MLP {get_adapter(model).intermediate_sizes()[0]}"
        rows.append(
            [
                name,
                size,
                f"{params:,} ({widths})",
                f"{100 * (1 - params / total):.1f}%",
                fmt_ppl(ppl),
                f"{ppl / base_ppl:.2f}x",
                f"{seconds:.0f}",
            ]
        )
        log(" | ".join(str(c) for c in rows[-1]))
        partial = args.out / "hidden.partial.md"  # the rows so far, readable while a long run goes on
        partial.write_text("\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows) + "\n")

    hidden = dict(pruning_type="HIDDEN")
    refit = dict(reconstruct=True, damping=0.01)
    for percentage in (10, 20):  # the most asked-for rows first: a stopped run keeps them (partial file)
        run(f"hidden -{percentage}% (activation)", "-", [dict(hidden, pruning_percentage=percentage)])
        run(f"hidden -{percentage}% + refit", "-", [dict(hidden, pruning_percentage=percentage, **refit)])
    for share in (0.12, 0.25):
        target = int(total * (1 - share))
        size = f"{share:.0%} fewer"
        mlp = dict(pruning_type="MLP_GLU", target_parameters=target)
        run("MLP width (hybrid) + refit", size, [dict(mlp, **refit)])
        alone = _hidden_width(base, total - target, per_channel)
        run("hidden + refit", size, [dict(hidden, pruning_percentage=100 * (1 - alone / d), **refit)])
        half = _hidden_width(base, (total - target) / 2, per_channel)
        both = [dict(hidden, pruning_percentage=100 * (1 - half / d), **refit), dict(mlp, **refit)]
        run("hidden half + MLP width, both refit", size, both)
    l2 = dict(hidden, pruning_percentage=20, neuron_selection_method="activation_l2")
    run("hidden -20% (activation_l2)", "-", [l2])
    untied = _untie(base)  # the same function with vocab x hidden more parameters
    for method in ("activation", "pca"):
        step = dict(hidden, pruning_percentage=20, neuron_selection_method=method)
        run(f"untied head: hidden -20% ({method})", "-", [step], source=untied)
    report.text(
        f"Base perplexity {base_ppl:.2f}; one residual channel costs {per_channel:,} parameters. "
        f"Calibration {sum(int(b['attention_mask'].sum()) for b in work.calibration):,} tokens, "
        f"perplexity on {work.eval_tokens:,} tokens. No healing."
    )
    report.table(["setting", "size", "parameters", "fewer", "perplexity", "vs base", "prune s"], rows)
    report.write()
    (args.out / "hidden.partial.md").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
