"""``prune_model``: the one-shot pruning entry point, with OptiPFair's names.

It builds one typed request (:mod:`.requests`), plans it (:func:`~.plan.plan`: everything validated and
data-driven scores computed before the first weight changes, so bad input never leaves a half-pruned
model behind) and applies the plan (:func:`~.apply.apply`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..analysis import count_parameters
from ..names import DEFAULT_DAMPING, PRUNING_TYPES
from .apply import apply
from .axes import is_meta
from .fair_heads import DEFAULT_FAIRNESS_LAMBDA, HeadAblation
from .hidden_axis import HiddenRequest
from .plan import plan
from .refit_options import check_refit_target
from .requests import DepthRequest, HeadRequest, MLPWidthRequest, Request
from .taylor import TaylorImportance

logger = logging.getLogger(__name__)

__all__ = ["PRUNING_TYPES", "prune_model", "pruning_request", "pruning_stats"]

_WIDTH_ARGUMENTS = (
    "neuron_selection_method",
    "pruning_percentage",
    "expansion_rate",
    "expansion_divisor",
    "target_parameters",
)
_ARGUMENTS = {
    "MLP_GLU": _WIDTH_ARGUMENTS,
    "MLP": _WIDTH_ARGUMENTS,
    "ATTENTION": ("neuron_selection_method", "pruning_percentage"),
    "HIDDEN": ("neuron_selection_method", "pruning_percentage", "expansion_divisor"),
    "DEPTH": (
        "num_layers_to_remove",
        "depth_pruning_percentage",
        "layer_selection_method",
        "replace_with_linear",
        "linear_damping",
    ),
}


def pruning_request(
    pruning_type: str,
    *,
    remove: int | None = None,
    calibrated: bool = False,
    neuron_selection_method: str | None = None,
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
    target_parameters: int | None = None,
    layer_allocation: str = "uniform",
    head_granularity: str = "group",
    num_layers_to_remove: int | None = None,
    layer_indices: Sequence[int] | None = None,
    depth_pruning_percentage: float | None = None,
    layer_selection_method: str | None = None,
    replace_with_linear: bool | None = None,
    linear_damping: float | None = None,
    block_metric: str = "cosine",
    gradient_importance: TaylorImportance | None = None,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    fairness_weight: float = 0.2,
    bias_items: Sequence[Any] | None = None,
    fairness_lambda: float = DEFAULT_FAIRNESS_LAMBDA,
    head_ablation: HeadAblation | None = None,
    fairness_shortlist: int | None = None,
    seed: int = 0,
    reconstruct: bool = False,
    damping: float = DEFAULT_DAMPING,
    sequential: bool = False,
) -> Request:
    """The typed request for ``prune_model``'s arguments (OptiPFair's names); ``remove`` is a unit count
    (neurons per layer, KV groups / query heads per group, or blocks) instead of a percentage.

    Example:
        >>> pruning_request("ATTENTION", remove=1, neuron_selection_method="L2").granularity
        'group'
    """
    if pruning_type not in PRUNING_TYPES:
        raise ValueError(
            f"Unsupported pruning_type {pruning_type!r}; choose one of {', '.join(PRUNING_TYPES)}."
        )
    given = {
        "neuron_selection_method": neuron_selection_method,
        "pruning_percentage": pruning_percentage,
        "expansion_rate": expansion_rate,
        "expansion_divisor": expansion_divisor,
        "target_parameters": target_parameters,
        "num_layers_to_remove": num_layers_to_remove,
        "depth_pruning_percentage": depth_pruning_percentage,
        "layer_selection_method": layer_selection_method,
        "replace_with_linear": replace_with_linear,
        "linear_damping": linear_damping,
    }
    misplaced = [k for k, v in given.items() if v is not None and k not in _ARGUMENTS[pruning_type]]
    if misplaced:
        raise ValueError(
            f"{', '.join(misplaced)} do(es) not apply to pruning_type={pruning_type!r}; it accepts "
            f"{', '.join(_ARGUMENTS[pruning_type])}."
        )
    refit = dict(reconstruct=reconstruct, damping=damping, sequential=sequential)
    common = dict(calibrated=calibrated, gradient_importance=gradient_importance)
    if pruning_type == "DEPTH":
        check_refit_target(reconstruct, sequential, refits=False)
        return DepthRequest(
            remove=num_layers_to_remove if remove is None else remove,
            depth_pruning_percentage=depth_pruning_percentage,
            layer_indices=layer_indices,
            method=layer_selection_method,
            replace_with_linear=bool(replace_with_linear),
            linear_damping=linear_damping,
            block_metric=block_metric,
            **common,
        )
    if pruning_type == "HIDDEN":
        if layer_indices is not None:
            raise ValueError("HIDDEN cuts residual channels in every block; layer_indices does not apply.")
        return HiddenRequest(
            remove=remove,
            pruning_percentage=pruning_percentage,
            divisor=expansion_divisor,
            method=neuron_selection_method,
            calibrated=calibrated,
            **refit,
        )
    if pruning_type == "ATTENTION":
        return HeadRequest(
            remove=remove,
            pruning_percentage=pruning_percentage,
            method=neuron_selection_method,
            granularity=head_granularity,
            layer_indices=layer_indices,
            layer_allocation=layer_allocation,
            bias_items=bias_items,
            tokenizer=tokenizer,
            fairness_lambda=fairness_lambda,
            head_ablation=head_ablation,
            fairness_shortlist=fairness_shortlist,
            seed=seed,
            **refit,
            **common,
        )
    return MLPWidthRequest(
        remove=remove,
        pruning_percentage=pruning_percentage,
        expansion_rate=expansion_rate,
        expansion_divisor=expansion_divisor,
        target_parameters=target_parameters,
        method=neuron_selection_method,
        layer_indices=layer_indices,
        layer_allocation=layer_allocation,
        bias_pairs=bias_pairs,
        tokenizer=tokenizer,
        fairness_weight=fairness_weight,
        seed=seed,
        glu_only=pruning_type == "MLP_GLU",
        **refit,
        **common,
    )


def prune_model(
    model: torch.nn.Module,
    pruning_type: str = "MLP_GLU",
    neuron_selection_method: str | None = None,
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
    dataloader: Iterable | None = None,
    show_progress: bool = True,
    return_stats: bool = False,
    *,
    target_parameters: int | None = None,
    layer_allocation: str = "uniform",
    head_granularity: str = "group",
    num_layers_to_remove: int | None = None,
    layer_indices: Sequence[int] | None = None,
    depth_pruning_percentage: float | None = None,
    layer_selection_method: str | None = None,
    replace_with_linear: bool | None = None,
    linear_damping: float | None = None,
    block_metric: str = "cosine",
    gradient_importance: TaylorImportance | None = None,
    bias_pairs: Sequence[Sequence[str]] | None = None,
    tokenizer=None,
    fairness_weight: float = 0.2,
    bias_items: Sequence[Any] | None = None,
    fairness_lambda: float = DEFAULT_FAIRNESS_LAMBDA,
    head_ablation: HeadAblation | None = None,
    fairness_shortlist: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    reconstruct: bool = False,
    damping: float = DEFAULT_DAMPING,
    sequential: bool = False,
) -> torch.nn.Module | tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place and return it (with statistics when ``return_stats``).

    Args:
        pruning_type: ``"MLP_GLU"`` (GLU MLP width, OptiPFair's name), ``"MLP"`` (MLP width of any
            family, GLU or plain fc1/fc2), ``"ATTENTION"`` (attention heads, GQA-aware),
            ``"DEPTH"`` (whole blocks) or ``"HIDDEN"`` (residual channels of the whole model, RMSNorm
            families; methods ``activation``, ``activation_l2``, ``L2``, ``pca``; ``expansion_divisor``
            rounds the kept width, default the head count; see :mod:`~optipfair_train.pruning.hidden`).
        neuron_selection_method: scorer name (``MAW``/``PPM``, ``VOW``, ``PON``, ``L2``, ``random``,
            ``activation``, ``hybrid``, ``fluctuation``, ``reconstruction``, ``taylor``, ``fairness``;
            for ``ATTENTION``: ``L2``, ``activation``, ``taylor``, ``random``, ``fairness``).
            Default (:func:`~optipfair_train.pruning.requests.default_method`): ``taylor`` with
            ``gradient_importance``, else ``hybrid`` when a ``dataloader`` is given (``activation`` with
            ``sequential``; ``activation`` for heads), else ``MAW`` (``L2`` for heads; weight-only scores
            lose much more quality; a warning says so). Measured on the demo
            model at MLP -20% / -30%: ``hybrid`` 45.3 / 57.3 perplexity, ``activation`` 48.2 / 72.1
            (unpruned 32.0; docs/benchmarks/oneshot.md).
        pruning_percentage: share of neurons to remove per layer (0-100, exclusive). Default 10 when
            no other width target is given. For ``ATTENTION``: share of KV groups (or of the query heads
            in each group) to remove, default 25.
        expansion_rate: target intermediate size as a percentage of the hidden size.
        expansion_divisor: round the kept width down to a multiple of this.
        dataloader: calibration batches (dicts with ``input_ids`` and ``attention_mask``).
        target_parameters: prune MLP width uniformly until the model has at most this many parameters.
        layer_allocation: ``"uniform"`` (same width everywhere), ``"global"`` (per-layer widths from a
            global ranking of normalised scores) or ``"sensitivity"`` (per-layer widths from each layer's
            measured output error at the uniform cut; needs a ``dataloader``). Non-uniform widths
            reload with :func:`load_pruned_model`. For ``ATTENTION``: ``"uniform"`` or ``"global"``
            (``pruning_percentage`` of all the chosen layers' units, or ``remove`` x layers, removed where
            the scores are lowest; one unit stays per layer).
        head_granularity: ``"group"`` (remove whole KV groups) or ``"query"`` (query heads inside groups).
        layer_indices: for ``MLP_GLU``/``MLP`` and ``ATTENTION``, the layers to prune (default all); for ``DEPTH`` with
            ``layer_selection_method="custom"``, the blocks to remove.
        num_layers_to_remove / depth_pruning_percentage: how many blocks ``DEPTH`` removes.
        layer_selection_method: ``importance`` (default with a dataloader), ``contiguous``, ``last``
            (default without), ``first`` or ``custom``.
        replace_with_linear: for ``DEPTH``: replace the removed run of consecutive blocks by a linear map
            fitted on ``dataloader`` and folded into the previous block's MLP output projection (the model
            stays a plain model of its family). Selection defaults to ``contiguous`` (runs from block 1 on);
            see :mod:`optipfair_train.pruning.depth_replace`.
        linear_damping: ridge damping of that map toward the identity, relative to the mean
            activation energy (default 1e-3; 0 is plain least squares).
        block_metric: ``cosine`` or ``angular`` distance for block influence.
        gradient_importance: Taylor scores accumulated from gradients a training loop already computed
            (:class:`~optipfair_train.pruning.taylor.TaylorImportance`), used by the ``taylor`` method
            instead of computing gradients on ``dataloader``.
        bias_pairs / tokenizer / fairness_weight: for ``neuron_selection_method="fairness"``: prompt pairs
            that differ in a demographic term, the tokenizer, and the weight of the bias gap against
            quality (0 = quality only, 1 = bias only; see :mod:`optipfair_train.pruning.fairness`).
        bias_items / fairness_lambda: for ``ATTENTION`` with ``neuron_selection_method="fairness"``:
            StereoSet items to score each head's removal on (the build half of
            :func:`~optipfair_train.bias.split_items`, never the items you evaluate on) and the weight of
            the LM cost against the bias reduction (>= 0; see :mod:`optipfair_train.pruning.fair_heads`).
        head_ablation: for that method, effects already measured with
            :func:`~optipfair_train.pruning.fair_heads.head_ablation_effects` on this model (instead of
            ``bias_items``), so several cuts share one measurement.
        fairness_shortlist: for that method, ablate exactly only this many heads, those a first-order
            estimate (one backward pass per batch) ranks first; the others keep the estimate. None: all.
        optimizer: an optimizer (or Accelerate's wrapper) holding the model's parameters, e.g.
            ``trainer.optimizer`` during training: its state is cut exactly like the weights (and the
            parameters of removed blocks leave it), then every state tensor's shape is checked.
        seed: for the ``random`` scorer.
        reconstruct: after ``MLP_GLU``/``MLP`` (or ``ATTENTION``) pruning, refit the kept columns of
            ``down_proj`` (or ``o_proj``) by ridge least squares so each layer reproduces its unpruned
            output on the calibration tokens (:mod:`~optipfair_train.pruning.reconstruction`); after
            ``HIDDEN``, refit q/k/v/gate/up (and an untied head) to the pruned stream
            (:mod:`~optipfair_train.pruning.hidden_refit`); needs ``dataloader``.
        damping: ridge strength of the refit, relative to the mean diagonal of the kept inputs' Gram.
        sequential: with ``reconstruct``, take layer ``l``'s statistics on the inputs produced by the
            already pruned and refit layers ``0..l-1`` (:mod:`~optipfair_train.pruning.sequential`).
            Weight-only and ``activation`` scorers only (not ``taylor``/``fairness``); with
            ``layer_allocation="global"`` the per-layer widths come from one non-sequential scoring pass.

    Returns:
        The pruned model, or ``(model, stats)`` with ``original_parameters``, ``pruned_parameters``,
        ``reduction``, ``percentage_reduction`` and the event that was recorded (``None`` when the
        request removed nothing, e.g. a percentage smaller than one unit: nothing is recorded then).

    Example:
        >>> model, stats = prune_model(model, pruning_percentage=20, dataloader=batches,
        ...                            return_stats=True)  # doctest: +SKIP
        >>> stats["percentage_reduction"]  # doctest: +SKIP
    """
    if is_meta(model):
        raise ValueError("Cannot prune a model with weights on the meta device: load real weights first.")
    request = pruning_request(
        pruning_type,
        calibrated=dataloader is not None,
        neuron_selection_method=neuron_selection_method,
        pruning_percentage=pruning_percentage,
        expansion_rate=expansion_rate,
        expansion_divisor=expansion_divisor,
        target_parameters=target_parameters,
        layer_allocation=layer_allocation,
        head_granularity=head_granularity,
        num_layers_to_remove=num_layers_to_remove,
        layer_indices=layer_indices,
        depth_pruning_percentage=depth_pruning_percentage,
        layer_selection_method=layer_selection_method,
        replace_with_linear=replace_with_linear,
        linear_damping=linear_damping,
        block_metric=block_metric,
        gradient_importance=gradient_importance,
        bias_pairs=bias_pairs,
        tokenizer=tokenizer,
        fairness_weight=fairness_weight,
        bias_items=bias_items,
        fairness_lambda=fairness_lambda,
        head_ablation=head_ablation,
        fairness_shortlist=fairness_shortlist,
        seed=seed,
        reconstruct=reconstruct,
        damping=damping,
        sequential=sequential,
    )
    planned = plan(model, request, dataloader, show_progress=show_progress)
    events = apply(model, planned, optimizer=optimizer)
    if not return_stats:
        return model
    return model, pruning_stats(planned.parameters_before, model, events)


def pruning_stats(original: int, model: torch.nn.Module, events: list[dict[str, Any]]) -> dict[str, Any]:
    """``prune_model``'s statistics: parameters before/after, reduction, and the last event recorded
    (None when nothing was removed).

    Example:
        >>> pruning_stats(100, torch.nn.Linear(3, 2), [])["reduction"]
        92
    """
    pruned = count_parameters(model)
    return {
        "original_parameters": original,
        "pruned_parameters": pruned,
        "reduction": original - pruned,
        "percentage_reduction": 100.0 * (original - pruned) / original,
        "event": events[-1] if events else None,
    }
