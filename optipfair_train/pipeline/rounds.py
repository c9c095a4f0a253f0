"""Splitting a pruning target into rounds: what each round removes, relative to the model it gets
(the same conversion the pruning callback's schedules use).

Example:
    >>> round_prunings(model, base, config, round_idx=1)  # doctest: +SKIP
    [{'pruning_type': 'MLP_GLU', 'pruning_percentage': 10.0, 'neuron_selection_method': 'activation'}]
"""

from __future__ import annotations

from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter
from ..pruning.targets import round_share, step_percentage, units_to_remove
from .config import PipelineConfig

__all__ = ["round_prunings", "head_method"]


def round_prunings(
    model: torch.nn.Module, base: dict[str, int], config: PipelineConfig, round_idx: int
) -> list[dict[str, Any]]:
    """``prune_model`` keyword arguments for round ``round_idx`` (depth first, then heads, then width).

    ``base`` holds the unpruned model's ``width``, ``kv_heads``, ``parameters``. Widths and head counts
    are uniform in the pipeline, so every round's cut is a share of the original target.
    """
    p, rounds = config.pruning, config.pruning.num_rounds
    adapter = get_adapter(model)
    steps: list[dict[str, Any]] = []
    blocks = round_share(p.num_layers_to_remove, round_idx, rounds)
    if blocks:
        steps.append(
            dict(
                pruning_type="DEPTH",
                num_layers_to_remove=blocks,
                layer_selection_method=p.layer_selection_method,
                **({"replace_with_linear": True} if p.replace_with_linear else {}),
            )
        )
    # only when asked, so the recorded steps of a run without a refit stay as they were
    refit = dict(reconstruct=True, damping=p.damping, sequential=p.sequential) if p.reconstruct else {}
    share_of_target = round_idx / rounds  # each round brings the model this far toward the targets
    kv_heads = adapter.head_counts(0)[1]
    groups = units_to_remove(kv_heads, base["kv_heads"], p.attention_pruning_percentage * share_of_target)
    if groups:
        steps.append(
            dict(
                pruning_type="ATTENTION",
                pruning_percentage=step_percentage(kv_heads, groups),
                neuron_selection_method=head_method(p.neuron_selection_method),
                **refit,
            )
        )
    mlp_type = "MLP_GLU" if adapter.family.is_glu else "MLP"
    if p.target_parameters:
        current = count_parameters(model)
        goal = base["parameters"] - (base["parameters"] - p.target_parameters) * round_idx // rounds
        if goal < current:
            steps.append(
                dict(
                    pruning_type=mlp_type,
                    target_parameters=goal,
                    neuron_selection_method=p.neuron_selection_method,
                    **refit,
                )
            )
    elif p.mlp_pruning_percentage:
        width = adapter.mlp(0).intermediate_size
        neurons = units_to_remove(width, base["width"], p.mlp_pruning_percentage * share_of_target)
        if neurons:
            steps.append(
                dict(
                    pruning_type=mlp_type,
                    pruning_percentage=step_percentage(width, neurons),
                    neuron_selection_method=p.neuron_selection_method,
                    **refit,
                )
            )
    return steps


def head_method(neuron_method: str) -> str:
    """Heads have fewer scorers than neurons: map the neuron scorer to the closest head scorer.

    Example:
        >>> head_method("taylor"), head_method("fairness")
        ('taylor', 'activation')
    """
    return neuron_method if neuron_method in ("activation", "taylor", "random", "L2") else "activation"
