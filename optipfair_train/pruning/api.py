"""``prune_model``: the one-shot pruning entry point, with OptiPFair's names.

Everything is validated (and data-driven scores are computed) before the first weight changes, so
bad input never leaves a half-pruned model behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter
from .calibration import as_batches
from .depth import select_layers_to_remove
from .depth_replace import fit_linear_replacement, fold_linear_replacement
from .heads import apply_head_plan, plan_attention_heads
from .io import record_pruning_event
from .surgery import drop_optimizer_parameters, remove_layers, slice_optimizer_state
from .targets import layers_to_remove_count
from .taylor import TaylorImportance
from .width import apply_width_plan, plan_mlp_width

logger = logging.getLogger(__name__)

__all__ = ["PRUNING_TYPES", "prune_model"]

PRUNING_TYPES = ("MLP_GLU", "MLP", "ATTENTION", "DEPTH")
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
    "DEPTH": (
        "num_layers_to_remove",
        "depth_pruning_percentage",
        "layer_selection_method",
        "replace_with_linear",
        "linear_damping",
    ),
}


def _check_model(model: torch.nn.Module) -> None:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "Cannot prune a quantized model: load it in float32/bfloat16 (for a GGUF, drop the "
            "quantizer flags after loading; see optipfair_train.models)."
        )
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("Cannot prune a model with weights on the meta device: load real weights first.")


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
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> torch.nn.Module | tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place and return it (with statistics when ``return_stats``).

    Args:
        pruning_type: ``"MLP_GLU"`` (GLU MLP width, OptiPFair's name), ``"MLP"`` (MLP width of any
            family, GLU or plain fc1/fc2), ``"ATTENTION"`` (attention heads, GQA-aware) or
            ``"DEPTH"`` (whole blocks).
        neuron_selection_method: scorer name (``MAW``/``PPM``, ``VOW``, ``PON``, ``L2``, ``random``,
            ``activation``, ``taylor``, ``fairness``; for ``ATTENTION``: ``L2``, ``activation``, ``taylor``, ``random``).
            Default: ``activation`` when a ``dataloader`` is given, else ``MAW``
            (weight-only scores lose much more quality; a warning says so).
        pruning_percentage: share of neurons to remove per layer (0-100, exclusive). Default 10 when
            no other width target is given. For ``ATTENTION``: share of KV groups (or of the query heads
            in each group) to remove, default 25.
        expansion_rate: target intermediate size as a percentage of the hidden size.
        expansion_divisor: round the kept width down to a multiple of this.
        dataloader: calibration batches (dicts with ``input_ids`` and ``attention_mask``).
        target_parameters: prune MLP width uniformly until the model has at most this many parameters.
        layer_allocation: ``"uniform"`` (same width everywhere) or ``"global"`` (per-layer widths from a
            global ranking of normalised scores; reload with :func:`load_pruned_model`).
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
        optimizer: an optimizer (or Accelerate's wrapper) holding the model's parameters, e.g.
            ``trainer.optimizer`` during training: its state is cut exactly like the weights (and the
            parameters of removed blocks leave it), then every state tensor's shape is checked.
        seed: for the ``random`` scorer.

    Returns:
        The pruned model, or ``(model, stats)`` with ``original_parameters``, ``pruned_parameters``,
        ``reduction``, ``percentage_reduction`` and the event that was recorded.

    Example:
        >>> model, stats = prune_model(model, pruning_percentage=20, dataloader=batches,
        ...                            return_stats=True)  # doctest: +SKIP
        >>> stats["percentage_reduction"]  # doctest: +SKIP
    """
    if pruning_type not in PRUNING_TYPES:
        raise ValueError(
            f"Unsupported pruning_type {pruning_type!r}; choose one of {', '.join(PRUNING_TYPES)}."
        )
    _check_model(model)
    adapter = get_adapter(model)
    batches = as_batches(dataloader) if dataloader is not None else None
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
    original = count_parameters(model)
    event: dict[str, Any] = {"pruning_type": pruning_type, "parameters_before": original}

    if pruning_type in ("MLP_GLU", "MLP"):
        if pruning_type == "MLP_GLU" and not adapter.family.is_glu:
            raise ValueError(
                f"{adapter.family.name} has a plain (non-GLU) MLP: use pruning_type='MLP', which prunes "
                "fc1 rows and fc2 columns with the same scorers."
            )
        method = neuron_selection_method or ("activation" if batches is not None else "MAW")
        if neuron_selection_method is None and batches is None:
            logger.warning(
                "Pruning with weight-only MAW scores because no dataloader was given; on real "
                "models this loses far more quality than neuron_selection_method='activation' "
                "with a few calibration batches."
            )
        if pruning_percentage is None and expansion_rate is None and target_parameters is None:
            pruning_percentage = 10
        plan = plan_mlp_width(
            model,
            method=method,
            pruning_percentage=pruning_percentage,
            expansion_rate=expansion_rate,
            expansion_divisor=expansion_divisor,
            target_parameters=target_parameters,
            batches=batches,
            layer_indices=layer_indices,
            layer_allocation=layer_allocation,
            seed=seed,
            gradient_importance=gradient_importance,
            bias_pairs=bias_pairs,
            tokenizer=tokenizer,
            fairness_weight=fairness_weight,
            show_progress=show_progress,
        )
        slices = apply_width_plan(model, plan)
        event.update(
            method=method,
            pruning_percentage=pruning_percentage,
            expansion_rate=expansion_rate,
            expansion_divisor=expansion_divisor,
            target_parameters=target_parameters,
            layer_allocation=layer_allocation,
            intermediate_sizes=adapter.intermediate_sizes(),
            fairness_weight=fairness_weight if method == "fairness" else None,
        )
    elif pruning_type == "ATTENTION":
        method = neuron_selection_method or ("activation" if batches is not None else "L2")
        plan = plan_attention_heads(
            model,
            pruning_percentage=pruning_percentage if pruning_percentage is not None else 25,
            method=method,
            granularity=head_granularity,
            batches=batches,
            layer_indices=layer_indices,
            seed=seed,
            gradient_importance=gradient_importance,
            show_progress=show_progress,
        )
        slices = apply_head_plan(model, plan)
        event.update(
            method=method,
            pruning_percentage=pruning_percentage,
            head_granularity=head_granularity,
            kept_query_heads={i: p.query_heads.tolist() for i, p in plan.items()},
            kept_kv_heads={i: p.kv_heads.tolist() for i, p in plan.items()},
        )
    else:
        method = layer_selection_method or (
            "custom"
            if layer_indices
            else "contiguous" if replace_with_linear else "importance" if batches is not None else "last"
        )
        if method == "last" and layer_selection_method is None:
            logger.warning(
                "Removing the last blocks because no dataloader was given; measured block "
                "importance ('importance' with a dataloader) keeps far more quality."
            )
        count = None
        if method != "custom":
            count = layers_to_remove_count(adapter.num_layers, num_layers_to_remove, depth_pruning_percentage)
        drop = select_layers_to_remove(
            model,
            count,
            method,
            layer_indices=layer_indices,
            batches=batches,
            metric=block_metric,
            gradient_importance=gradient_importance,
            show_progress=show_progress,
            first_start=1 if replace_with_linear else 0,
        )
        fit = None
        if replace_with_linear:
            damping = 1e-3 if linear_damping is None else linear_damping
            fit = fit_linear_replacement(model, batches, drop, damping=damping, show_progress=show_progress)
        removed_params = [p for i in drop for p in adapter.layers[i].parameters()]
        remove_layers(adapter, drop)
        event.update(method=method, removed_layers=drop, num_layers=adapter.num_layers)
        if fit is not None:
            fold_linear_replacement(adapter, fit)
            event["linear_replacement"] = fit.summary(adapter)

    if optimizer is not None:
        if pruning_type == "DEPTH":
            drop_optimizer_parameters(optimizer, removed_params)
        else:
            slice_optimizer_state(optimizer, slices)
    pruned = count_parameters(model)
    event["parameters_after"] = pruned
    record_pruning_event(model, event)
    logger.info("%s pruning (%s): %s -> %s parameters", pruning_type, method, f"{original:,}", f"{pruned:,}")
    if not return_stats:
        return model
    stats = {
        "original_parameters": original,
        "pruned_parameters": pruned,
        "reduction": original - pruned,
        "percentage_reduction": 100.0 * (original - pruned) / original,
        "event": event,
    }
    return model, stats
