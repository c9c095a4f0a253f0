"""How many heads each layer loses when the units of all chosen layers are ranked together
(``layer_allocation="global"`` for attention heads).

The engine's uniform allocation removes the same number of units (KV groups, or query heads per group)
from every chosen layer; the global one removes the lowest-scored units wherever they are, so a few
heads can go from a few layers only (e.g. the heads the ``fairness`` scorer finds carry bias).

Example:
    >>> global_head_counts({0: torch.tensor([1.0, 5.0]), 1: torch.tensor([2.0, 3.0])}, {0: 2, 1: 2}, 1,
    ...                    normalise=False)
    {0: 1, 1: 2}
"""

from __future__ import annotations

import torch

from .targets import check_percentage

__all__ = ["head_remove_total", "global_head_counts"]


def head_remove_total(units: dict[int, int], pruning_percentage: float | None, remove: int | None) -> int:
    """Units removed in all by ``layer_allocation="global"``: ``remove`` per chosen layer, or
    ``pruning_percentage`` of all their units (floored); at least one, and one unit stays in each layer.

    Example:
        >>> head_remove_total({0: 3, 1: 3}, 34, None), head_remove_total({0: 3, 1: 3}, None, 1)
        (2, 2)
    """
    total = sum(units.values())
    if remove is None:
        check_percentage("pruning_percentage", pruning_percentage)
        count, asked = (
            int(pruning_percentage / 100 * total + 1e-9),
            f"pruning_percentage {pruning_percentage}%",
        )
    else:
        count, asked = remove * len(units), f"remove={remove} per layer"
    if count == 0:
        raise ValueError(
            f"{asked} removes none of the {total} units of the chosen layers: the smallest step is "
            f"{100 / total:.2f}%."
        )
    if count > total - len(units):
        raise ValueError(
            f"{asked} asks for {count} of the {total} units of the chosen layers; at most "
            f"{total - len(units)} can go (one stays in each of the {len(units)} layers)."
        )
    return count


def global_head_counts(
    scores: dict[int, torch.Tensor], units: dict[int, int], remove_total: int, *, normalise: bool
) -> dict[int, int]:
    """Units each layer keeps when the ``remove_total`` lowest-scored units of all layers go.

    A unit is a KV group (``scores`` per group) or, for query heads (``scores`` per query head,
    ``units[i]`` heads per group), the next-lowest query head of every group of a layer, scored by their
    sum (so a layer stays GQA-valid: the same count in each group). ``normalise`` divides each layer's
    scores by their mean first (magnitudes differ by layer, as for MLP neurons); the ``fairness`` scores
    are effects on the same output in every layer and are ranked as they are. One unit stays per layer.

    Example:
        >>> global_head_counts({0: torch.tensor([1.0, 5.0]), 1: torch.tensor([2.0, 3.0])},
        ...                    {0: 2, 1: 2}, 2, normalise=False)
        {0: 1, 1: 1}
    """
    pool = []
    for i, s in scores.items():
        s = s.double() / s.double().mean().clamp_min(1e-12) if normalise else s.double()
        per_unit = (
            s.sort().values if len(s) == units[i] else s.reshape(-1, units[i]).sort(dim=1).values.sum(0)
        )
        pool += [(float(v), i, r) for r, v in enumerate(per_unit[: units[i] - 1])]
    pool.sort()  # ties: lower layer, then the unit ranked first in its layer
    keep = dict(units)
    for _, i, _ in pool[:remove_total]:
        keep[i] -= 1
    return keep
