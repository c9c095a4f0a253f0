"""One-shot side by side with Torch-Pruning 1.6.1 and OptiPFair 0.4.2, at the same parameter counts.

On the demo model, no healing. For each size (``--fewer``, default about 12%, 25% and 50% fewer
parameters) Torch-Pruning prunes the hidden dimension and the MLP width by one ratio (its LLM example's
``MetaPruner`` setting, with the workaround and rounding of ``bench/torch_pruning_worker.py``) with each
``--criteria`` (its ``activation`` and ``taylor`` importance); its pruned model's parameter count is the
target of every other row of that size:

* ours, MLP width only (``budget_requests(model, target, shares={"mlp": 1})``, ``hybrid`` scores), without
  and with the refit of the kept ``down_proj`` columns;
* ours, each ``--mixtures`` split of the removed parameters between the hidden dimension and the MLP
  width (default ``hidden=0.25,mlp=0.75`` and ``hidden=0.5,mlp=0.5``), both refit;
* OptiPFair 0.4.2 where it has the axis: MLP width only, its data-driven mode (``MAW`` scores with a
  dataloader), the fewest neurons per layer that reach the target (OptiPFair has no parameter target).

Every side gets the same calibration tensors (32 x 256 tokens of WikiText-2 valid); perplexity on
16 x 512 tokens of WikiText-2 test, in this process, for every model (the peers' models come back through
``save_pretrained``). Wall seconds: the pruning alone inside each process (building the pruner,
calibration passes, scoring, refits, cutting), not loading, copying or saving.

The peers run in their own venvs, created on first use (``--torch-pruning-venv``, default
``~/.cache/optipfair_train/bench-torch-pruning-1.6.1``; ``--optipfair-venv``; both share this
interpreter's torch and transformers and need PyPI once).

    python bench/bench_peers.py --threads 2          # ~20-25 min on 2 quiet CPU cores (estimated)
    python bench/bench_peers.py --quick              # 25% only, 8 x 256 calibration tokens, 2 x 512 scored,
                                                     # Torch-Pruning `activation` only: 9 min at load 5

Further flags: the shared ones of ``bench/common.py``. Writes <out>/peers.md.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import optipfair_worker
import torch
import torch_pruning_worker as tpw
from common import Progress, Report, base_parser, fmt_ppl, load_workload, measure, setup
from transformers import AutoModelForCausalLM

from optipfair_train.analysis import count_parameters
from optipfair_train.arch import get_adapter
from optipfair_train.models import demo_model_dir
from optipfair_train.pruning import apply, plan
from optipfair_train.pruning.budget import budget_requests, parse_shares

HEADER = ["library", "setting", "parameters", "fewer", "perplexity", "x base", "wall s"]


def model_folder(model_path: str) -> str:
    """The folder every side loads: the demo model's converted folder for 'demo'."""
    if model_path == "demo":
        return str(demo_model_dir())
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.is_dir() else model_path


def torch_pruning_parameters(config, ratio: float, round_to: int) -> int:
    """The parameter count Torch-Pruning leaves on a LLaMA-layout model (no biases) at ``ratio``.

    Its local pruning keeps ``int(C * (1 - ratio))`` channels of a group of ``C``, rounded down to a
    multiple of ``round_to``; hidden and MLP width alike, heads untouched.

    Example:
        >>> from transformers import LlamaConfig
        >>> c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                 num_key_value_heads=1, vocab_size=10, tie_word_embeddings=True)
        >>> torch_pruning_parameters(c, 0.0, 1)  # 80 + 2*8 + 8*(8+4+4) + 8*8 + 3*8*16 + 8
        680
    """

    def kept(channels: int) -> int:
        k = int(channels * (1 - ratio))
        return k - k % round_to

    h, m = kept(config.hidden_size), kept(config.intermediate_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    layer = 2 * h + h * (q + 2 * kv) + q * h + 3 * h * m
    return embeddings + config.num_hidden_layers * layer + h


def torch_pruning_ratio(config, fewer: float, round_to: int) -> float:
    """The ratio (in steps of 0.001) whose predicted parameter count is nearest ``fewer`` removed."""
    total = torch_pruning_parameters(config, 0.0, 1)
    ratios = [r / 1000 for r in range(1, 950)]
    return min(ratios, key=lambda r: abs(1 - torch_pruning_parameters(config, r, round_to) / total - fewer))


def optipfair_percentage(model: torch.nn.Module, target: int) -> tuple[float, int]:
    """OptiPFair's ``pruning_percentage`` removing the fewest neurons per layer that reach ``target``,
    and that count. It keeps ``I - int(p / 100 * I)`` neurons, so the half-step lands exactly on a count."""
    adapter = get_adapter(model)
    width = adapter.intermediate_sizes()[0]
    per_neuron = 3 * adapter.hidden_size * adapter.num_layers  # gate row, up row, down column; no biases
    remove = min(width - 1, -(-(count_parameters(model) - target) // per_neuron))
    return 100 * (remove + 0.5) / width, remove


def widths(model: torch.nn.Module) -> str:
    adapter = get_adapter(model)
    return f"hidden {adapter.hidden_size}, MLP {adapter.intermediate_sizes()[0]}"


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--fewer", type=float, nargs="+", default=None, help="sizes, %% fewer (12 25 50)")
    parser.add_argument(
        "--criteria",
        nargs="+",
        choices=tpw.CRITERIA,
        default=None,
        help="Torch-Pruning's (both; quick activation)",
    )
    parser.add_argument(
        "--mixtures",
        nargs="*",
        default=None,
        help="our hidden/MLP splits besides MLP only (hidden=0.25,mlp=0.75 hidden=0.5,mlp=0.5; quick the first)",
    )
    parser.add_argument("--torch-pruning-venv", type=Path, default=None, help=f"default {tpw.default_venv()}")
    parser.add_argument(
        "--optipfair-venv", type=Path, default=None, help=f"default {optipfair_worker.default_venv()}"
    )
    args = parser.parse_args()
    fewer = args.fewer or ([25.0] if args.quick else [12.0, 25.0, 50.0])
    criteria = args.criteria or (["activation"] if args.quick else list(tpw.CRITERIA))
    if args.mixtures is None:
        args.mixtures = ["hidden=0.25,mlp=0.75"] + ([] if args.quick else ["hidden=0.5,mlp=0.5"])
    mixtures = [parse_shares(m) for m in args.mixtures]  # refused here, before anything runs
    if any(not 0 < f < 90 for f in fewer):
        parser.error("--fewer: percentages of parameters removed, between 0 and 90")
    setup(args)
    report = Report(
        "peers",
        f"One-shot side by side: Torch-Pruning {tpw.TORCH_PRUNING_VERSION}, OptiPFair 0.4.2 and ours",
        args.out,
    )
    log = Progress()
    tp_python, tp_install = tpw.ensure_torch_pruning(args.torch_pruning_venv or tpw.default_venv())
    of_python, of_install = optipfair_worker.ensure_optipfair(
        args.optipfair_venv or optipfair_worker.default_venv()
    )
    log(f"venvs ready (Torch-Pruning {tp_install or 0:.0f} s, OptiPFair {of_install or 0:.0f} s to install)")
    work = load_workload(
        args,
        eval_tokens=(2 if args.quick else 16) * 512,
        calibration_samples=8 if args.quick else 32,
        calibration_seq_len=256,
    )
    base = work.model.eval()
    total = count_parameters(base)
    base_ppl = measure(base, work, crows=False)["perplexity"]
    calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in work.calibration]
    heads = base.config.num_attention_heads
    rows: list[list[object]] = [
        ["-", f"unpruned ({widths(base)})", f"{total:,}", "0.0%", fmt_ppl(base_ppl), "1.00x", "-"]
    ]
    log(f"base perplexity {base_ppl:.2f}, {total:,} parameters")

    def add(library: str, setting: str, model: torch.nn.Module, seconds: float) -> int:
        ppl = measure(model.eval(), work, crows=False)["perplexity"]
        params = count_parameters(model)
        rows.append(
            [library, f"{setting} ({widths(model)})", f"{params:,}", f"{100 * (1 - params / total):.1f}%",
             fmt_ppl(ppl), f"{ppl / base_ppl:.2f}x", f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"]
        )  # fmt: skip
        log(" | ".join(str(c) for c in rows[-1]))
        partial = args.out / "peers.partial.md"  # the rows so far, readable while a long run goes on
        partial.write_text(
            "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in [HEADER, *rows]) + "\n"
        )
        return params

    def reload(folder: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        torch.save(calib, tmp / "calibration.pt")
        folder = model_folder(args.model_path)
        tp_worker, of_worker = tpw.Worker(tp_python, tmp), optipfair_worker.Worker(of_python, tmp)
        try:
            tp_info = tp_worker(
                "load", model=folder, threads=args.threads, calibration=str(tmp / "calibration.pt")
            )
            of_worker(
                "load",
                model=folder,
                threads=args.threads,
                calibration=str(tmp / "calibration.pt"),
                packages=[],
            )
            for size in fewer:
                ratio = torch_pruning_ratio(base.config, size / 100, heads)
                target = None
                for criterion in criteria:
                    save = tmp / f"tp-{criterion}"
                    answer = tp_worker(
                        "prune", criterion=criterion, ratio=ratio, round_to=heads, save=str(save)
                    )
                    target = add(
                        "Torch-Pruning",
                        f"hidden + MLP, ratio {ratio:g}, `{criterion}`",
                        reload(save),
                        answer["seconds"],
                    )
                if target is None:  # no Torch-Pruning criterion asked for: the predicted size
                    target = torch_pruning_parameters(base.config, ratio, heads)
                ours = [({"mlp": 1.0}, False), ({"mlp": 1.0}, True), *((m, True) for m in mixtures)]
                for shares, refit in ours:
                    model = copy.deepcopy(base)
                    start = time.perf_counter()
                    requests = budget_requests(
                        model, target, shares=shares, calibrated=True, reconstruct=refit
                    )
                    apply(model, plan(model, requests, calib))
                    seconds = time.perf_counter() - start
                    name = " + ".join(f"{axis} {share:g}" for axis, share in shares.items())
                    add("ours", f"budget {name}, {'refit' if refit else 'no refit'}", model, seconds)
                    del model
                percentage, remove = optipfair_percentage(base, target)
                save = tmp / "optipfair"
                answer = of_worker(
                    "prune", method="MAW", percentage=percentage, data_driven=True, kept=False, save=str(save)
                )
                add(
                    "OptiPFair",
                    f"MLP width -{remove} per layer, data-driven `MAW`",
                    reload(save),
                    answer["seconds"],
                )
        finally:
            tp_worker.close()
            of_worker.close()

    report.text(
        f"Model `{args.model_path}`, {total:,} parameters, base perplexity {base_ppl:.2f}. Calibration "
        f"{sum(int(b['attention_mask'].sum()) for b in calib):,} tokens of WikiText-2 valid (the same tensors on "
        f"every side); perplexity on {work.eval_tokens:,} tokens of WikiText-2 test, in blocks of "
        f"{work.eval_seq_len}, no healing. torch threads: {torch.get_num_threads()} on every side "
        f"(Torch-Pruning worker: {tp_info['threads']}). Torch-Pruning {tp_info['version']}: `MetaPruner`, local "
        f"pruning, one ratio for the hidden and MLP groups, q/k/v and the LM head ignored (without that its "
        f"dependency graph never finishes building on rotary models, VainF/Torch-Pruning#527), kept widths "
        f"rounded down to a multiple of the {heads} heads (`round_to`), the tied head tied again after the cut. "
        f"Ours: `budget_requests(model, target_parameters=<Torch-Pruning's count>, shares=..., calibrated=True, "
        f"reconstruct=<refit>)`, then `plan` and `apply`. OptiPFair: MLP width only (it has no hidden axis), "
        f"its data-driven mode, the fewest neurons per layer that reach the same count."
    )
    report.table(HEADER, rows)
    report.write()
    (args.out / "peers.partial.md").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
