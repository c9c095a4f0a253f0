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
``--untie`` first saves a copy of the model whose LM head is a separate copy of its embedding (the same
logits; the demo model's head is tied), so the hidden axis also refits the head (its own section).

Each runs in its own fresh process (peak RSS = the child's ``ru_maxrss``, which includes the Python
runtime and torch; "before" = its RSS after imports, tokenizer and calibration text, before loading any
weight), alternating, ``--repeats`` times. The two outputs are then compared tensor by tensor
and WikiText-2 test perplexity is measured on each. Asserts nothing.

    python bench/bench_streamed.py --threads 2        # ~5 min on 2 cores
    python bench/bench_streamed.py --threads 1 --pruning-type HIDDEN --percentage 10 [--untie]
        [--malloc-mmap-threshold 131072]  # RSS closer to live memory (glibc keeps freed blocks otherwise)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def _untied_copy(source: Path, folder: Path) -> Path:
    """``source`` saved with its LM head as a separate copy of the embedding (tokenizer files copied)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    untied.load_state_dict(model.state_dict())  # a tied state dict names lm_head.weight too: copied
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    untied.save_pretrained(folder)
    weights = ("config.json", "model.safetensors.index.json")
    for item in source.iterdir():  # tokenizer and generation files
        if item.is_file() and item.name not in weights and item.suffix != ".safetensors":
            if not (folder / item.name).exists():
                shutil.copy2(item, folder / item.name)
    return folder


def _plan_line(config, tokens: int, percentage: float) -> str:
    """What bench/memory_plan.py's arithmetic gives for this shape in float32, to set beside the measures."""
    from memory_plan import Shape, hidden_pruning_peak

    shape = Shape(
        config.model_type,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        tied=bool(config.tie_word_embeddings),
    )
    mib = {s: 1024 * hidden_pruning_peak(shape, tokens, percentage, s, dtype_bytes=4) for s in (False, True)}
    return (
        f"The memory plan's arithmetic (bench/memory_plan.py, float32, {tokens:,} tokens) for this shape: "
        f'{mib[False]:.0f} MB in memory, {mib[True]:.0f} MB streamed. It counts live tensors; "peak - before" '
        "also holds one calibration batch's forward (in memory with its logits, 4 x 256 x vocabulary floats) "
        "and what the C allocator keeps after tensors are freed (RSS is the allocator's high-water mark; "
        "streamed, every block is allocated and freed again)."
    )


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--percentage", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=32, help="256-token calibration blocks (default 32)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pruning-type", choices=("MLP", "HIDDEN"), default="MLP")
    parser.add_argument("--untie", action="store_true", help="prune a copy with an untied LM head")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="run the pruning processes with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes",
    )
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

    source = origin = demo_model_dir() if args.model_path == "demo" else Path(args.model_path)
    hidden = args.pruning_type == "HIDDEN"
    title = (
        "Streamed vs in-memory hidden-axis pruning" if hidden else "Streamed vs in-memory sequential pruning"
    )
    if hidden:
        title += f", {'untied' if args.untie else 'the model as saved (demo: tied)'} LM head"
    allocator = os.environ.copy()
    if args.malloc_mmap_threshold:
        title += f", glibc mmap threshold {args.malloc_mmap_threshold:,} bytes"
        allocator["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    report = Report("streamed-hidden" if hidden else "streamed", title, args.out, section=hidden)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        if args.untie:
            source = _untied_copy(source, Path(tmp) / "untied-source")
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
                done = subprocess.run(command, capture_output=True, text=True, check=True, env=allocator)
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
        f"Source `{origin}`{' (an untied copy)' if args.untie else ''} ({sum(p.numel() for p in base.parameters()):,} parameters, float32, "
        f"{base.config.num_hidden_layers} blocks); {setting} on "
        f"{args.samples} x 256 tokens of WikiText-2 valid; {args.repeats} runs of each mode, alternating, one "
        f"fresh process each, torch threads {args.threads or 'default'}"
        + (
            f"; children run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (larger allocations get "
            "their own mapping and go back to the system when freed, so RSS follows live memory)."
            if args.malloc_mmap_threshold
            else "; glibc's default allocator."
        )
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
    if hidden:
        report.text(_plan_line(base.config, args.samples * 256, args.percentage))
    report.text(
        f"Unpruned: {base_ppl:.2f}. The two outputs are {'identical, tensor for tensor' if equal else 'DIFFERENT'}."
    )
    report.write()


if __name__ == "__main__":
    main()
