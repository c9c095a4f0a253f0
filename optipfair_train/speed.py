"""Base and final model speed measured side by side, with a verdict that never claims noise as a speed-up.

The two models run alternately (A B A B ...), each run one prefill and ``max_new_tokens`` greedy decode
steps with the KV cache, after one warm-up run each. The verdict for prefill and for decode is:

- a speed ratio ``median(base seconds) / median(final seconds)`` (> 1: the final model is faster) only
  when the two models' ranges of run times do not overlap (every final run faster than every base run,
  or every one slower);
- otherwise "no measurable change".

Why ranges: if the two models were equally fast, every ordering of the ``2n`` run times would be equally
likely, and the chance that all ``n`` of one model fall on one side of all ``n`` of the other is
``2 / C(2n, n)``: 10% for 3 repeats, 2.9% for 4, 0.8% for 5 (the default). A machine whose load changes
during the measurement widens both ranges, so it gives "no measurable change", not a made-up ratio.
Threads and the load average (before and after) are recorded with the result.

Example:
    >>> result = compare_speed(base_model, final_model, tokenizer)  # doctest: +SKIP
    >>> result["decode"]["verdict"]  # doctest: +SKIP
    'no measurable change'
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .evaluation import SPEED_PROMPT, _eval_mode, batch_prompt_ids, timed_generation

__all__ = ["NO_CHANGE", "compare_speed", "compare_timings", "speed_line"]

logger = logging.getLogger(__name__)

NO_CHANGE = "no measurable change"


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def compare_timings(base: Sequence[float], final: Sequence[float], tokens: int) -> dict:
    """Verdict for two lists of run times (seconds) of the same work of ``tokens`` tokens.

    Example:
        >>> compare_timings([1.0, 1.1, 1.05], [0.5, 0.52, 0.51], tokens=10)["verdict"]
        'x2.06 faster'
        >>> compare_timings([1.0, 1.1, 1.05], [1.02, 0.99, 1.2], tokens=10)["verdict"]
        'no measurable change'
    """
    if len(base) < 2 or len(final) < 2:
        raise ValueError(f"Need at least 2 runs of each model, got {len(base)} and {len(final)}.")
    base_median, final_median = statistics.median(base), statistics.median(final)
    separated = max(final) < min(base) or max(base) < min(final)
    ratio = base_median / final_median
    if separated:
        verdict = f"x{ratio:.2f} faster" if ratio > 1 else f"x{1 / ratio:.2f} slower"
    else:
        verdict = NO_CHANGE
    return {
        "base_seconds": list(base),
        "final_seconds": list(final),
        "base_tokens_per_second": tokens / base_median,
        "final_tokens_per_second": tokens / final_median,
        "ratio": ratio,
        "separated": separated,
        "false_alarm_rate": 2 / math.comb(len(base) + len(final), len(base)),
        "verdict": verdict,
    }


def compare_speed(
    base: torch.nn.Module,
    final: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    repeats: int = 5,
    prompt: str = SPEED_PROMPT,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> dict:
    """Interleaved prefill and decode timings of ``base`` and ``final``, with a verdict for each.

    Returns a plain dict (JSON-serialisable) the model card and the report print: ``prefill`` and
    ``decode`` (see :func:`compare_timings`), ``repeats``, ``threads``, ``load_before`` / ``load_after``
    (1/5/15-minute load averages), ``batch_size``, ``prompt_tokens``, ``new_tokens``, ``summary``.

    Example:
        >>> speed = compare_speed(base_model, final_model, tokenizer, repeats=5)  # doctest: +SKIP
        >>> speed_line(speed)  # doctest: +SKIP
        'prefill: no measurable change (...); decode: x1.11 faster (...)'
    """
    if not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an integer >= 2 (interleaved runs per model), got {repeats!r}.")
    ids = batch_prompt_ids(base, tokenizer, prompt, batch_size)
    times: dict[str, dict[str, list[float]]] = {"base": {"p": [], "d": []}, "final": {"p": [], "d": []}}
    load_before = _load()
    with _eval_mode(base), _eval_mode(final):
        for run in range(repeats + 1):  # run 0 warms both up
            for name, model in (("base", base), ("final", final)):
                prefill, decode = timed_generation(
                    model, ids.to(next(model.parameters()).device), max_new_tokens, timer
                )
                if run:
                    times[name]["p"].append(prefill)
                    times[name]["d"].append(decode)
    result = {
        "prefill": compare_timings(times["base"]["p"], times["final"]["p"], batch_size * ids.shape[1]),
        "decode": compare_timings(times["base"]["d"], times["final"]["d"], batch_size * max_new_tokens),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": _load(),
        "batch_size": batch_size,
        "prompt_tokens": ids.shape[1],
        "new_tokens": max_new_tokens,
    }
    result["summary"] = speed_line(result)
    logger.info("Speed, final vs base: %s", result["summary"])
    return result


def speed_line(speed: dict) -> str:
    """One sentence for the model card: verdicts, tokens per second, repeats, threads and load.

    Example:
        >>> speed_line(compare_speed(base_model, final_model, tokenizer))  # doctest: +SKIP
    """
    parts = []
    for key in ("prefill", "decode"):
        m = speed[key]
        parts.append(
            f"{key} {m['verdict']} (tok/s, median [range]: base {_rate(m, 'base')}, final {_rate(m, 'final')})"
        )
    load = speed.get("load_before")
    load_text = f", load average {load[0]:.1f} -> {speed['load_after'][0]:.1f}" if load else ""
    return (
        "; ".join(parts)
        + f". Greedy generation of {speed['new_tokens']} tokens after a {speed['prompt_tokens']}-token prompt, "
        f"batch {speed['batch_size']}, {speed['repeats']} interleaved runs per model, "
        f"{speed['threads']} thread{'s' if speed['threads'] != 1 else ''}{load_text}; a ratio is shown only when "
        "the two models' run-time ranges do not overlap."
    )


def _rate(m: dict, model: str) -> str:
    """``median [slowest-fastest]`` tokens per second of one model's runs (the ranges decide the verdict)."""
    seconds = m[f"{model}_seconds"]
    tokens = m[f"{model}_tokens_per_second"] * statistics.median(seconds)
    return f"{tokens / statistics.median(seconds):,.1f} [{tokens / max(seconds):,.1f}-{tokens / min(seconds):,.1f}]"
