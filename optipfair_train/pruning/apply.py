"""``apply``: the one place that cuts a model to a :class:`~optipfair_train.pruning.plan.PruningPlan`.

For each step of the plan, in its order (depth, heads, MLP width): cut the weights (LoRA factors with
them, :mod:`.surgery`), write the planned refits or fold the linear replacement, cut the optimizer's
state the same way (and drop the parameters of removed blocks), and record the pruning event in
``config.pruning_history``. Everything that could refuse the plan (another model, a shape-only plan on
real weights) is checked before the first weight changes.

Example:
    >>> p = plan(model, [MLPWidthRequest(remove=16, method="L2")])  # doctest: +SKIP
    >>> events = apply(model, p, optimizer=trainer.optimizer)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..analysis import count_parameters
from .axes import AXES, cut_optimizer, is_meta
from .io import record_pruning_event
from .plan import PruningPlan, check_model

logger = logging.getLogger(__name__)

__all__ = ["apply"]


def apply(
    model: torch.nn.Module, plan: PruningPlan, optimizer: torch.optim.Optimizer | None = None
) -> list[dict[str, Any]]:
    """Cut ``model`` in place to ``plan``; return the events recorded (one per step that removed units).

    ``optimizer``: an optimizer (or Accelerate's wrapper) holding the model's parameters, e.g.
    ``trainer.optimizer``: its state is cut exactly like the weights, then every state tensor's shape is
    checked. A step that removes nothing records nothing.

    Raises:
        ValueError: the plan was made for another model (the first difference is named), or on a
            meta-device model (it knows how many units go, not which) while ``model`` has real weights.

    Example:
        >>> events = apply(model, plan(model, [DepthRequest(remove=1)]))  # doctest: +SKIP
        >>> events[0]["removed_layers"]  # doctest: +SKIP
        [3]
    """
    if not isinstance(plan, PruningPlan):
        raise ValueError(
            f"apply takes a PruningPlan (from plan(...) or PruningPlan.load), got {type(plan).__name__}."
        )
    check_model(model)
    plan.check_model(model)
    meta = is_meta(model)
    if plan.shape_only and not meta:
        raise ValueError(
            "This plan was made on a meta-device model: it knows how many units go, not which. Plan on the "
            "model with real weights; nothing was pruned."
        )
    events = []
    for step in plan.steps:
        if step.parameters_after == step.parameters_before:
            logger.info("%s step removes nothing; not applied, not recorded.", step.kind)
            continue
        before = count_parameters(model)
        slices, removed, fields = AXES[step.kind].cut(model, step)
        if optimizer is not None:
            cut_optimizer(optimizer, slices, removed)
        event = {
            "pruning_type": step.settings["pruning_type"],
            "parameters_before": before,
            **step.settings,
            **fields,
            "parameters_after": count_parameters(model),
        }
        event.pop("linear_fit", None)  # summarised by linear_replacement
        record_pruning_event(model, event)
        events.append(event)
        logger.info(
            "%s pruning (%s): %s -> %s parameters",
            event["pruning_type"],
            event["method"],
            f"{before:,}",
            f"{event['parameters_after']:,}",
        )
    return events
