"""Benchmark the one-shot pruning engine on the demo model (SmolLM2-135M-Instruct).

Prints markdown tables, measured side by side in one run:
1. quality and time per scorer at one MLP width (WikiText-2 test perplexity over a fixed token count);
2. the ``activation`` scorer's statistics pass vs plain forward passes over the same batches (ratio);
3. peak extra memory of the statistics pass with few vs many calibration tokens (same batch size);
4. depth pruning: last-n vs measured block importance.

Usage:
    python bench/bench_pruning.py            # full run (~15 min on 2 CPU cores)
    python bench/bench_pruning.py --quick    # a few minutes
    python bench/bench_pruning.py --model-path PATH --wikitext DIR
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from pathlib import Path

import torch

from optipfair_train import count_parameters, prune_model
from optipfair_train.data import calibration_dataloader, load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pruning import as_batches, mlp_activation_sumsq

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory every 5 ms; ``extra`` is the peak above the level at entry."""

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.start


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="demo")
    parser.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--percentage", type=float, default=20.0)
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_model_and_tokenizer(args.model_path)
    eval_tokens = 4 * 512 if args.quick else 16 * 512
    calib_samples = 4 if args.quick else 8
    test_ids = tokenize_for_lm(
        tokenizer, load_texts(str(args.wikitext / "test.txt")), seq_len=512, num_sequences=eval_tokens // 512
    )
    calib = as_batches(
        calibration_dataloader(
            tokenizer,
            load_texts(str(args.wikitext / "valid.txt")),
            num_samples=calib_samples,
            seq_len=256,
            batch_size=4,
        )
    )
    ppl = lambda m: perplexity(m, input_ids=test_ids, seq_len=512)  # noqa: E731
    base_ppl = ppl(base)
    print(
        f"\nDemo model: {count_parameters(base):,} parameters, WikiText-2 test perplexity {base_ppl:.2f} "
        f"({eval_tokens} tokens); calibration {calib_samples} x 256 tokens of WikiText-2 valid.\n"
    )

    methods = (
        ["activation", "MAW", "L2", "random"]
        if args.quick
        else ["activation", "MAW", "VOW", "PON", "L2", "random"]
    )
    print(f"### MLP width -{args.percentage:g}%, no healing\n")
    print("| scorer | scoring + surgery time (s) | parameters | perplexity |")
    print("|---|---|---|---|")
    for method in methods:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        prune_model(
            model,
            neuron_selection_method=method,
            pruning_percentage=args.percentage,
            dataloader=calib if method == "activation" else None,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        print(f"| {method} | {seconds:.2f} | {count_parameters(model):,} | {ppl(model):.2f} |")

    print("\n### Cost of the activation statistics (same batches)\n")

    def forward_only():
        with torch.inference_mode():
            for batch in calib:
                base(**batch, use_cache=False)

    forward_only()  # warm-up
    _, plain = timed(forward_only)
    _, stats = timed(lambda: mlp_activation_sumsq(base, calib))
    print("| plain forward passes (s) | forward + statistics (s) | ratio |")
    print("|---|---|---|")
    print(f"| {plain:.2f} | {stats:.2f} | {stats / plain:.2f} |")

    print("\n### Peak extra memory of the statistics pass (batch 4 x 256 tokens)\n")
    print("| calibration tokens | peak extra RSS (MB) |")
    print("|---|---|")
    texts = load_texts(str(args.wikitext / "valid.txt"))
    for samples in (4, 16) if args.quick else (4, 64):
        batches = as_batches(
            calibration_dataloader(tokenizer, texts, num_samples=samples, seq_len=256, batch_size=4)
        )
        with PeakRSS() as rss:
            mlp_activation_sumsq(base, batches)
        print(f"| {samples * 256:,} | {rss.extra / 2**20:.0f} |")

    print("\n### Depth pruning, no healing\n")
    print("| blocks removed | selection | removed | perplexity |")
    print("|---|---|---|---|")
    for count in (1, 3) if args.quick else (1, 3, 6):
        for method in ("last", "importance"):
            model = copy.deepcopy(base)
            _, s = prune_model(
                model,
                pruning_type="DEPTH",
                num_layers_to_remove=count,
                layer_selection_method=method,
                dataloader=calib if method != "last" else None,
                show_progress=False,
                return_stats=True,
            )
            print(f"| {count} | {method} | {s['event']['removed_layers']} | {ppl(model):.1f} |")


if __name__ == "__main__":
    main()
