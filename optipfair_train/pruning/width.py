"""MLP width pruning: score neurons, plan how many to keep per layer, then cut.

Planning (scores, targets, validation) touches no weight; only :func:`apply_width_plan` does.

Example:
    >>> plan = plan_mlp_width(model, method="MAW", pruning_percentage=20)  # doctest: +SKIP
    >>> apply_width_plan(model, plan)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..analysis import count_parameters
from ..arch import ModelAdapter, get_adapter, weight_out_in
from .calibration import CalibrationBatch, mlp_activation_sumsq, mlp_input_statistics
from .fairness import neuron_bias_gap
from .reconstruction import collect_grams
from .scorers import ScoringContext, get_scorer
from .surgery import ParamSlice, prune_mlp_neurons, record_mlp_sizes
from .targets import check_layer_indices, kept_width, width_for_parameter_budget
from .taylor import TaylorImportance, taylor_importance

logger = logging.getLogger(__name__)

__all__ = [
    "plan_mlp_width",
    "mlp_width_targets",
    "choose_neurons",
    "apply_width_plan",
    "neuron_scores",
    "layer_sensitivity",
    "LAYER_ALLOCATIONS",
    "check_layer_allocation",
    "MIN_LAYER_FRACTION",
]

LAYER_ALLOCATIONS = ("uniform", "global", "sensitivity")

# With global allocation a layer still keeps this share of its neurons: a block whose MLP is
# emptied is better removed by depth pruning, where its attention goes too.
MIN_LAYER_FRACTION = 0.1


def check_layer_allocation(layer_allocation: str, *, calibrated: bool, sequential: bool = False) -> None:
    """Refuse an unknown allocation, ``sensitivity`` without calibration data or with ``sequential``
    (the one copy of these rules).

    Example:
        >>> check_layer_allocation("global", calibrated=False)
    """
    if layer_allocation not in LAYER_ALLOCATIONS:
        raise ValueError(
            f"layer_allocation must be one of {', '.join(LAYER_ALLOCATIONS)}, got {layer_allocation!r}."
        )
    if sequential and layer_allocation == "sensitivity":
        raise ValueError("layer_allocation must be 'uniform' or 'global' with sequential=True.")
    if layer_allocation == "sensitivity" and not calibrated:
        raise ValueError("layer_allocation='sensitivity' measures output errors: pass calibration batches.")


def neuron_scores(
    model: torch.nn.Module,
    method: str,
    *,
    batches: list[CalibrationBatch] | None = None,
    layer_indices: Sequence[int] | None = None,
    seed: int = 0,
    gradient_importance: TaylorImportance | None = None,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    fairness_weight: float = 0.2,
    adapter: ModelAdapter | None = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Importance of every intermediate neuron of the chosen layers, keyed by layer index.

    Data-driven scorers get their statistics from ``batches``; ``taylor`` may instead read gradients a
    training loop already accumulated (``gradient_importance``); ``fairness`` reads ``bias_pairs``
    (tokenized with ``tokenizer``) and, when given, ``batches`` for its quality term.

    Example:
        >>> scores = neuron_scores(model, "MAW")  # doctest: +SKIP
        >>> scores[0].shape  # (intermediate_size,)  # doctest: +SKIP
    """
    adapter = adapter or get_adapter(model)
    scorer = get_scorer(method)
    layers = list(range(adapter.num_layers)) if layer_indices is None else list(layer_indices)
    stats: dict[str, dict[int, torch.Tensor]] = {}
    if scorer.needs == "taylor" and gradient_importance is not None:
        stats["taylor"] = gradient_importance.neuron_scores()
        missing = [i for i in layers if i not in stats["taylor"]]
        if missing:
            raise ValueError(
                f"The gradient importance holds no MLP gradients for layers {missing} "
                "(frozen weights?); accumulate from full fine-tuning or pass calibration batches."
            )
    elif scorer.needs == "bias_gap":
        scorer.check_inputs(calibrated=batches is not None, pairs=bool(bias_pairs) and tokenizer is not None)
        stats["bias_gap"] = neuron_bias_gap(
            model, tokenizer, bias_pairs, layer_indices=layers, show_progress=show_progress
        )
        if batches is not None:
            stats["input_moments"] = mlp_input_statistics(
                model, batches, adapter=adapter, layer_indices=layers, show_progress=show_progress
            )
    elif scorer.needs is not None:
        scorer.check_inputs(calibrated=batches is not None)
        if scorer.needs == "taylor":
            stats["taylor"] = taylor_importance(model, batches, show_progress=show_progress).neuron_scores()
        elif scorer.needs == "input_moments":
            stats["input_moments"] = mlp_input_statistics(
                model, batches, adapter=adapter, layer_indices=layers, show_progress=show_progress
            )
        elif scorer.needs == "input_gram":
            stats["input_gram"] = collect_grams(model, batches, "mlp", layers, show_progress=show_progress)
        else:
            stats["activation_sumsq"] = mlp_activation_sumsq(
                model, batches, adapter=adapter, show_progress=show_progress
            )
    return {
        i: scorer(
            adapter.mlp(i),
            ScoringContext(
                i,
                seed=seed,
                fairness_weight=fairness_weight,
                **{name: values[i] for name, values in stats.items()},
            ),
        )
        for i in layers
    }


def _global_allocation(
    scores: dict[int, torch.Tensor], total_keep: int, divisor: int | None
) -> dict[int, int]:
    """Per-layer widths from a global ranking of scores normalised by each layer's mean."""
    minimum = {i: max(1, math.ceil(MIN_LAYER_FRACTION * len(s)), divisor or 1) for i, s in scores.items()}
    keep = dict(minimum)
    pool = []
    for i, s in scores.items():
        normalised = s / s.mean().clamp_min(1e-12)
        ranked = normalised.sort(descending=True).values[minimum[i] :]
        pool += [(float(v), i) for v in ranked]
    pool.sort(reverse=True)
    for _, i in pool[: max(0, total_keep - sum(minimum.values()))]:
        keep[i] += 1
    if divisor:
        keep = {i: max(divisor, (k // divisor) * divisor) for i, k in keep.items()}
    return keep


def layer_sensitivity(
    parts_by_layer: dict[int, object], grams: dict[int, torch.Tensor], kept: dict[int, torch.Tensor]
) -> dict[int, float]:
    """Relative output error of each layer's ``down_proj`` on calibration data when only ``kept`` stays.

    ``s_l = tr(W_S G_SS W_S^T) / tr(W G W^T)`` with ``W = W_down`` (``[H, I]``), ``S`` the removed
    neurons and ``G = sum_t x_t x_t^T`` of the ``down_proj`` input: the share of the MLP output energy
    over the calibration tokens that the cut removes (no refit).

    Example:
        >>> layer_sensitivity({0: adapter.mlp(0)}, {0: gram}, {0: keep})  # doctest: +SKIP
    """
    result = {}
    for i, parts in parts_by_layer.items():
        w = weight_out_in(parts.down).detach().double()
        removed = torch.ones(w.shape[1], dtype=torch.bool)
        removed[kept[i]] = False
        w_s, gram = w[:, removed], grams[i].double()
        error = ((w_s @ gram[removed][:, removed]) * w_s).sum()
        total = ((w @ gram) * w).sum().clamp_min(1e-30)
        result[i] = float(error / total)
    return result


def _sensitivity_allocation(
    sensitivity: dict[int, float], widths: dict[int, int], targets: dict[int, int], divisor: int | None
) -> dict[int, int]:
    """Per-layer widths removing ``r_l`` neurons with ``r_l`` proportional to ``1 / s_l``, same total.

    Under a quadratic error model ``e_l(r) = s_l (r / r_uniform)^2`` this equalises the marginal error
    of every layer; each layer keeps between ``MIN_LAYER_FRACTION`` of its width and all of it.
    """
    total_removed = sum(widths[i] - targets[i] for i in widths)
    floor = {i: max(1, math.ceil(MIN_LAYER_FRACTION * w), divisor or 1) for i, w in widths.items()}
    removed = dict.fromkeys(widths, 0)
    free, left = set(widths), total_removed
    while left > 0 and free:
        weights = {i: 1.0 / max(sensitivity[i], 1e-12) for i in free}
        norm = sum(weights.values())
        capped = {i for i in free if left * weights[i] / norm >= widths[i] - floor[i] - removed[i]}
        if not capped:
            share = {i: int(left * weights[i] / norm) for i in free}
            for i in sorted(free, key=lambda i: -weights[i])[: left - sum(share.values())]:
                share[i] += 1  # distribute the rounding remainder to the least sensitive layers
            for i in free:
                removed[i] += share[i]
            break
        for i in capped:
            left -= widths[i] - floor[i] - removed[i]
            removed[i] = widths[i] - floor[i]
        free -= capped
    keep = {i: widths[i] - removed[i] for i in widths}
    if divisor:
        keep = {i: max(divisor, (k // divisor) * divisor) for i, k in keep.items()}
    return keep


def mlp_width_targets(
    model: torch.nn.Module,
    *,
    remove: int | None = None,
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
    target_parameters: int | None = None,
    layer_indices: Sequence[int] | None = None,
) -> dict[int, int]:
    """Validate a width request; return how many neurons each chosen layer keeps (uniform allocation).

    ``remove`` neurons per layer, or one target: ``pruning_percentage``, ``expansion_rate`` or
    ``target_parameters``.

    Example:
        >>> mlp_width_targets(model, pruning_percentage=20)  # {layer: kept width}  # doctest: +SKIP
    """

    adapter = get_adapter(model)
    layers = check_layer_indices(layer_indices, adapter.num_layers)
    widths = {i: adapter.mlp(i).intermediate_size for i in layers}

    if remove is not None:
        too_many = [i for i, w in widths.items() if remove >= w]
        if too_many:
            i = too_many[0]
            raise ValueError(
                f"Cannot remove {remove} neurons from layer {i}, which has {widths[i]}: at least one must stay."
            )
        return {i: w - remove for i, w in widths.items()}
    if target_parameters is not None:
        if pruning_percentage is not None or expansion_rate is not None:
            raise ValueError("Give target_parameters alone, not with pruning_percentage or expansion_rate.")
        mlp = adapter.mlp(layers[0])
        per_neuron = (
            sum(weight_out_in(m).shape[1] + (m.bias is not None) for m in mlp.width_linears)
            + weight_out_in(mlp.down).shape[0]
        )
        k = width_for_parameter_budget(
            count_parameters(model), target_parameters, list(widths.values()), per_neuron, expansion_divisor
        )
        return dict.fromkeys(layers, k)
    return {
        i: kept_width(
            w,
            hidden_size=adapter.hidden_size,
            pruning_percentage=pruning_percentage,
            expansion_rate=expansion_rate,
            expansion_divisor=expansion_divisor,
        )
        for i, w in widths.items()
    }


def choose_neurons(
    model: torch.nn.Module,
    targets: dict[int, int],
    method: str,
    *,
    layer_allocation: str = "uniform",
    expansion_divisor: int | None = None,
    batches: list[CalibrationBatch] | None = None,
    show_progress: bool = False,
    **scoring,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The neurons each layer keeps (sorted indices) and the scores that decided it.

    ``targets`` are the uniform kept widths (:func:`mlp_width_targets`); ``"global"`` and
    ``"sensitivity"`` allocation redistribute their total (see :func:`plan_mlp_width`). ``scoring``:
    further :func:`neuron_scores` arguments (``seed``, ``gradient_importance``, ``bias_pairs``, ...).

    Example:
        >>> keep, scores = choose_neurons(model, {0: 96, 1: 96}, "MAW")  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    layers = list(targets)
    scores = neuron_scores(
        model,
        method,
        batches=batches,
        layer_indices=layers,
        adapter=adapter,
        show_progress=show_progress,
        **scoring,
    )
    if layer_allocation == "global":
        targets = _global_allocation(scores, sum(targets.values()), expansion_divisor)
    elif layer_allocation == "sensitivity":
        grams = collect_grams(model, batches, "mlp", layers, show_progress=show_progress)
        uniform = {i: scores[i].topk(targets[i]).indices for i in layers}
        sensitivity = layer_sensitivity({i: adapter.mlp(i) for i in layers}, grams, uniform)
        rounded = {i: round(v, 4) for i, v in sensitivity.items()}
        logger.info("Layer sensitivity at the uniform width: %s", rounded)
        widths = {i: adapter.mlp(i).intermediate_size for i in layers}
        targets = _sensitivity_allocation(sensitivity, widths, targets, expansion_divisor)
    return {i: scores[i].topk(targets[i]).indices.sort().values for i in layers}, scores


def plan_mlp_width(
    model: torch.nn.Module,
    *,
    method: str = "MAW",
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
    target_parameters: int | None = None,
    batches: list[CalibrationBatch] | None = None,
    layer_indices: Sequence[int] | None = None,
    layer_allocation: str = "uniform",
    seed: int = 0,
    gradient_importance: TaylorImportance | None = None,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    fairness_weight: float = 0.2,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Decide which neurons each layer keeps: ``{layer_idx: sorted kept indices}``.

    ``layer_allocation="uniform"`` keeps the same number in every layer (OptiPFair's behaviour);
    ``"global"`` keeps the same total but ranks neurons of all layers together after dividing each
    layer's scores by their mean, so layers that matter more keep more (never below
    ``MIN_LAYER_FRACTION`` of their width); ``"sensitivity"`` (needs ``batches``) measures each
    layer's relative ``down_proj`` output error at the uniform cut (:func:`layer_sensitivity`) and
    removes neurons in proportion to its inverse, same total (see ``_sensitivity_allocation``).

    Example:
        >>> plan = plan_mlp_width(model, method="L2", pruning_percentage=25)  # doctest: +SKIP
        >>> {i: len(idx) for i, idx in plan.items()}  # doctest: +SKIP
    """
    check_layer_allocation(layer_allocation, calibrated=batches is not None)
    get_scorer(method)  # unknown method fails here, before any forward pass
    targets = mlp_width_targets(
        model,
        pruning_percentage=pruning_percentage,
        expansion_rate=expansion_rate,
        expansion_divisor=expansion_divisor,
        target_parameters=target_parameters,
        layer_indices=layer_indices,
    )
    return choose_neurons(
        model,
        targets,
        method,
        layer_allocation=layer_allocation,
        expansion_divisor=expansion_divisor,
        batches=batches,
        show_progress=show_progress,
        seed=seed,
        gradient_importance=gradient_importance,
        bias_pairs=bias_pairs,
        tokenizer=tokenizer,
        fairness_weight=fairness_weight,
    )[0]


def apply_width_plan(model: torch.nn.Module, plan: dict[int, torch.Tensor]) -> list[ParamSlice]:
    """Cut every layer of ``plan`` down to its kept neurons and record the new widths in the config.

    Example:
        >>> slices = apply_width_plan(model, {0: torch.tensor([0, 3, 5])})  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    slices: list[ParamSlice] = []
    for i, keep in plan.items():
        slices += prune_mlp_neurons(adapter.mlp(i), keep)
    record_mlp_sizes(adapter)
    return slices
