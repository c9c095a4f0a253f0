"""Zero-shot multiple-choice accuracy of a causal LM, scored as lm-evaluation-harness 0.4.13 scores it.

Each choice is scored by its log-likelihood given the context (:mod:`.loglik`, the harness's
``loglikelihood`` requests).

Per item, ``acc`` is 1 when the choice with the highest log-likelihood is the gold one; ``acc_norm``
divides each log-likelihood by the choice's length in characters first (the harness's ``acc_norm``;
WinoGrande and BoolQ report ``acc`` only, as there). Intervals: percentile bootstrap over items
(seeded); the mean over tasks resamples every task's items. :func:`zeroshot_change` pairs two models on
the same items. Cost per 100 items on the demo model: ``docs/benchmarks/zeroshot.md``.

Example:
    >>> from optipfair_train.zeroshot import load_tasks
    >>> r = zeroshot_scores(model, tokenizer, load_tasks(["arc_easy", "piqa"]), sample_size=100)  # doctest: +SKIP
    >>> r["tasks"]["arc_easy"]["acc"], r["mean"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from .data import sample_task_items
from .loglik import loglikelihoods
from .tasks import TASKS, ZeroShotItem

__all__ = [
    "METRICS",
    "item_key",
    "zeroshot_change",
    "zeroshot_change_scalars",
    "zeroshot_scalars",
    "zeroshot_scores",
]

logger = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm")


def item_key(item: ZeroShotItem) -> str:
    """A short fingerprint of an item's texts and gold label, to check two results hold the same items.

    Example:
        >>> item_key(ZeroShotItem((("Q", " a"), ("Q", " b")), 0, (1, 1)))  # doctest: +SKIP
        '5d0b3c1e'
    """
    text = "\x1f".join(c + "\x1e" + x for c, x in item.requests) + f"\x1d{item.gold}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def _interval(correct: np.ndarray, counts: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(counts @ correct / len(correct), [alpha, 1 - alpha])
    return 100 * float(low), 100 * float(high)


def _counts(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)


def _task_result(
    name: str, items: Sequence[ZeroShotItem], lls: np.ndarray, confidence: float, n_bootstrap: int, seed: int
) -> dict:
    correct = {"acc": [], "acc_norm": []}
    offset = 0
    for item in items:
        ll = lls[offset : offset + item.num_choices]
        offset += item.num_choices
        correct["acc"].append(int(np.argmax(ll) == item.gold))
        correct["acc_norm"].append(int(np.argmax(ll / np.array(item.norm_lengths, dtype=float)) == item.gold))
    metrics = TASKS[name].metrics if name in TASKS else METRICS
    counts = _counts(len(items), n_bootstrap, seed)
    out: dict = {"num_items": len(items), "metrics": list(metrics)}
    for metric in METRICS:
        if metric not in metrics:
            out |= {metric: None, f"{metric}_ci_low": None, f"{metric}_ci_high": None}
            continue
        values = np.array(correct[metric], dtype=float)
        low, high = _interval(values, counts, confidence)
        out |= {metric: 100 * float(values.mean()), f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        out[f"{metric}_items"] = correct[metric]
    out["item_keys"] = [item_key(item) for item in items]
    return out


def _mean_over_tasks(results: Mapping[str, dict], n_bootstrap: int, seed: int, confidence: float) -> dict:
    """Mean ``acc`` over tasks with an interval resampling every task's items (same seed as the tasks)."""
    boots = [_counts(r["num_items"], n_bootstrap, seed) @ np.array(r["acc_items"], float) / r["num_items"]
             for r in results.values()]  # fmt: skip
    point = float(np.mean([r["acc"] for r in results.values()]))
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(100 * np.mean(boots, axis=0), [alpha, 1 - alpha])
    return {"acc": point, "acc_ci_low": float(low), "acc_ci_high": float(high), "num_tasks": len(results)}


def zeroshot_scores(
    model: nn.Module,
    tokenizer,
    tasks: Mapping[str, Sequence[ZeroShotItem]],
    sample_size: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    show_progress: bool = False,
) -> dict:
    """Zero-shot accuracy of ``model`` on every task of ``tasks`` (task name -> items, e.g. from
    :func:`~optipfair_train.zeroshot.load_tasks`), on a seeded sample of ``sample_size`` items per task
    (all when None).

    Returns ``{"tasks": {name: {"acc", "acc_ci_low", "acc_ci_high", "acc_norm", ..., "num_items",
    "metrics", "acc_items", "acc_norm_items", "item_keys", "seconds"}}, "mean": {"acc", "acc_ci_low",
    "acc_ci_high", "num_tasks"}, "seconds", "sample_size", "seed", "confidence"}``; accuracies in percent,
    ``None`` for a metric the task does not report. The per-item lists let :func:`zeroshot_change` pair
    two models.

    Example:
        >>> r = zeroshot_scores(model, tokenizer, {"piqa": load_task("piqa")}, sample_size=200)  # doctest: +SKIP
        >>> r["tasks"]["piqa"]["acc"], r["tasks"]["piqa"]["acc_ci_low"]  # doctest: +SKIP
    """
    if not tasks:
        raise ValueError("no zero-shot tasks given")
    start = time.perf_counter()
    results = {}
    for name, all_items in tasks.items():
        task_start = time.perf_counter()
        items = sample_task_items(all_items, sample_size, seed)
        requests = [r for item in items for r in item.requests]
        sizes = [item.num_choices for item in items]
        lls = loglikelihoods(model, tokenizer, requests, batch_size, show_progress, name, group_sizes=sizes)
        results[name] = _task_result(name, items, lls, confidence, n_bootstrap, seed)
        results[name]["seconds"] = time.perf_counter() - task_start
        logger.info("%s over %d items: acc %.1f", name, len(items), results[name]["acc"])
    return {
        "tasks": results,
        "mean": _mean_over_tasks(results, n_bootstrap, seed, confidence),
        "seconds": time.perf_counter() - start,
        "sample_size": sample_size,
        "seed": seed,
        "confidence": confidence,
    }


def zeroshot_change(
    before: dict, after: dict, confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """How ``acc`` moved from ``before`` to ``after`` (two :func:`zeroshot_scores` results on the same
    items), per task and for the mean over tasks, with a **paired** bootstrap interval: each resample
    draws the same items for both models, so only items whose answer changed move the difference.

    Returns ``{"tasks": {name: {"acc_change", "acc_change_ci_low", "acc_change_ci_high", "flipped",
    "num_items"}}, "mean": {"acc_change", "acc_change_ci_low", "acc_change_ci_high"}}`` in points
    (after - before); ``flipped`` is the percent of items answered right by one model only.

    Raises:
        ValueError: when the results do not hold the same tasks and items in the same order.

    Example:
        >>> d = zeroshot_change(base_result, pruned_result)  # doctest: +SKIP
        >>> d["mean"]["acc_change"], d["mean"]["acc_change_ci_low"]  # doctest: +SKIP
    """
    first, second = before.get("tasks") or {}, after.get("tasks") or {}
    if not first or list(first) != list(second):
        raise ValueError(
            f"zeroshot_change needs two zeroshot_scores results on the same tasks; got {list(first)} and "
            f"{list(second)}"
        )
    alpha = (1.0 - confidence) / 2
    out: dict = {"tasks": {}, "confidence": confidence}
    boots = []
    for name in first:
        b, a = first[name], second[name]
        if b.get("item_keys") != a.get("item_keys"):
            raise ValueError(
                f"zeroshot_change: the two results hold different {name} items (same sample size and seed "
                "needed, and the same data)"
            )
        xb, xa = np.array(b["acc_items"], float), np.array(a["acc_items"], float)
        diff = 100 * (_counts(len(xb), n_bootstrap, seed) @ (xa - xb)) / len(xb)
        boots.append(diff)
        low, high = np.quantile(diff, [alpha, 1 - alpha])
        out["tasks"][name] = {
            "acc_change": 100 * float((xa - xb).mean()),
            "acc_change_ci_low": float(low),
            "acc_change_ci_high": float(high),
            "flipped": 100 * float((xa != xb).mean()),
            "num_items": len(xb),
        }
    low, high = np.quantile(np.mean(boots, axis=0), [alpha, 1 - alpha])
    out["mean"] = {
        "acc_change": float(np.mean([t["acc_change"] for t in out["tasks"].values()])),
        "acc_change_ci_low": float(low),
        "acc_change_ci_high": float(high),
    }
    return out


def zeroshot_scalars(result: dict, change: dict | None = None) -> dict[str, float]:
    """The flat scalars of a :func:`zeroshot_scores` result (and of its :func:`zeroshot_change` vs a
    reference), as the pipeline's stage metrics and the callback's logs name them:
    ``zeroshot/accuracy`` (mean acc over tasks) with ``_ci_low`` / ``_ci_high``; per task
    ``zeroshot/<task>/acc`` (with its interval), ``/acc_norm`` (when the task reports it), ``/num_items``;
    ``zeroshot/seconds``; with ``change``, ``zeroshot/accuracy_change`` and ``zeroshot/<task>/acc_change``
    with their paired intervals.

    Example:
        >>> zeroshot_scalars(zeroshot_scores(model, tokenizer, tasks))["zeroshot/accuracy"]  # doctest: +SKIP
        51.3
    """
    bounds = ("", "_ci_low", "_ci_high")
    out = {f"zeroshot/accuracy{b}": result["mean"][f"acc{b}"] for b in bounds}
    for name, entry in result["tasks"].items():
        for key in ("acc", "acc_ci_low", "acc_ci_high", "acc_norm", "num_items"):
            if entry.get(key) is not None:
                out[f"zeroshot/{name}/{key}"] = entry[key]
    out["zeroshot/seconds"] = result["seconds"]
    if change is not None:
        out |= zeroshot_change_scalars(change)
    return out


def zeroshot_change_scalars(change: dict, prefix: str = "zeroshot/") -> dict[str, float]:
    """The flat scalars of a :func:`zeroshot_change`: ``<prefix>accuracy_change`` (the mean over tasks)
    and ``<prefix><task>/acc_change``, each with ``_ci_low`` / ``_ci_high``.

    Example:
        >>> change = {"mean": {"acc_change": 2.0, "acc_change_ci_low": -1.0, "acc_change_ci_high": 5.0},
        ...           "tasks": {}}
        >>> zeroshot_change_scalars(change, "reference/zeroshot/")["reference/zeroshot/accuracy_change"]
        2.0
    """
    out = {}
    for b in ("", "_ci_low", "_ci_high"):
        out[f"{prefix}accuracy_change{b}"] = change["mean"][f"acc_change{b}"]
        for name, entry in change["tasks"].items():
            out[f"{prefix}{name}/acc_change{b}"] = entry[f"acc_change{b}"]
    return out
