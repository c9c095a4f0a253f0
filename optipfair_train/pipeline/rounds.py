"""Splitting a pruning target into rounds: the requests each round makes, in unit counts of the model it
gets (the same conversion the pruning callback's schedules use, ``units_to_remove``).

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
from ..pruning import DepthRequest, HeadRequest, MLPWidthRequest, Request
from ..pruning.heads import HEAD_METHODS
from ..pruning.targets import round_share, units_to_remove
from .config import PipelineConfig

__all__ = ["round_requests"]


def round_requests(
    model: torch.nn.Module,
    base: dict[str, int],
    config: PipelineConfig,
    round_idx: int,
    *,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
) -> list[Request]:
    """The requests of round ``round_idx`` (applied depth first, then heads, then width).

    ``base`` holds the unpruned model's ``width``, ``kv_heads``, ``parameters``. Widths and head counts
    are uniform in the pipeline, so every round's cut is a share of the original target. Every request
    is scored on the calibration data; ``bias_pairs`` and ``tokenizer`` feed the ``fairness`` scorer.
    """
    p, rounds = config.pruning, config.pruning.num_rounds
    adapter = get_adapter(model)
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
    if groups:
        # a neuron scorer heads do not have (hybrid, fairness, ...) leaves the heads' default
        method = p.neuron_selection_method if p.neuron_selection_method in HEAD_METHODS else None
        requests.append(
            HeadRequest(remove=groups, method=method, calibrated=True, seed=config.run.seed, **refit)
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
