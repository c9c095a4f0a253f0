"""Depth pruning: choose whole transformer blocks to remove.

Positional choices (``last``, ``first``) are OptiPFair's; they are catastrophic on the demo model
(removing the last 3 of 30 blocks: perplexity 29.6 -> 16,255) because the first and last blocks do
most of the work. ``importance`` removes the blocks that change the hidden state least, measured on
calibration data (3 blocks: 43.7); ``contiguous`` removes the least influential run of consecutive blocks;
``taylor`` removes the blocks with the smallest first-order Taylor estimate of the loss change.
A removed ``contiguous`` run can be replaced by a fitted linear map folded into the block before it
(:mod:`.depth_replace`, ``prune_model(..., replace_with_linear=True)``).

Example:
    >>> drop = select_layers_to_remove(model, 2, "importance", batches=batches)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..arch import get_adapter
from ..names import LAYER_SELECTION_METHODS
from .calibration import CalibrationBatch, block_influence
from .targets import check_layer_indices
from .taylor import TaylorImportance, taylor_importance

__all__ = ["LAYER_SELECTION_METHODS", "select_layers_to_remove", "check_layer_selection"]


def check_layer_selection(
    method: str, *, calibrated: bool, gradients: bool = False, layer_indices: Sequence[int] | None = None
) -> None:
    """Refuse an unknown selection, ``custom`` without indices (or indices without ``custom``), and a
    data-driven selection without its data (the one copy of these rules).

    Example:
        >>> check_layer_selection("last", calibrated=False)
    """
    if method not in LAYER_SELECTION_METHODS:
        raise ValueError(
            f"Unknown layer_selection_method {method!r}; choose one of {', '.join(LAYER_SELECTION_METHODS)}."
        )
    if method == "custom" and not layer_indices:
        raise ValueError("layer_selection_method='custom' needs layer_indices (the blocks to remove).")
    if method != "custom" and layer_indices:
        raise ValueError(f"layer_indices is only used with layer_selection_method='custom', not {method!r}.")
    if (
        method in ("importance", "contiguous", "taylor")
        and not calibrated
        and not (gradients and method == "taylor")
    ):
        raise ValueError(
            f"layer_selection_method={method!r} measures blocks on calibration data: "
            "pass dataloader=..., or choose 'last', 'first' or 'custom'."
        )


def select_layers_to_remove(
    model: torch.nn.Module,
    count: int | None,
    method: str,
    *,
    layer_indices: Sequence[int] | None = None,
    batches: list[CalibrationBatch] | None = None,
    metric: str = "cosine",
    gradient_importance: TaylorImportance | None = None,
    show_progress: bool = False,
    first_start: int = 0,
) -> list[int]:
    """Indices of the blocks to remove (sorted). Validates everything; changes nothing.

    ``first_start`` is the earliest block a ``contiguous`` run may start at (1 when the run is replaced
    by a map folded into the block before it).

    Example:
        >>> select_layers_to_remove(model, 2, "last")  # with 4 layers  # doctest: +SKIP
        [2, 3]
    """
    n = get_adapter(model).num_layers
    check_layer_selection(
        method,
        calibrated=batches is not None,
        gradients=gradient_importance is not None,
        layer_indices=layer_indices,
    )
    if method == "custom":
        drop = sorted(check_layer_indices(layer_indices, n))
        if len(drop) >= n:
            raise ValueError(f"Cannot remove all {n} layers: at least one must stay.")
        return drop
    if method == "last":
        return list(range(n - count, n))
    if method == "first":
        return list(range(count))
    if method == "taylor":
        taylor = gradient_importance or taylor_importance(model, batches, show_progress=show_progress)
        return sorted(taylor.block_scores().topk(count, largest=False).indices.tolist())
    if method == "importance":
        influence = block_influence(model, batches, span=1, metric=metric, show_progress=show_progress)
        return sorted(influence.topk(count, largest=False).indices.tolist())
    if n - count < first_start:
        raise ValueError(f"No run of {count} blocks starts at block {first_start} or later in {n} blocks.")
    influence = block_influence(model, batches, span=count, metric=metric, show_progress=show_progress)
    start = first_start + int(influence[first_start:].argmin())
    return list(range(start, start + count))
