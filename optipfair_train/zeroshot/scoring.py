"""Zero-shot multiple-choice accuracy of a causal LM, scored as lm-evaluation-harness 0.4.13 scores it.

How a choice is scored (the harness's ``loglikelihood`` requests of an HF causal model):

- the request is ``(context, continuation)`` with the continuation ``" " + choice`` (the target
  delimiter); trailing spaces of the context move to the start of the continuation;
- the model reads the encoded context followed by the tokens of ``context + continuation`` (encoded
  whole) after the context's length, so a token that straddles the boundary counts to the continuation
  (the tokenizer's default special tokens are kept, as the harness does without ``add_bos_token``; an
  empty context is the BOS token, else EOS);
- the score is the summed log-probability of the continuation tokens, each given everything before it
  (a sequence longer than the model's window is cut from the left).

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
import torch
from torch import nn
from tqdm.auto import tqdm

from ..bias.capture import eval_mode, model_device
from ..bias.tokens import pad_token_id
from .data import sample_task_items
from .tasks import TASKS, ZeroShotItem

__all__ = [
    "METRICS",
    "encode_request",
    "item_key",
    "loglikelihoods",
    "zeroshot_change",
    "zeroshot_scalars",
    "zeroshot_scores",
]

logger = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm")


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``context + continuation`` and the index of the first continuation token, split as
    the harness splits them (see the module docstring).

    Example:
        >>> ids, start = encode_request(tokenizer, "Question: 2+2?\\nAnswer:", " 4")  # doctest: +SKIP
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [int(prefix)] + list(tokenizer(continuation)["input_ids"]), 1
    # the context's own encoding, then what the whole string encodes to after it: a token merged across
    # the boundary counts to the continuation, and every choice of an item shares the same context tokens
    whole = list(tokenizer(context + continuation)["input_ids"])
    head = list(tokenizer(context)["input_ids"])
    return head + whole[len(head) :], len(head)


def _window(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    show_progress: bool = False,
    desc: str = "zero-shot",
) -> np.ndarray:
    """Summed log-probability of each request's continuation given its context (float64 array).

    ``batch_size`` sequences share one right-padded forward pass; requests are sorted by length first so
    batches pad little. Only the continuation positions' log-softmax is computed (in float32).

    Raises:
        ValueError: for a continuation that encodes to no token.

    Example:
        >>> loglikelihoods(model, tokenizer, [("The sky is", " blue"), ("The sky is", " green")])  # doctest: +SKIP
        array([-2.1, -6.3])
    """
    seqs = [encode_request(tokenizer, c, x) for c, x in requests]
    for (ids, start), request in zip(seqs, requests, strict=True):
        if len(ids) <= start:
            raise ValueError(f"the continuation {request[1]!r} encodes to no token")
    window = _window(model)
    if window:  # cut from the left, keeping the scored tokens and what fits before them
        seqs = [(ids[-(window + 1) :], max(1, start - max(0, len(ids) - window - 1))) for ids, start in seqs]
    out = np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    device, pad = model_device(model), pad_token_id(tokenizer)
    with eval_mode(model):
        for idx in tqdm(batches, desc=desc, disable=not show_progress):
            width = max(len(seqs[i][0]) for i in idx) - 1
            inputs = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros_like(inputs)
            targets = torch.zeros_like(inputs)
            scored = torch.zeros((len(idx), width), dtype=torch.bool)  # logit t predicts token t + 1
            for r, i in enumerate(idx):
                ids, start = seqs[i]
                inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
                targets[r, : len(ids) - 1] = torch.tensor(ids[1:])
                attention[r, : len(ids) - 1] = 1
                scored[r, start - 1 : len(ids) - 1] = True
            logits = model(
                input_ids=inputs.to(device), attention_mask=attention.to(device), use_cache=False
            ).logits
            where = scored.to(device)
            picked = logits[where].float()
            lp = picked.gather(-1, targets.to(device)[where][:, None]).squeeze(-1) - torch.logsumexp(
                picked, -1
            )
            rows = where.nonzero()[:, 0]
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, lp.double())
            out[idx] = sums.cpu().numpy()
    return out


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
    "metrics", "acc_items", "acc_norm_items", "item_keys"}}, "mean": {"acc", "acc_ci_low", "acc_ci_high",
    "num_tasks"}, "seconds", "sample_size", "seed", "confidence"}``; accuracies in percent, ``None`` for
    a metric the task does not report. The per-item lists let :func:`zeroshot_change` pair two models.

    Example:
        >>> r = zeroshot_scores(model, tokenizer, {"piqa": load_task("piqa")}, sample_size=200)  # doctest: +SKIP
        >>> r["tasks"]["piqa"]["acc"], r["tasks"]["piqa"]["acc_ci_low"]  # doctest: +SKIP
    """
    if not tasks:
        raise ValueError("no zero-shot tasks given")
    start = time.perf_counter()
    results = {}
    for name, all_items in tasks.items():
        items = sample_task_items(all_items, sample_size, seed)
        requests = [r for item in items for r in item.requests]
        lls = loglikelihoods(model, tokenizer, requests, batch_size, show_progress, desc=name)
        results[name] = _task_result(name, items, lls, confidence, n_bootstrap, seed)
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
        for b in bounds:
            out[f"zeroshot/accuracy_change{b}"] = change["mean"][f"acc_change{b}"]
            for name, entry in change["tasks"].items():
                out[f"zeroshot/{name}/acc_change{b}"] = entry[f"acc_change{b}"]
    return out
