"""Attention-head pruning that respects grouped-query attention (GQA).

Query head ``h`` reads key/value head ``h // g`` (``g = num_heads / num_kv_heads``: transformers'
``repeat_kv`` layout). Two granularities keep that structure valid:

- ``"group"``: remove whole KV groups (the key/value head and its ``g`` query heads);
- ``"query"``: remove the same number of query heads inside every group (keys/values stay).

``head_dim`` never changes (RoPE depends on it). Importance per query head:

- ``L2``: ``||W_q[h]||_F + ||W_o[:, h]||_F`` (+ ``||W_k[g]||_F + ||W_v[g]||_F`` for a group);
- ``activation``: ``sqrt(sum over tokens of ||a_h||^2) * ||W_o[:, h]||_F``, ``a_h`` the head's output
  (the ``o_proj`` input slice), padding excluded;
- ``taylor``: first-order Taylor over the head's q rows and o_proj columns (:mod:`.taylor`);
- ``random``: seeded baseline;
- ``fairness``: ablation on StereoSet build items, bias reduction against LM cost (:mod:`.fair_heads`).

A group's score is the sum of its query heads' scores. ``layer_allocation="uniform"`` removes the same
number of units from every chosen layer; ``"global"`` ranks the units of all chosen layers together
(:mod:`.head_allocation`) and removes the lowest, at least one unit staying in each layer.

Example:
    >>> plan = plan_attention_heads(model, pruning_percentage=34, method="L2")  # doctest: +SKIP
    >>> apply_head_plan(model, plan)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..arch import AttentionParts, get_adapter, weight_out_in
from .calibration import CalibrationBatch, input_sumsq
from .head_allocation import global_head_counts
from .surgery import ParamSlice, record_attention_sizes, slice_linear
from .targets import check_layer_indices, check_percentage
from .taylor import TaylorImportance, taylor_importance

if TYPE_CHECKING:
    from .fair_heads import HeadAblation

__all__ = [
    "HEAD_METHODS",
    "HEAD_GRANULARITIES",
    "HEAD_ALLOCATIONS",
    "check_head_granularity",
    "check_head_method",
    "HeadPlan",
    "head_scores",
    "plan_attention_heads",
    "choose_heads",
    "apply_head_plan",
    "head_columns",
    "head_keep_counts",
    "head_units",
    "layer_head_scores",
    "select_heads",
    "prune_heads",
]

HEAD_METHODS = ("L2", "activation", "taylor", "random", "fairness")
HEAD_GRANULARITIES = ("group", "query")
HEAD_ALLOCATIONS = ("uniform", "global")


@dataclass
class HeadPlan:
    """Kept query heads and kept key/value heads of one layer (sorted indices)."""

    query_heads: torch.Tensor
    kv_heads: torch.Tensor


def _blocks(weight: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Frobenius norm of each of ``n`` equal blocks of ``weight`` along ``dim``."""
    w = weight.detach().float()
    w = w.reshape(n, -1, w.shape[1]) if dim == 0 else w.reshape(w.shape[0], n, -1).transpose(0, 1)
    return w.flatten(1).norm(dim=1)


def check_head_method(method: str, *, calibrated: bool, gradients: bool = False, items: bool = False) -> None:
    """Refuse an unknown head method, or a data-driven one without its data (the one copy of this rule);
    ``items``: StereoSet items and a tokenizer are given (``fairness``).

    Example:
        >>> check_head_method("L2", calibrated=False)
    """
    if method not in HEAD_METHODS:
        raise ValueError(
            f"Unknown head importance method {method!r}; attention heads accept "
            f"{', '.join(HEAD_METHODS)} (MAW, VOW and PON are defined for MLP neurons only)."
        )
    if method == "activation" and not calibrated or method == "taylor" and not (calibrated or gradients):
        raise ValueError(
            f"Head importance {method!r} needs calibration data: pass dataloader=..., or use L2."
        )
    if method == "fairness" and not items:
        raise ValueError(
            "Head importance 'fairness' scores heads on StereoSet items: pass bias_items=... (the build "
            "half of split_items) and tokenizer=..."
        )


def layer_head_scores(
    parts: AttentionParts,
    counts: tuple[int, int, int],
    method: str,
    granularity: str,
    stat: torch.Tensor | None,
    seed: int,
    layer_idx: int,
) -> torch.Tensor:
    """One layer's head scores; ``stat``: o_proj input sum of squares (``activation``), or the per-head
    scores themselves (``taylor``, ``fairness``).

    Example:
        >>> parts, counts = adapter.attention(0), adapter.head_counts(0)  # doctest: +SKIP
        >>> layer_head_scores(parts, counts, "L2", "group", None, 0, 0)  # doctest: +SKIP
    """
    n_q, n_kv, head_dim = counts
    o_norm = _blocks(weight_out_in(parts.o), n_q, dim=1)
    if method == "L2":
        per_head = _blocks(weight_out_in(parts.q), n_q, dim=0) + o_norm
    elif method == "activation":
        per_head = stat.reshape(n_q, head_dim).sum(dim=1).sqrt() * o_norm
    elif method in ("taylor", "fairness"):
        per_head = stat
    else:
        per_head = torch.rand(n_q, generator=torch.Generator().manual_seed(seed * 100_003 + layer_idx))
    if granularity == "group":
        per_head = per_head.reshape(n_kv, n_q // n_kv).sum(dim=1)
        if method == "L2":
            per_head = (
                per_head + _blocks(weight_out_in(parts.k), n_kv, 0) + _blocks(weight_out_in(parts.v), n_kv, 0)
            )
    return per_head


def head_scores(
    model: torch.nn.Module,
    method: str,
    *,
    batches: list[CalibrationBatch] | None = None,
    layer_indices: Sequence[int] | None = None,
    granularity: str = "group",
    seed: int = 0,
    gradient_importance: TaylorImportance | None = None,
    bias_items: Sequence | None = None,
    tokenizer=None,
    fairness_lambda: float = 1.0,
    head_ablation: HeadAblation | None = None,
    fairness_shortlist: int | None = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Importance per KV group (``granularity="group"``) or per query head (``"query"``), per layer.

    ``fairness`` reads ``bias_items`` (tokenized with ``tokenizer``), ``batches`` when given, and
    ``fairness_lambda`` and ``fairness_shortlist`` (:mod:`.fair_heads`), or effects measured before
    (``head_ablation``).

    Example:
        >>> head_scores(model, "L2")[0].shape  # (num_kv_heads,)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    layers = list(range(adapter.num_layers)) if layer_indices is None else list(layer_indices)
    check_head_method(
        method,
        calibrated=batches is not None,
        gradients=gradient_importance is not None,
        items=bool(bias_items) and tokenizer is not None or head_ablation is not None,
    )
    stats: dict[int, torch.Tensor] = {}
    if method == "activation":
        modules = {i: adapter.attention(i).o for i in layers}
        stats = input_sumsq(model, batches, modules, show_progress=show_progress, desc="head statistics")
    elif method == "taylor":
        taylor = gradient_importance or taylor_importance(model, batches, show_progress=show_progress)
        stats = taylor.head_scores()
    elif method == "fairness":
        from .fair_heads import head_ablation_effects  # it runs blocks with .sequential, which imports this

        effects = head_ablation or head_ablation_effects(
            model,
            tokenizer,
            bias_items,
            batches=batches,
            layer_indices=layers,
            shortlist=fairness_shortlist,
            fairness_lambda=fairness_lambda,
            show_progress=show_progress,
        )
        stats = effects.importance(fairness_lambda)
        missing = [i for i in layers if i not in stats or len(stats[i]) != adapter.head_counts(i)[0]]
        if missing:
            raise ValueError(
                f"head_ablation holds no scores for the current heads of layers {missing}: measure it on "
                "this model as it is now."
            )
    scores = {}
    for i in layers:
        scores[i] = layer_head_scores(
            adapter.attention(i), adapter.head_counts(i), method, granularity, stats.get(i), seed, i
        )
    return scores


def check_head_granularity(granularity: str) -> None:
    """Refuse a head granularity other than ``group`` / ``query`` (the requests, the low-level planner
    and the pruning callback all check it here).

    Example:
        >>> check_head_granularity("query")
    """
    if granularity not in HEAD_GRANULARITIES:
        raise ValueError(
            "head_granularity must be 'group' (whole KV groups) or 'query' (query heads inside groups), "
            f"got {granularity!r}."
        )


def head_units(
    model: torch.nn.Module, granularity: str, layer_indices: Sequence[int] | None
) -> dict[int, int]:
    """Validate the model and layers for head pruning; return each layer's units (KV groups, or query
    heads per group).

    Example:
        >>> head_units(model, "query", None)  # doctest: +SKIP
        {0: 2, 1: 2, 2: 2, 3: 2}
    """
    adapter = get_adapter(model)
    if not adapter.family.separate_qkv:
        raise ValueError(f"Head pruning needs separate q/k/v projections; {adapter.family.name} fuses them.")
    check_head_granularity(granularity)
    layers = check_layer_indices(layer_indices, adapter.num_layers)
    units = {}
    for i in layers:
        n_q, n_kv, _ = adapter.head_counts(i)
        if n_q % n_kv:
            raise ValueError(
                f"Layer {i} has {n_q} query heads for {n_kv} key/value heads, which do not divide "
                "into equal groups; head pruning needs num_heads % num_kv_heads == 0."
            )
        units[i] = n_kv if granularity == "group" else n_q // n_kv
    return units


def head_keep_counts(
    model: torch.nn.Module,
    pruning_percentage: float | None,
    granularity: str,
    layer_indices: Sequence[int] | None,
    *,
    remove: int | None = None,
) -> dict[int, int]:
    """Validate a head-pruning request; return the units (groups, or query heads per group) each layer keeps.

    ``remove`` units per layer, or ``pruning_percentage`` of them (floored, OptiPFair's rounding).

    Example:
        >>> head_keep_counts(model, 50, "group", None)  # doctest: +SKIP
    """
    if remove is None:
        check_percentage("pruning_percentage", pruning_percentage)
    counts = {}
    for i, units in head_units(model, granularity, layer_indices).items():
        asked = f"pruning_percentage {pruning_percentage}%" if remove is None else f"remove={remove}"
        removed = int(pruning_percentage / 100 * units + 1e-9) if remove is None else remove
        if removed == 0:
            raise ValueError(
                f"{asked} removes no {granularity} in layer {i} "
                f"({units} units): the smallest step is {100 / units:.1f}%."
            )
        if removed >= units:
            raise ValueError(f"{asked} would remove all heads of layer {i} ({units} units).")
        counts[i] = units - removed
    return counts


def select_heads(scores: torch.Tensor, n_q: int, n_kv: int, count: int, granularity: str) -> HeadPlan:
    """The heads one layer keeps: its ``count`` best groups, or best query heads in every group."""
    g = n_q // n_kv
    if granularity == "group":
        kv = scores.topk(count).indices.sort().values
        q = (kv[:, None] * g + torch.arange(g)).flatten()
    else:
        kv = torch.arange(n_kv)
        within = scores.reshape(n_kv, g).topk(count, dim=1).indices.sort(dim=1).values
        q = (kv[:, None] * g + within).flatten()
    return HeadPlan(query_heads=q, kv_heads=kv)


def choose_heads(
    model: torch.nn.Module,
    counts: dict[int, int],
    method: str,
    granularity: str,
    *,
    batches: list[CalibrationBatch] | None = None,
    seed: int = 0,
    gradient_importance: TaylorImportance | None = None,
    remove_total: int | None = None,
    show_progress: bool = False,
    **fairness,
) -> tuple[dict[int, HeadPlan], dict[int, torch.Tensor]]:
    """The heads each layer of ``counts`` keeps (``counts[i]`` units) and the scores that decided it.

    With ``remove_total`` (global allocation), ``counts`` holds each layer's units and the
    ``remove_total`` lowest units of all layers go (:mod:`.head_allocation`); layers that lose none
    are left out of the plans. ``fairness``: ``bias_items``, ``tokenizer``, ``fairness_lambda``.

    Example:
        >>> plans, scores = choose_heads(model, {0: 1, 1: 1}, "L2", "group")  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    scores = head_scores(
        model,
        method,
        batches=batches,
        layer_indices=list(counts),
        granularity=granularity,
        seed=seed,
        gradient_importance=gradient_importance,
        show_progress=show_progress,
        **fairness,
    )
    if remove_total is not None:
        units = counts
        kept = global_head_counts(scores, units, remove_total, normalise=method != "fairness")
        counts = {i: k for i, k in kept.items() if k < units[i]}
    plans = {
        i: select_heads(scores[i], *adapter.head_counts(i)[:2], k, granularity) for i, k in counts.items()
    }
    return plans, scores


def plan_attention_heads(
    model: torch.nn.Module,
    *,
    pruning_percentage: float,
    method: str = "L2",
    granularity: str = "group",
    batches: list[CalibrationBatch] | None = None,
    layer_indices: Sequence[int] | None = None,
    seed: int = 0,
    gradient_importance: TaylorImportance | None = None,
    show_progress: bool = False,
) -> dict[int, HeadPlan]:
    """Which heads each layer keeps. Validates everything; changes nothing.

    ``pruning_percentage`` is the share of KV groups removed (``"group"``) or of the query heads in each
    group (``"query"``); it is floored to whole units and must remove at least one and keep at least one.

    Example:
        >>> plan = plan_attention_heads(model, pruning_percentage=50, granularity="query")  # doctest: +SKIP
    """
    check_head_method(method, calibrated=batches is not None, gradients=gradient_importance is not None)
    counts = head_keep_counts(model, pruning_percentage, granularity, layer_indices)
    return choose_heads(
        model,
        counts,
        method,
        granularity,
        batches=batches,
        seed=seed,
        gradient_importance=gradient_importance,
        show_progress=show_progress,
    )[0]


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of ``heads`` in q/k/v (= column indices in o_proj), ``head_dim`` rows per head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_heads(parts: AttentionParts, keep: HeadPlan, n_kv: int, head_dim: int) -> list[ParamSlice]:
    """Cut one attention block (``parts``, which had ``n_kv`` KV heads) to the heads of ``keep``."""
    q_rows, kv_rows = head_columns(keep.query_heads, head_dim), head_columns(keep.kv_heads, head_dim)
    slices = slice_linear(parts.q, q_rows, dim=0)
    slices += slice_linear(parts.o, q_rows, dim=1)
    if len(keep.kv_heads) < n_kv:
        slices += slice_linear(parts.k, kv_rows, dim=0)
        slices += slice_linear(parts.v, kv_rows, dim=0)
    parts.module.num_key_value_groups = len(keep.query_heads) // len(keep.kv_heads)
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(parts.module, name):
            setattr(parts.module, name, len(keep.query_heads))
    if hasattr(parts.module, "num_key_value_heads"):
        parts.module.num_key_value_heads = len(keep.kv_heads)
    return slices


def apply_head_plan(model: torch.nn.Module, plan: dict[int, HeadPlan]) -> list[ParamSlice]:
    """Cut q/k/v rows and o_proj columns to the kept heads; update module attributes and config.

    Example:
        >>> slices = apply_head_plan(model, plan)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    slices: list[ParamSlice] = []
    for i, keep in plan.items():
        n_q, n_kv, head_dim = adapter.head_counts(i)
        slices += prune_heads(adapter.attention(i), keep, n_kv, head_dim)
    record_attention_sizes(adapter)
    return slices
