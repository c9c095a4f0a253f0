"""One parameter budget across axes: the unit counts (hidden channels, MLP neurons, heads, blocks) that bring
a model to at most a target parameter count, each axis taking a given share of the parameters removed.

:func:`budget_requests` returns ordinary engine requests with exact unit counts (``remove=``), so
``plan(model, requests)`` and ``apply`` do the rest as for any other pruning. Every count is found with
the engine's own parameter count on a shape-only (meta-device) twin of the model, so the interactions
between axes are exact: a removed hidden channel shortens every neuron and head, a removed block takes
its neurons and heads with it.

Rounding rule. The finest axis among those with a share (the one whose unit removes the fewest
parameters; MLP width when it is in the budget) is the *adjusting* axis. Every other axis, in the
engine's order (depth, heads, MLP width, hidden), removes the whole number of units nearest to its share
of the parameters to remove, measured on the model the axes before it leave (fewer if that would
already reach the target). The adjusting axis then
removes the fewest units that bring the model to at most the target: the result is never above the
target, and one unit fewer of the adjusting axis would be. Overlaps (a weight in both a removed channel
and a removed neuron) fall to the adjusting axis, so its realised share can differ from the one asked
by up to the other axes' rounding.

Granularity: MLP width in neurons per layer (every layer the same count), heads in KV groups per layer
(``head_granularity="query"``: query heads per group), depth in whole blocks (blocks of equal size), the
hidden dimension in multiples of ``hidden_divisor`` (default: the head count, or the least common
multiple of every head count the heads axis can leave when heads are in the budget too, since the
family's config needs the width to divide by the head count).

Example:
    >>> requests = budget_requests(model, fraction=0.25, shares={"hidden": 0.25, "mlp": 0.75})  # doctest: +SKIP
    >>> plan(model, requests).parameters_after <= 0.75 * count_parameters(model)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from ..names import BUDGET_AXES, parse_shares
from .apply import apply
from .axes import AXIS_ORDER
from .hidden_axis import HiddenRequest
from .plan import meta_twin, plan
from .requests import DepthRequest, HeadRequest, MLPWidthRequest, Request

logger = logging.getLogger(__name__)

__all__ = ["BUDGET_AXES", "budget_requests", "budget_target", "parse_shares"]

_TYPES = {"mlp": MLPWidthRequest, "heads": HeadRequest, "depth": DepthRequest, "hidden": HiddenRequest}
# request fields the budget sets itself (or that would make the per-layer counts uneven)
_OWN = {
    "kind", "scorer", "remove", "pruning_percentage", "expansion_rate", "expansion_divisor",
    "target_parameters", "depth_pruning_percentage", "layer_indices", "layer_allocation", "method",
    "calibrated", "reconstruct", "granularity", "divisor",
}  # fmt: skip


def budget_target(
    parameters: int, target_parameters: int | None = None, fraction: float | None = None
) -> int:
    """The parameter count to reach: ``target_parameters``, or ``fraction`` of ``parameters`` removed
    (floored: at most that many stay). Refuses both/neither and a target at or above ``parameters``.

    Example:
        >>> budget_target(1000, fraction=0.25)
        750
    """
    if (target_parameters is None) == (fraction is None):
        raise ValueError("Give exactly one of target_parameters and fraction (of the parameters to remove).")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"fraction is the share of parameters to remove, in (0, 1); got {fraction!r}.")
        return int(parameters * (1 - fraction))
    if isinstance(target_parameters, bool) or not isinstance(target_parameters, int) or target_parameters < 1:
        raise ValueError(f"target_parameters must be a positive integer, got {target_parameters!r}.")
    if target_parameters >= parameters:
        raise ValueError(
            f"target_parameters {target_parameters:,} is already reached: the model has {parameters:,} parameters."
        )
    return target_parameters


class _Axes:
    """Builds each axis's request for a unit count, with the caller's options; knows each axis's units."""

    def __init__(self, model, shares, calibrated, reconstruct, options):
        self.shares = shares
        methods = dict(options.pop("methods", None) or {})
        self.granularity = options.pop("head_granularity", "group")
        divisor = options.pop("hidden_divisor", None)
        unknown = [k for k in methods if k not in BUDGET_AXES]
        if unknown:
            raise ValueError(f"methods: unknown axis {unknown[0]!r}; accepted: {', '.join(BUDGET_AXES)}.")
        accepted = {f.name for t in _TYPES.values() for f in fields(t) if f.init} - _OWN
        bad = sorted(set(options) - accepted)
        if bad:
            raise ValueError(
                f"Unknown request option {bad[0]!r}; accepted: methods, head_granularity, hidden_divisor, "
                f"{', '.join(sorted(accepted))}."
            )
        self.kwargs: dict[str, dict[str, Any]] = {}
        for axis in shares:
            t = _TYPES[axis]
            names = {f.name for f in fields(t) if f.init}
            kw = {
                k: v
                for k, v in options.items()
                if k in names and not (axis == "hidden" and k == "sequential")
            }
            kw["calibrated"] = calibrated
            if "reconstruct" in names:
                kw["reconstruct"] = reconstruct
            if methods.get(axis) is not None:
                kw["method"] = methods[axis]
            if axis == "heads":
                kw["granularity"] = self.granularity
            self.kwargs[axis] = kw
        self.divisor = self._hidden_divisor(model, divisor) if "hidden" in shares else 1

    def _hidden_divisor(self, model, divisor: int | None) -> int:
        if divisor is not None:
            if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
                raise ValueError(f"hidden_divisor must be a positive integer, got {divisor!r}.")
            return divisor
        adapter = get_adapter(model)
        counts = {adapter.config.num_attention_heads}
        if "heads" in self.shares:  # every head count the heads axis can leave divides the width
            n_q, n_kv, _ = adapter.head_counts(0)
            g = n_q // n_kv
            counts |= (
                {k * g for k in range(1, n_kv + 1)}
                if self.granularity == "group"
                else {n_kv * k for k in range(1, g + 1)}
            )
        return math.lcm(*counts)

    def request(self, axis: str, units: int) -> Request:
        """``units`` of ``axis`` (hidden: ``units`` x divisor channels); the scorer is resolved once."""
        remove = units * self.divisor if axis == "hidden" else units
        request = _TYPES[axis](remove=remove, **self.kwargs[axis])
        self.kwargs[axis].setdefault("method", request.method)  # no repeated default-scorer warnings
        return request

    def max_units(self, model, axis: str) -> int:
        """The most units ``axis`` can remove from ``model`` (one unit of every kind stays)."""
        adapter = get_adapter(model)
        if axis == "mlp":
            return min(adapter.intermediate_sizes()) - 1
        if axis == "depth":
            return adapter.num_layers - 1
        if axis == "hidden":
            return (adapter.hidden_size - 1) // self.divisor
        units = []
        for i in range(adapter.num_layers):
            n_q, n_kv, _ = adapter.head_counts(i)
            units.append(n_kv if self.granularity == "group" else n_q // max(n_kv, 1))
        return min(units) - 1


def _after(twin: torch.nn.Module, requests: list[Request]) -> int:
    """Parameters ``requests`` leave, by the engine's own plan on a shape-only twin (which stays uncut)."""
    return plan(twin, requests).parameters_after if requests else count_parameters(twin)


def _check_axes(twin, axes: _Axes) -> dict[str, int]:
    """Refuse an axis the family lacks (or uneven blocks for depth); return each axis's unit cost."""
    family = get_adapter(twin).family.name
    total = count_parameters(twin)
    costs = {}
    for axis in axes.shares:
        try:
            if axes.max_units(twin, axis) < 1:
                raise ValueError(f"the model has no {axis} unit to spare")
            costs[axis] = total - _after(twin, [axes.request(axis, 1)])
        except ValueError as err:
            raise ValueError(
                f"The budget gives {axis!r} a share of {axes.shares[axis]:g}, but this {family} model cannot "
                f"prune that axis: {err}"
            ) from err
    if "depth" in axes.shares:
        sizes = {sum(p.numel() for p in block.parameters()) for block in get_adapter(twin).layers}
        if len(sizes) > 1:
            raise ValueError(
                f"A depth share needs blocks of equal size (the count does not depend on which go); this "
                f"model's blocks have {len(sizes)} different sizes. Leave depth out of the budget."
            )
    return costs


def budget_requests(
    model: torch.nn.Module,
    target_parameters: int | None = None,
    *,
    fraction: float | None = None,
    shares: Mapping[str, float] | str,
    calibrated: bool = False,
    reconstruct: bool = False,
    **request_options: Any,
) -> list[Request]:
    """Requests with exact unit counts, in the engine's order, that bring ``model`` to at most the target.

    ``target_parameters`` (absolute) or ``fraction`` (of the parameters to remove, e.g. 0.25): exactly one.
    ``shares``: the share of the removed parameters each axis takes (see :func:`parse_shares` and the
    module's rounding rule). ``calibrated`` / ``reconstruct`` go to every request that has them.
    ``request_options``: ``methods`` (per axis, e.g. ``{"mlp": "hybrid", "depth": "last"}``),
    ``head_granularity`` (``"group"`` or ``"query"``), ``hidden_divisor``, and any field the requests
    share (``seed``, ``damping``, ``sequential`` (not for hidden), ``fairness_weight``, ``glu_only``, ...).

    Nothing of ``model`` changes: all counting happens on a meta-device twin. Refused, naming the
    numbers: a target at or above the model's size or below the smallest model the axes can leave, a
    share for an axis the family lacks, a share larger than its axis can remove.

    Example:
        >>> requests = budget_requests(model, 900_000, shares={"mlp": 1.0}, methods={"mlp": "L2"})  # doctest: +SKIP
        >>> [r.kind for r in requests], plan(model, requests).parameters_after <= 900_000  # doctest: +SKIP
        (['mlp'], True)
    """
    shares = parse_shares(shares)
    twin = meta_twin(unwrap_model(model))
    total = count_parameters(twin)
    target = budget_target(total, target_parameters, fraction)
    axes = _Axes(twin, shares, calibrated, reconstruct, dict(request_options))
    costs = _check_axes(twin, axes)
    order = [a for a in AXIS_ORDER if a in shares]
    smallest = _after(twin, [axes.request(a, axes.max_units(twin, a)) for a in order])
    if target < smallest:
        raise ValueError(
            f"Target {target:,} parameters is below the smallest model {', '.join(order)} can leave "
            f"({smallest:,} of {total:,}: one unit of each kept). Give a larger target or more axes."
        )
    adjusting = min(order, key=lambda a: (costs[a], order.index(a)))
    goal = total - target
    counts: dict[str, int] = {}
    work = meta_twin(twin)
    for axis in (a for a in order if a != adjusting):
        before = count_parameters(work)
        unit = before - _after(work, [axes.request(axis, 1)])
        most = axes.max_units(work, axis)
        wanted = shares[axis] * goal
        counts[axis] = min(math.floor(wanted / unit + 0.5), most)
        if wanted > (most + 0.5) * unit:
            raise ValueError(
                f"The {axis} share {shares[axis]:g} asks for {wanted:,.0f} fewer parameters; {axis} can remove at "
                f"most {most * unit:,} ({most} units of {unit:,}). Give it a smaller share."
            )
        # the adjusting axis keeps at least one unit to remove, so the result is tight
        while counts[axis] and _after(work, [axes.request(axis, counts[axis])]) <= target:
            counts[axis] -= 1
        if counts[axis]:
            apply(work, plan(work, [axes.request(axis, counts[axis])]))
    counts[adjusting] = _adjust(work, axes, adjusting, target)
    requests = [axes.request(a, counts[a]) for a in order if counts[a]]
    after = _after(meta_twin(twin), requests)
    if after > target:  # the engine's shapes do not depend on the order of the cuts
        raise RuntimeError(f"Budget planning error: {after:,} parameters planned for a target of {target:,}.")
    logger.info(
        "Budget %s -> at most %s parameters: %s (%s after)",
        f"{total:,}",
        f"{target:,}",
        ", ".join(f"{a} {r.remove}" for a, r in zip([r.kind for r in requests], requests, strict=True)),
        f"{after:,}",
    )
    return requests


def _adjust(work, axes: _Axes, axis: str, target: int) -> int:
    """The fewest units of ``axis`` that bring ``work`` (cut by the other axes) to at most ``target``."""
    before = count_parameters(work)
    if before <= target:
        return 0
    most = axes.max_units(work, axis)
    if _after(work, [axes.request(axis, most)]) > target:
        raise ValueError(
            f"With the other axes' shares taken, {axis} cannot bring the model to {target:,} parameters "
            f"({before:,} left; all but one of its units would leave "
            f"{_after(work, [axes.request(axis, most)]):,}). Give {axis} a larger share or another axis."
        )
    unit = before - _after(work, [axes.request(axis, 1)])
    n = min(max(1, math.ceil((before - target) / unit)), most)
    while n < most and _after(work, [axes.request(axis, n)]) > target:
        n += 1
    while n > 1 and _after(work, [axes.request(axis, n - 1)]) <= target:
        n -= 1
    return n
