"""Refitting the kept down_proj / o_proj columns after pruning: perplexity gained and what it costs.

On the demo model (SmolLM2-135M-Instruct), WikiText-2 test perplexity (16 x 512 tokens; --quick 4 x 512)
after one-shot pruning with the ``activation`` scorer, calibration from WikiText-2 valid (16 x 512
tokens; --quick 4 x 512):

1. MLP width -20%: no refit, ridge refit with damping 0.001 / 0.01 / 0.1, sequential refit at 0.01
   and 0.1 (layer l calibrated on the outputs of the already pruned layers); refit at 0.01 on only
   2,048 calibration tokens.
2. MLP width -30%: no refit, refit (damping 0.01), sequential refit.
3. Attention: one KV group of three removed in every layer, no refit / o_proj refit / sequential.
--quick: 4 x 512 tokens each, -20% MLP and attention at damping 0.01 only.

Time: each ``prune_model`` call (statistics + scoring + refit) against one plain forward pass over the
same calibration batches, measured in the same run (forward timed before and after; the mean is used).

    python bench/bench_reconstruction.py            # ~20 min on 2 quiet CPU cores
    python bench/bench_reconstruction.py --quick    # a few minutes: fewer tokens and settings

Further flags: the shared ones of ``bench/common.py``. Writes <out>/reconstruction.md.
"""

from __future__ import annotations

import copy
import time

import torch
from common import Report, base_parser, load_workload, measure, setup

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter


def _forward_seconds(model: torch.nn.Module, batches: list) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return time.perf_counter() - start


def _settings(quick: bool, kv_groups: int) -> list[tuple[str, dict]]:
    """Settings in order of interest (every row is printed as soon as it is measured)."""
    mlp20 = dict(pruning_type="MLP_GLU", pruning_percentage=20)
    mlp30 = dict(pruning_type="MLP_GLU", pruning_percentage=30)
    # one KV group of the model's (the demo has three; a tiny test model may have two)
    heads = dict(pruning_type="ATTENTION", pruning_percentage=100 / kv_groups, head_granularity="group")
    rows = [
        ("MLP -20%", dict(mlp20)),
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.01)),
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.01, sequential=True)),
        (f"1 of {kv_groups} KV groups", dict(heads)),
        (f"1 of {kv_groups} KV groups", dict(heads, reconstruct=True, damping=0.01)),
        (f"1 of {kv_groups} KV groups", dict(heads, reconstruct=True, damping=0.01, sequential=True)),
    ]
    if quick:
        return rows
    return rows + [
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.001)),
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.1)),
        ("MLP -30%", dict(mlp30)),
        ("MLP -30%", dict(mlp30, reconstruct=True, damping=0.01)),
        ("MLP -30%", dict(mlp30, reconstruct=True, damping=0.01, sequential=True)),
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.01, tokens=2048)),
        ("MLP -20%", dict(mlp20, reconstruct=True, damping=0.1, sequential=True)),
    ]


def _batches_with_tokens(batches: list, tokens: int) -> list:
    """The first batches (rows cut to whole sequences) holding ``tokens`` real tokens."""
    out, total = [], 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            if total >= tokens:
                return out
            out.append({k: v[row : row + 1] for k, v in batch.items()})
            total += int(batch["attention_mask"][row].sum())
    return out


def main() -> None:
    parser = base_parser(__doc__)
    args = parser.parse_args()
    setup(args)
    n = 4 if args.quick else 16
    work = load_workload(args, eval_tokens=n * 512, calibration_samples=n, calibration_seq_len=512)
    base = work.model.eval()
    report = Report("reconstruction", "Refit of the kept columns after pruning (demo model)", args.out)
    calibration_tokens = sum(int(b["attention_mask"].sum()) for b in work.calibration)
    forward = [_forward_seconds(base, work.calibration)]
    rows = []
    for label, setting in _settings(args.quick, get_adapter(work.model).head_counts(0)[1]):
        setting = dict(setting)
        tokens = setting.pop("tokens", calibration_tokens)
        batches = work.calibration if tokens == calibration_tokens else _batches_with_tokens(work.calibration, tokens)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        prune_model(model, neuron_selection_method="activation", dataloader=batches, show_progress=False, **setting)
        seconds = time.perf_counter() - start
        ppl = measure(model, work, crows=False)["perplexity"]
        rows.append(
            [
                label,
                "yes" if setting.get("reconstruct") else "no",
                setting.get("damping", "-"),
                "yes" if setting.get("sequential") else "no",
                sum(int(b["attention_mask"].sum()) for b in batches),
                f"{ppl:.2f}",
                f"{seconds:.1f}",
                seconds,
            ]
        )
        print(rows[-1], flush=True)
        del model
    forward.append(_forward_seconds(base, work.calibration))
    rows.insert(0, ["none", "-", "-", "-", "-", f"{measure(base, work, crows=False)['perplexity']:.2f}", "-", "-"])
    one_forward = sum(forward) / len(forward)
    for row in rows[1:]:
        row[7] = f"{row[7] / one_forward:.1f}x"
    report.text(
        f"Activation scorer throughout. One plain forward pass over the {calibration_tokens:,} calibration "
        f"tokens took {forward[0]:.1f} s before and {forward[1]:.1f} s after the runs; `time` is the whole "
        "`prune_model` call (statistics, scoring, Gram, solve, surgery)."
    )
    report.table(
        ["pruning", "refit", "damping", "sequential", "calibration tokens", "perplexity", "time (s)",
         "time / one forward"],
        rows,
    )
    report.write()


if __name__ == "__main__":
    main()
