"""Paired change of StereoSet's SS / LMS / ICAT between two models scored on the same items.

Both results come from :func:`~optipfair_train.bias.stereoset.stereoset_scores` on the same sample; each
bootstrap resample draws the same items for both, so only items whose preference changed move the
difference (the scores themselves: :mod:`optipfair_train.bias.stereoset`).

Example:
    >>> d = stereoset_change(before, after)  # doctest: +SKIP
    >>> d["ss_change"], d["ss_change_ci_low"], d["by_bias_type"]["gender"]["ss_change"]  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from .metrics import paired_change_fields
from .stereoset import SCORES, _bootstrap_counts, _macro_scores, _pro_related, _target_onehot
from .stereoset_data import OPTIONS

__all__ = ["stereoset_change"]


def _item_scores(result: dict) -> np.ndarray:
    return np.array([[record["mean_log_prob"][o] for o in OPTIONS] for record in result["items"]])


def stereoset_change(
    before: dict, after: dict, confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0
) -> dict:
    """How SS / LMS / ICAT moved from ``before`` to ``after``, two :func:`stereoset_scores` results on the
    same items, with a **paired** bootstrap interval: each resample draws the same items for both.

    Why paired: a monitor asks whether training moved the bias, and both probes share their items, so
    only items whose preference changed move the difference. Two overlapping intervals do not say that
    nothing changed; the paired interval of the difference does, and it is the narrower the fewer items
    flip. How much narrower is measured, not assumed (``docs/benchmarks/probe-change.md``): after pruning,
    enough items flip that the paired interval is only somewhat narrower than either score's own, so it
    does not let a probe shrink much.

    Returns ``ss_change``, ``lms_change``, ``icat_change`` (after - before, points), each with
    ``_ci_low`` / ``_ci_high``, ``ss_flipped`` (percent of items whose stereotype preference flipped)
    and ``num_items``; ``by_bias_type`` holds the same keys for each bias type's items alone (its own,
    wider interval: gender is about 12% of StereoSet's items).

    Raises:
        ValueError: when the two results do not hold the same items in the same order.

    Example:
        >>> a = stereoset_scores(model, tokenizer, items, sample_size=100)  # doctest: +SKIP
        >>> b = stereoset_scores(trained, tokenizer, items, sample_size=100)  # doctest: +SKIP
        >>> d = stereoset_change(a, b); d["ss_change"], d["ss_change_ci_low"]  # doctest: +SKIP
    """
    keys = ("task", "target", "bias_type")
    first, second = before.get("items"), after.get("items")
    if (
        not first
        or not second
        or len(first) != len(second)
        or any(
            tuple(x[k] for k in keys) != tuple(y[k] for k in keys) for x, y in zip(first, second, strict=True)
        )
    ):
        raise ValueError(
            "stereoset_change needs two stereoset_scores results on the same items in the same order "
            f"(same sample and seed); got {len(first or [])} and {len(second or [])} item records, or items "
            "that differ in task / target / bias type."
        )
    out = _paired_change(first, second, confidence, n_bootstrap, seed)
    out["by_bias_type"] = {
        bias_type: _paired_change(
            [x for x in first if x["bias_type"] == bias_type],
            [y for y in second if y["bias_type"] == bias_type],
            confidence,
            n_bootstrap,
            seed,
        )
        for bias_type in sorted({record["bias_type"] for record in first})
    }
    return out


def _paired_change(first: list, second: list, confidence: float, n_bootstrap: int, seed: int) -> dict:
    """The paired change of SS / LMS / ICAT between two lists of item records (already checked alike)."""
    onehot = _target_onehot([record["target"] for record in first])
    (pro_b, rel_b), (pro_a, rel_a) = (_pro_related(_item_scores({"items": r})) for r in (first, second))
    ones = np.ones((1, len(first)))
    counts = _bootstrap_counts(len(first), n_bootstrap, seed)  # the same resamples for both
    point_b, point_a = _macro_scores(ones, pro_b, rel_b, onehot), _macro_scores(ones, pro_a, rel_a, onehot)
    boot_b, boot_a = _macro_scores(counts, pro_b, rel_b, onehot), _macro_scores(counts, pro_a, rel_a, onehot)
    out: dict = {"confidence": confidence, "num_items": len(first)}
    out |= paired_change_fields(point_b, point_a, boot_b, boot_a, SCORES, confidence)
    out["ss_flipped"] = 100 * float((pro_a != pro_b).mean())
    return out
