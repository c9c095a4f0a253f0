"""Model analysis: architecture, parameter distribution and MLP expansion ratio.

Example:
    >>> from optipfair_train import analyze
    >>> report = analyze(model)  # doctest: +SKIP
    >>> report["expansion_ratio"]  # intermediate / hidden size, in percent  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .arch import get_adapter, unwrap_model

__all__ = ["count_parameters", "analyze"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters: storage shared by several modules (tied embeddings) counts once.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    seen: set[int] = set()
    total = 0
    for param in unwrap_model(model).parameters():
        if trainable_only and not param.requires_grad:
            continue
        key = param.data_ptr() if param.device.type != "meta" else id(param)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def _count(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def analyze(model: nn.Module) -> dict[str, Any]:
    """Describe a model: family, sizes per layer, heads, and where its parameters live.

    Returns a dict with ``family``, ``model_type``, ``num_layers``, ``hidden_size``,
    ``intermediate_sizes``, ``expansion_ratio`` (mean intermediate / hidden, percent),
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``total_parameters`` and
    ``parameter_distribution`` (``embeddings``, ``attention``, ``mlp``, ``norms``, ``lm_head``, ``other``,
    each with ``parameters`` and ``percentage``).

    Example:
        >>> analyze(model)["parameter_distribution"]["mlp"]["percentage"]  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    inner = adapter.model
    config = adapter.config
    seen: set[int] = set()
    parts = {"embeddings": _count(inner.get_input_embeddings(), seen)}
    parts["attention"] = sum(_count(adapter.attention(i).module, seen) for i in range(adapter.num_layers))
    parts["mlp"] = sum(_count(adapter.mlp(i).module, seen) for i in range(adapter.num_layers))
    parts["norms"] = sum(_count(m, seen) for m in inner.modules() if "norm" in type(m).__name__.lower())
    head = inner.get_output_embeddings()
    parts["lm_head"] = _count(head, seen) if head is not None else 0
    parts["other"] = _count(inner, seen)
    total = sum(parts.values())
    sizes = adapter.intermediate_sizes()
    n_q, n_kv, head_dim = adapter.head_counts(0)
    return {
        "family": adapter.family.name,
        "model_type": config.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "intermediate_sizes": sizes,
        "expansion_ratio": 100.0 * sum(sizes) / len(sizes) / adapter.hidden_size,
        "num_attention_heads": n_q,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "total_parameters": total,
        "parameter_distribution": {
            name: {"parameters": n, "percentage": 100.0 * n / total} for name, n in parts.items()
        },
    }
