"""Streamed (one block resident) vs in-memory pruning of a saved model: peak memory and time.

Both prune the same safetensors folder (the demo model, float32) into a new folder on the same
``--samples`` x 256 calibration tokens of WikiText-2 valid, with ``--pruning-type``:

- ``MLP`` (default): MLP width -``--percentage``% (``activation`` scores, ``down_proj`` refit at
  damping 0.01, layer by layer); ``in-memory`` is ``from_pretrained`` + ``prune_model(...,
  reconstruct=True, sequential=True)`` + ``save_pruned_model``; report ``streamed.md``.
- ``HIDDEN``: hidden size -``--percentage``% (``activation`` scores after the norms, refit of the
  stream's readers at damping 0.01); ``in-memory`` is ``prune_model(model, "HIDDEN", reconstruct=True)``;
  report ``streamed-hidden.md``.

``streamed`` is ``prune_checkpoint`` (:mod:`optipfair_train.pruning.streamed`) with the same settings.

Each runs in its own fresh process (peak RSS = the child's ``ru_maxrss``, which includes the Python
runtime and torch; "before" = its RSS after imports, tokenizer and calibration text, before loading any
weight), alternating, ``--repeats`` times. The two outputs are then compared tensor by tensor
and WikiText-2 test perplexity is measured on each. Asserts nothing.

    python bench/bench_streamed.py --threads 2        # ~5 min on 2 cores
    python bench/bench_streamed.py --threads 1 --pruning-type HIDDEN --percentage 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Report, base_parser, setup
from transformers import AutoModelForCausalLM, AutoTokenizer

MODES = ("in-memory", "streamed")


def _child(
    mode: str,
    source: str,
    out: str,
    data: Path,
    samples: int,
    percentage: float,
    threads: int,
    pruning_type: str,
) -> None:
    """One pruning run; prints a JSON line with its wall time and peak RSS."""
    if threads:
        torch.set_num_threads(threads)
    from optipfair_train import prune_checkpoint, prune_model, save_pruned_model
    from optipfair_train.data import calibration_dataloader, load_texts

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = load_texts(str(data / "wikitext-2" / "valid.txt"))
    batches = calibration_dataloader(tokenizer, texts, num_samples=samples, seq_len=256, batch_size=4)
    with open("/proc/self/statm") as f:  # what the process holds before pruning: runtime, tokenizer, text
        before_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    options = dict(pruning_percentage=percentage, neuron_selection_method="activation", show_progress=False)
    if mode == "streamed":
        prune_checkpoint(source, out, batches, pruning_type=pruning_type, dtype=torch.float32, **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        sequential = pruning_type == "MLP"  # the hidden refit is one-shot (reads the unpruned model)
        prune_model(
            model, pruning_type, dataloader=batches, reconstruct=True, sequential=sequential, **options
        )
        save_pruned_model(model, out, tokenizer=tokenizer)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": time.perf_counter() - start, "peak_mb": peak_kb / 1024, "before_mb": before_mb}
        )
    )


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=32, help="256-token calibration blocks (default 32)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pruning-type", choices=("MLP", "HIDDEN"), default="MLP")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.data, args.samples, args.percentage, args.threads, args.pruning_type)
        return
    if args.quick:  # a smoke run: a few tokens, one run of each mode
        args.samples, args.repeats = 2, 1
    max_tokens = 1024 if args.quick else 8192
    setup(args)
    from optipfair_train.data import load_texts
    from optipfair_train.evaluation import perplexity
    from optipfair_train.models import demo_model_dir

    source = demo_model_dir() if args.model_path == "demo" else Path(args.model_path)
    hidden = args.pruning_type == "HIDDEN"
    title = (
        "Streamed vs in-memory hidden-axis pruning" if hidden else "Streamed vs in-memory sequential pruning"
    )
    report = Report("streamed-hidden" if hidden else "streamed", title, args.out)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                out = Path(tmp) / f"{mode}-{r}"
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    str(source),
                    str(out),
                    "--data",
                    str(args.data),
                    "--samples",
                    str(args.samples),
                    "--percentage",
                    str(args.percentage),
                    "--threads",
                    str(args.threads),
                    "--pruning-type",
                    args.pruning_type,
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(mode, runs[mode][-1], flush=True)
        models = {
            m: AutoModelForCausalLM.from_pretrained(Path(tmp) / f"{m}-0", dtype=torch.float32).eval()
            for m in MODES
        }
        a, b = (models[m].state_dict() for m in MODES)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        test = load_texts(str(args.data / "wikitext-2" / "test.txt"))
        tokenizer = AutoTokenizer.from_pretrained(source)
        ppl = {m: perplexity(models[m], tokenizer, test, seq_len=512, max_tokens=max_tokens) for m in MODES}
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        params = {m: sum(p.numel() for p in models[m].parameters()) for m in MODES}
        base_ppl = perplexity(base, tokenizer, test, seq_len=512, max_tokens=max_tokens)
    setting = (
        f"hidden size -{args.percentage:g}% `activation` + refit of the stream's readers"
        if hidden
        else f"MLP -{args.percentage:g}% `activation` + sequential refit"
    )
    report.text(
        f"Source `{source}` ({sum(p.numel() for p in base.parameters()):,} parameters, float32, "
        f"{base.config.num_hidden_layers} blocks); {setting} on "
        f"{args.samples} x 256 tokens of WikiText-2 valid; {args.repeats} runs of each mode, alternating, one "
        f"fresh process each, torch threads {args.threads or 'default'}."
    )
    report.table(
        [
            "mode",
            "peak RSS (MB, median)",
            "RSS before pruning (MB)",
            "peak - before (MB)",
            "wall time (s, median)",
            "runs (peak MB / s)",
            "parameters",
            f"WikiText-2 test perplexity ({max_tokens:,} tokens)",
        ],
        [
            [
                m,
                f"{statistics.median(r['peak_mb'] for r in runs[m]):.0f}",
                f"{statistics.median(r['before_mb'] for r in runs[m]):.0f}",
                f"{statistics.median(r['peak_mb'] - r['before_mb'] for r in runs[m]):.0f}",
                f"{statistics.median(r['seconds'] for r in runs[m]):.1f}",
                ", ".join(f"{r['peak_mb']:.0f} / {r['seconds']:.1f}" for r in runs[m]),
                f"{params[m]:,}",
                f"{ppl[m]:.2f}",
            ]
            for m in MODES
        ],
    )
    report.text(
        f"Unpruned: {base_ppl:.2f}. The two outputs are {'identical, tensor for tensor' if equal else 'DIFFERENT'}."
    )
    report.write()


if __name__ == "__main__":
    main()
