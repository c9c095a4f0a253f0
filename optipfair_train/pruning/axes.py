"""The pruning axes: for each request kind, how it is planned (which units go, refits, scores) and how
a planned step is cut into the model. :func:`~optipfair_train.pruning.plan.plan` and
:func:`~optipfair_train.pruning.apply.apply` only go through :data:`AXES`.

A new axis registers one :class:`Axis` (``register_axis``) and takes its place in :data:`AXIS_ORDER`,
the order in which the axes of one plan are planned and applied: depth first (blocks that go need no
other cut), then heads, then MLP width, as the pipeline's rounds have always done; the hidden
dimension (:mod:`.hidden_axis`) comes last.

Example:
    >>> AXIS_ORDER
    ['depth', 'heads', 'mlp', 'hidden']
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import get_adapter
from .depth import select_layers_to_remove
from .depth_replace import LinearReplacement, fit_linear_replacement, fold_linear_replacement
from .head_allocation import head_remove_total
from .heads import (
    HeadPlan,
    apply_head_plan,
    choose_heads,
    head_columns,
    head_keep_counts,
    head_units,
    select_heads,
)
from .reconstruction import apply_refits, check_calibration_size, collect_grams, plan_refits
from .requests import DepthRequest, HeadRequest, MLPWidthRequest
from .sequential import sequential_head_plan, sequential_mlp_plan
from .surgery import ParamSlice, drop_optimizer_parameters, remove_layers, slice_optimizer_state
from .width import apply_width_plan, choose_neurons, mlp_width_targets

logger = logging.getLogger(__name__)

__all__ = [
    "Step",
    "Axis",
    "AXES",
    "AXIS_ORDER",
    "register_axis",
    "is_meta",
    "scores_json",
    "check_finite_scores",
    "cut_optimizer",
]


@dataclass
class Step:
    """One axis of a plan: what goes, per layer, and what it costs.

    ``layers`` maps a layer index to its kept units (``keep`` for neurons, ``query_heads``/``kv_heads``
    for heads) and, when known, the ``scores`` that decided it; a depth step lists ``removed_layers``
    in ``settings``. Indices are those of the model as this step finds it (after the steps before it).
    ``tensors`` holds computed weights (refits ``refit.<layer>``, a depth ``linear_replacement``); they
    are saved beside the plan's JSON. ``shape_only`` marks a step planned on a meta-device model: it
    knows how many units go, not which.
    """

    kind: str
    settings: dict[str, Any]
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    shape_only: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def refit_layers(self) -> list[int]:
        return sorted(int(k.split(".")[1]) for k in self.tensors if k.startswith("refit."))

    def refits(self) -> dict[int, torch.Tensor]:
        return {i: self.tensors[f"refit.{i}"] for i in self.refit_layers}

    def kept_counts(self) -> dict[int, int]:
        """Units each layer keeps (neurons, or query heads); for depth, the layers that stay."""
        if self.kind == "depth":
            return {"removed": len(self.settings["removed_layers"])}
        key = "query_heads" if self.kind == "heads" else "keep"
        return {i: len(layer[key]) for i, layer in self.layers.items()}


@dataclass(frozen=True)
class Axis:
    """How one request kind is planned (``plan(model, request, batches, show_progress) -> Step``) and
    cut (``cut(model, step) -> (slices, removed_parameters, event_fields)``)."""

    kind: str
    plan: Callable[..., Step]
    cut: Callable[[torch.nn.Module, Step], tuple[list[ParamSlice], list[torch.nn.Parameter], dict[str, Any]]]
    request_type: type


AXES: dict[str, Axis] = {}
AXIS_ORDER: list[str] = []


def register_axis(axis: Axis, *, before: str | None = None) -> None:
    """Add an axis; ``before`` places it ahead of an existing one in :data:`AXIS_ORDER` (else last).

    Example:
        >>> register_axis(AXES["mlp"])  # doctest: +SKIP
    """
    if axis.kind in AXES:
        raise ValueError(f"An axis {axis.kind!r} is already registered.")
    AXES[axis.kind] = axis
    AXIS_ORDER.insert(AXIS_ORDER.index(before) if before else len(AXIS_ORDER), axis.kind)


def is_meta(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds meta-device (shape-only) parameters."""
    return any(p.device.type == "meta" for p in model.parameters())


def scores_json(scores: torch.Tensor) -> list[float]:
    """Scores as JSON numbers, 6 significant digits (readable; ties in the plan come from the tensors)."""
    return [float(f"{v:.6g}") for v in scores.detach().double().tolist()]


def check_finite_scores(scores: dict[int, torch.Tensor], what: str) -> None:
    """Refuse NaN/Inf scores, naming the first layer (non-finite activations or weights upstream)."""
    for i, s in scores.items():
        if not torch.isfinite(s).all():
            raise ValueError(
                f"The {what} scores of layer {i} are not finite (NaN/Inf): the calibration forward or the "
                "weights produce non-finite values. Nothing was pruned."
            )


def _refits(model, kind: str, columns: dict, batches: list, damping: float, show_progress: bool) -> dict:
    """Refit weights for every layer of ``columns`` (kept input indices), before any weight changes."""
    tokens = check_calibration_size(batches, max(len(c) for c in columns.values()), damping)
    grams = collect_grams(model, batches, kind, columns.keys(), show_progress=show_progress)
    logger.info("Refitting %d %s layers on %d calibration tokens", len(columns), kind, tokens)
    return plan_refits(model, kind, columns, grams, damping)


# ---- MLP width ---------------------------------------------------------------------------------------
def _plan_mlp(model, request: MLPWidthRequest, batches: list | None, show_progress: bool) -> Step:
    targets = mlp_width_targets(model, **request.target_arguments())
    step = Step("mlp", request.settings())
    widths = {get_adapter(model).mlp(i).intermediate_size for i in targets}
    if request.remove is not None and len(widths) == 1:  # OptiPFair's name for the share this count is
        step.settings["pruning_percentage"] = 100.0 * request.remove / widths.pop()
    if is_meta(model):  # shapes only: which neurons go needs weight values
        step.shape_only = True
        step.layers = {i: {"keep": list(range(k))} for i, k in targets.items()}
        return step
    scoring = dict(seed=request.seed, fairness_weight=request.fairness_weight)
    scores: dict[int, torch.Tensor] = {}
    if request.sequential:
        # global widths come from one non-sequential scoring pass; the sequential pass then re-scores
        # and refits each layer at that width on its pruned-prefix inputs
        if request.layer_allocation == "global":
            first, _ = choose_neurons(
                model, targets, request.method, layer_allocation="global", batches=batches, **scoring
            )
            targets = {i: len(k) for i, k in first.items()}
        check_calibration_size(batches, max(targets.values()), request.damping)
        keep, refits = sequential_mlp_plan(
            model, batches, request.method, targets, request.damping, show_progress=show_progress, **scoring
        )
    else:
        keep, scores = choose_neurons(
            model,
            targets,
            request.method,
            layer_allocation=request.layer_allocation,
            expansion_divisor=request.expansion_divisor,
            batches=batches,
            show_progress=show_progress,
            gradient_importance=request.gradient_importance,
            bias_pairs=request.bias_pairs,
            tokenizer=request.tokenizer,
            **scoring,
        )
        check_finite_scores(scores, f"{request.method} neuron")
        refits = (
            _refits(model, "mlp", keep, batches, request.damping, show_progress)
            if request.reconstruct
            else {}
        )
    for i, k in keep.items():
        step.layers[i] = {"keep": k.tolist()}
        if i in scores:
            step.layers[i]["scores"] = scores_json(scores[i])
    step.tensors = {f"refit.{i}": w for i, w in refits.items()}
    return step


def _cut_mlp(model, step: Step) -> tuple[list[ParamSlice], list, dict[str, Any]]:
    slices = apply_width_plan(model, {i: torch.tensor(layer["keep"]) for i, layer in step.layers.items()})
    if not is_meta(model):
        apply_refits(model, "mlp", step.refits())
    return slices, [], {"intermediate_sizes": get_adapter(model).intermediate_sizes()}


# ---- attention heads ---------------------------------------------------------------------------------
def _plan_heads(model, request: HeadRequest, batches: list | None, show_progress: bool) -> Step:
    adapter = get_adapter(model)
    step = Step("heads", request.settings())
    remove_total = None
    if request.layer_allocation == "global":  # counts: every unit; remove_total of them go
        counts = head_units(model, request.granularity, request.layer_indices)
        remove_total = head_remove_total(counts, request.pruning_percentage, request.remove)
        if is_meta(model):
            raise ValueError(
                "layer_allocation='global' for heads decides which layers lose heads from scores: it needs "
                "real weights, not a shape-only (meta) model."
            )
    else:
        counts = head_keep_counts(
            model,
            request.pruning_percentage,
            request.granularity,
            request.layer_indices,
            remove=request.remove,
        )
        units = {k + (request.remove or 0) for k in counts.values()}
        if request.remove is not None and len(units) == 1:  # OptiPFair's name for the share this count is
            step.settings["pruning_percentage"] = 100.0 * request.remove / units.pop()
    if is_meta(model):
        step.shape_only = True
        for i, k in counts.items():  # the first units stand in for the ones scores would choose
            n_q, n_kv, _ = adapter.head_counts(i)
            g = n_q // n_kv
            first = (
                torch.arange(n_kv, 0, -1)
                if request.granularity == "group"
                else torch.arange(g, 0, -1).repeat(n_kv)
            )
            p = select_heads(first.float(), n_q, n_kv, k, request.granularity)
            step.layers[i] = {"query_heads": p.query_heads.tolist(), "kv_heads": p.kv_heads.tolist()}
        return step
    scores: dict[int, torch.Tensor] = {}
    if request.sequential:
        # o_proj's full input width bounds the kept columns (the exact count is known per layer later)
        n_in = max(adapter.head_counts(i)[0] * adapter.head_counts(i)[2] for i in counts)
        check_calibration_size(batches, n_in, request.damping)
        plans, refits = sequential_head_plan(
            model,
            batches,
            request.method,
            counts,
            request.granularity,
            request.damping,
            seed=request.seed,
            show_progress=show_progress,
        )
    else:
        plans, scores = choose_heads(
            model,
            counts,
            request.method,
            request.granularity,
            batches=batches,
            seed=request.seed,
            gradient_importance=request.gradient_importance,
            remove_total=remove_total,
            show_progress=show_progress,
            bias_items=request.bias_items,
            tokenizer=request.tokenizer,
            fairness_lambda=request.fairness_lambda,
            head_ablation=request.head_ablation,
            fairness_shortlist=request.fairness_shortlist,
        )
        check_finite_scores(scores, f"{request.method} head")
        refits = {}
        if request.reconstruct:
            columns = {i: head_columns(p.query_heads, adapter.head_counts(i)[2]) for i, p in plans.items()}
            refits = _refits(model, "attention", columns, batches, request.damping, show_progress)
    for i, p in plans.items():
        step.layers[i] = {"query_heads": p.query_heads.tolist(), "kv_heads": p.kv_heads.tolist()}
        if i in scores:
            step.layers[i]["scores"] = scores_json(scores[i])
    step.tensors = {f"refit.{i}": w for i, w in refits.items()}
    return step


def _cut_heads(model, step: Step) -> tuple[list[ParamSlice], list, dict[str, Any]]:
    plans = {
        i: HeadPlan(torch.tensor(layer["query_heads"]), torch.tensor(layer["kv_heads"]))
        for i, layer in step.layers.items()
    }
    slices = apply_head_plan(model, plans)
    if not is_meta(model):
        apply_refits(model, "attention", step.refits())
    kept = dict(
        kept_query_heads={i: layer["query_heads"] for i, layer in step.layers.items()},
        kept_kv_heads={i: layer["kv_heads"] for i, layer in step.layers.items()},
    )
    return slices, [], kept


# ---- depth -------------------------------------------------------------------------------------------
def _plan_depth(model, request: DepthRequest, batches: list | None, show_progress: bool) -> Step:
    adapter = get_adapter(model)
    count = request.count(adapter.num_layers)
    step = Step("depth", request.settings())
    if is_meta(model) and request.method not in ("last", "first", "custom"):
        step.shape_only = True
        drop = list(range(adapter.num_layers - count, adapter.num_layers))
    else:
        drop = select_layers_to_remove(
            model,
            count,
            request.method,
            layer_indices=request.layer_indices,
            batches=batches,
            metric=request.block_metric,
            gradient_importance=request.gradient_importance,
            show_progress=show_progress,
            first_start=1 if request.replace_with_linear else 0,
        )
    step.settings["removed_layers"] = drop
    if request.replace_with_linear and not step.shape_only:
        damping = 1e-3 if request.linear_damping is None else request.linear_damping
        fit = fit_linear_replacement(model, batches, drop, damping=damping, show_progress=show_progress)
        step.tensors["linear_replacement"] = fit.transform
        step.settings["linear_fit"] = dict(
            layer=fit.layer,
            damping=fit.damping,
            tokens=fit.tokens,
            relative_error=fit.relative_error,
            identity_error=fit.identity_error,
        )
    return step


def _cut_depth(model, step: Step) -> tuple[list[ParamSlice], list, dict[str, Any]]:
    adapter = get_adapter(model)
    drop = step.settings["removed_layers"]
    removed = [p for i in drop for p in adapter.layers[i].parameters()]
    remove_layers(adapter, drop)
    fields: dict[str, Any] = {"num_layers": adapter.num_layers}
    if "linear_replacement" in step.tensors and not is_meta(model):
        fit = LinearReplacement(
            removed=drop, transform=step.tensors["linear_replacement"], **step.settings["linear_fit"]
        )
        fold_linear_replacement(adapter, fit)
        fields["linear_replacement"] = fit.summary(adapter)
    return [], removed, fields


def cut_optimizer(optimizer, slices: list[ParamSlice], removed: list[torch.nn.Parameter]) -> None:
    """Cut an optimizer's state like the weights, and drop the parameters of removed blocks."""
    if removed:
        drop_optimizer_parameters(optimizer, removed)
    if slices:
        slice_optimizer_state(optimizer, slices)


register_axis(Axis("depth", _plan_depth, _cut_depth, DepthRequest))
register_axis(Axis("heads", _plan_heads, _cut_heads, HeadRequest))
register_axis(Axis("mlp", _plan_mlp, _cut_mlp, MLPWidthRequest))
