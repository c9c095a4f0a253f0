"""Pruning statistics for logging: parameter counts, per-layer widths / heads, depth, sparsity reached.

Example:
    >>> scalars = pruning_scalars(model, original_parameters=1_000_000)  # doctest: +SKIP
    >>> scalars["pruning/sparsity"]  # percent of the original parameters removed  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter

__all__ = ["model_structure", "pruning_scalars", "pruning_table_rows", "PRUNING_TABLE_COLUMNS"]

PRUNING_TABLE_COLUMNS = [
    "step",
    "event",
    "pruning_type",
    "scorer",
    "target",
    "layer",
    "intermediate_size",
    "query_heads",
    "kv_heads",
    "parameters",
    "sparsity",
]


def model_structure(model: torch.nn.Module) -> dict[str, Any]:
    """Sizes that pruning changes: ``num_layers``, per-layer ``intermediate_sizes``, ``query_heads``,
    ``kv_heads``, and ``parameters``.

    Example:
        >>> model_structure(model)["intermediate_sizes"]  # doctest: +SKIP
        [128, 128, 128, 128]
    """
    adapter = get_adapter(model)
    heads = [adapter.head_counts(i) for i in range(adapter.num_layers)]
    return {
        "num_layers": adapter.num_layers,
        "intermediate_sizes": adapter.intermediate_sizes(),
        "query_heads": [h[0] for h in heads],
        "kv_heads": [h[1] for h in heads],
        "parameters": count_parameters(model),
    }


def pruning_scalars(
    model: torch.nn.Module,
    original_parameters: int,
    *,
    structure: dict[str, Any] | None = None,
    target: float | None = None,
    prefix: str = "pruning/",
) -> dict[str, float]:
    """Flat scalars describing the model's pruned structure against ``original_parameters``.

    Keys: ``parameters``, ``sparsity`` (percent of the original parameters removed), ``num_layers``,
    ``mean_intermediate_size``, ``num_query_heads`` / ``num_kv_heads`` (totals), per layer
    ``intermediate_size/layer_{i}`` and ``query_heads/layer_{i}``, and ``target`` when given.

    Example:
        >>> pruning_scalars(model, 10_000)["pruning/sparsity"]  # doctest: +SKIP
        12.5
    """
    s = structure or model_structure(model)
    out = {
        f"{prefix}parameters": float(s["parameters"]),
        f"{prefix}sparsity": 100.0 * (original_parameters - s["parameters"]) / original_parameters,
        f"{prefix}num_layers": float(s["num_layers"]),
        f"{prefix}mean_intermediate_size": sum(s["intermediate_sizes"]) / len(s["intermediate_sizes"]),
        f"{prefix}num_query_heads": float(sum(s["query_heads"])),
        f"{prefix}num_kv_heads": float(sum(s["kv_heads"])),
    }
    if target is not None:
        out[f"{prefix}target"] = float(target)
    for i, width in enumerate(s["intermediate_sizes"]):
        out[f"{prefix}intermediate_size/layer_{i}"] = float(width)
    for i, heads in enumerate(s["query_heads"]):
        out[f"{prefix}query_heads/layer_{i}"] = float(heads)
    return out


def pruning_table_rows(
    step: int,
    event_index: int,
    event: dict[str, Any],
    structure: dict[str, Any],
    original_parameters: int,
    target: float | None,
) -> list[list[Any]]:
    """One table row per layer after a pruning event (columns :data:`PRUNING_TABLE_COLUMNS`).

    Example:
        >>> rows = pruning_table_rows(10, 0, {"pruning_type": "MLP_GLU", "method": "MAW"}, s, 10_000, 25.0)  # doctest: +SKIP
    """
    sparsity = 100.0 * (original_parameters - structure["parameters"]) / original_parameters
    return [
        [
            step,
            event_index,
            event.get("pruning_type"),
            str(event.get("method")),
            target,
            i,
            structure["intermediate_sizes"][i],
            structure["query_heads"][i],
            structure["kv_heads"][i],
            structure["parameters"],
            sparsity,
        ]
        for i in range(structure["num_layers"])
    ]
