"""Splitting a pruning target into rounds: the requests each round makes, in unit counts of the model it
gets (the same conversion the pruning callback's schedules use, ``units_to_remove``).

A parameter budget (``target_fraction``, or ``target_parameters`` with ``budget_shares``) is spent by
:func:`~optipfair_train.pruning.budget_requests`: round ``k`` of ``n`` brings the model to ``k/n`` of the
way to the target, each axis taking its share of that round's cut. ``target_parameters`` without
``budget_shares`` keeps its first meaning: MLP width until at most that many parameters.

Example:
    >>> round_requests(model, base, config, round_idx=1)  # doctest: +SKIP
    [MLPWidthRequest(remove=12, method='activation', ...)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter
from ..pruning import DepthRequest, HeadRequest, MLPWidthRequest, Request, budget_requests, parse_shares
from ..pruning.budget import budget_target
from ..pruning.heads import HEAD_METHODS
from ..pruning.targets import round_share, units_to_remove
from .config import PipelineConfig, PruningConfig

__all__ = ["round_requests", "check_budget", "is_budget"]


def is_budget(p: PruningConfig) -> bool:
    """Whether the run spends a parameter budget across axes (rather than per-axis percentages)."""
    return bool(p.target_fraction or p.budget_shares)


def check_budget(p: PruningConfig) -> None:
    """Refuse a budget setting that cannot work, before any model is loaded: one target, shares that
    parse, no per-axis setting beside it.

    Example:
        >>> check_budget(load_config(None, ["--mlp_pruning_percentage", "0", "--target_fraction", "0.25"]).pruning)  # doctest: +SKIP
    """
    if not 0 <= p.target_fraction < 1:
        raise ValueError(
            f"target_fraction is the share of parameters to remove, in [0, 1); got {p.target_fraction}."
        )
    if p.target_fraction and p.target_parameters:
        raise ValueError("Give target_parameters or target_fraction, not both.")
    if not is_budget(p):
        return
    if not (p.target_fraction or p.target_parameters):
        raise ValueError("budget_shares spends a budget: set target_parameters or target_fraction as well.")
    per_axis = [k for k in ("mlp_pruning_percentage", "attention_pruning_percentage", "num_layers_to_remove")
                if getattr(p, k)]  # fmt: skip
    if per_axis:
        raise ValueError(
            f"A parameter budget sets every axis's count itself: set {', '.join(per_axis)} to 0 "
            "(mlp_pruning_percentage defaults to 20)."
        )
    if p.budget_shares.strip() == "search":  # each candidate costs minutes and needs held-out text of its own
        raise ValueError(
            "budget_shares: search is not run inside the pipeline; run `optipfair-train search MODEL "
            "--fraction F` once and put the budget_shares it prints here (e.g. 'hidden=0.25,mlp=0.75')."
        )
    try:
        parse_shares(p.budget_shares or "mlp=1")
    except ValueError as err:
        raise ValueError(f"budget_shares: {err}") from err


def round_requests(
    model: torch.nn.Module,
    base: dict[str, int],
    config: PipelineConfig,
    round_idx: int,
    *,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    bias_items: Sequence[Any] | None = None,
) -> list[Request]:
    """The requests of round ``round_idx`` (applied depth first, then heads, then width).

    ``base`` holds the unpruned model's ``width``, ``kv_heads``, ``parameters``. Widths and head counts
    are uniform in the pipeline, so every round's cut is a share of the original target. Every request
    is scored on the calibration data; ``bias_pairs`` and ``tokenizer`` feed the ``fairness`` neuron
    scorer, ``bias_items`` (StereoSet build items) and ``tokenizer`` the ``fairness`` head scorer.
    """
    p, rounds = config.pruning, config.pruning.num_rounds
    adapter = get_adapter(model)
    if is_budget(p):
        return _budget_round(model, base, config, round_idx, bias_pairs, tokenizer, bias_items)
    requests: list[Request] = []
    blocks = round_share(p.num_layers_to_remove, round_idx, rounds)
    if blocks:
        requests.append(
            DepthRequest(
                remove=blocks,
                method=p.layer_selection_method,
                replace_with_linear=p.replace_with_linear,
                calibrated=True,
            )
        )
    refit = dict(reconstruct=True, damping=p.damping, sequential=p.sequential) if p.reconstruct else {}
    share_of_target = round_idx / rounds  # each round brings the model this far toward the targets
    kv_heads = adapter.head_counts(0)[1]
    groups = units_to_remove(kv_heads, base["kv_heads"], p.attention_pruning_percentage * share_of_target)
    method = _head_method(p)
    if groups:
        requests.append(
            HeadRequest(
                remove=groups,
                method=method,
                calibrated=True,
                seed=config.run.seed,
                **refit,
                **_fairness_heads(p, bias_items, tokenizer),
            )
        )
    mlp = dict(
        method=p.neuron_selection_method,
        calibrated=True,
        seed=config.run.seed,
        fairness_weight=p.fairness_weight,
        bias_pairs=bias_pairs,
        tokenizer=tokenizer,
        glu_only=adapter.family.is_glu,
        **refit,
    )
    if p.target_parameters:
        goal = base["parameters"] - (base["parameters"] - p.target_parameters) * round_idx // rounds
        if goal < count_parameters(model):
            requests.append(MLPWidthRequest(target_parameters=goal, **mlp))
    elif p.mlp_pruning_percentage:
        width = adapter.mlp(0).intermediate_size
        neurons = units_to_remove(width, base["width"], p.mlp_pruning_percentage * share_of_target)
        if neurons:
            requests.append(MLPWidthRequest(remove=neurons, **mlp))
    return requests


def _head_method(p: PruningConfig) -> str | None:
    """A neuron scorer heads do not have (hybrid, ...) leaves the heads' default; ``fairness`` names a
    scorer of both."""
    return p.neuron_selection_method if p.neuron_selection_method in HEAD_METHODS else None


def _fairness_heads(p: PruningConfig, bias_items, tokenizer) -> dict[str, Any]:
    """The ``fairness`` head scorer's inputs (StereoSet build items; none for any other head method)."""
    if _head_method(p) != "fairness":
        return {}
    shortlist = p.fairness_shortlist or None
    return dict(
        bias_items=bias_items,
        tokenizer=tokenizer,
        fairness_lambda=p.fairness_lambda,
        fairness_shortlist=shortlist,
    )


def _budget_round(model, base, config, round_idx, bias_pairs, tokenizer, bias_items) -> list[Request]:
    p = config.pruning
    target = budget_target(base["parameters"], p.target_parameters or None, p.target_fraction or None)
    goal = base["parameters"] - (base["parameters"] - target) * round_idx // p.num_rounds
    if goal >= count_parameters(model):
        return []
    return budget_requests(
        model,
        goal,
        shares=p.budget_shares or "mlp=1",
        calibrated=True,
        reconstruct=p.reconstruct,
        methods={
            "mlp": p.neuron_selection_method,
            "heads": _head_method(p),
            "depth": p.layer_selection_method,
        },
        damping=p.damping,
        sequential=p.sequential,
        replace_with_linear=p.replace_with_linear,
        seed=config.run.seed,
        fairness_weight=p.fairness_weight,
        bias_pairs=bias_pairs,
        tokenizer=tokenizer,
        glu_only=get_adapter(model).family.is_glu,
        **{k: v for k, v in _fairness_heads(p, bias_items, tokenizer).items() if k != "tokenizer"},
    )
