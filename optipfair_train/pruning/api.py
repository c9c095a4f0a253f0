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
from .heads import apply_head_plan, head_columns, head_keep_counts, plan_attention_heads
from .hidden_refit import prune_hidden
from .io import record_pruning_event
from .reconstruction import DEFAULT_DAMPING, apply_refits, check_calibration_size, collect_grams, plan_refits
from .sequential import sequential_head_plan, sequential_mlp_plan
from .surgery import drop_optimizer_parameters, remove_layers, slice_optimizer_state
from .targets import layers_to_remove_count
from .taylor import TaylorImportance
from .width import apply_width_plan, mlp_width_targets, plan_mlp_width

logger = logging.getLogger(__name__)

__all__ = ["PRUNING_TYPES", "prune_model"]

PRUNING_TYPES = ("MLP_GLU", "MLP", "ATTENTION", "DEPTH", "HIDDEN")
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


def _check_model(model: torch.nn.Module) -> None:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "Cannot prune a quantized model: load it in float32/bfloat16 (for a GGUF, drop the "
            "quantizer flags after loading; see optipfair_train.models)."
        )
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("Cannot prune a model with weights on the meta device: load real weights first.")


def _check_reconstruct(
    pruning_type: str, reconstruct: bool, damping: float, sequential: bool, batches: list | None
) -> None:
    if not isinstance(reconstruct, bool) or not isinstance(sequential, bool):
        raise ValueError(
            f"reconstruct and sequential must be True or False, got {reconstruct!r}, {sequential!r}."
        )
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or damping < 0:
        raise ValueError(f"damping must be a number >= 0 (default {DEFAULT_DAMPING}), got {damping!r}.")
    if sequential and not reconstruct:
        raise ValueError("sequential=True applies to the refit: pass reconstruct=True as well.")
    if not reconstruct:
        return
    if pruning_type == "DEPTH":
        raise ValueError(
            "reconstruct=True refits down_proj after MLP_GLU/MLP pruning, o_proj after ATTENTION "
            "pruning or the stream's readers after HIDDEN pruning; DEPTH removes whole blocks and has "
            "nothing to refit."
        )
    if batches is None:
        raise ValueError(
            "reconstruct=True needs calibration data: pass dataloader= (batches of dicts with "
            "input_ids and attention_mask) or use reconstruct=False."
        )


def _plan_refits(
    model: torch.nn.Module, kind: str, columns: dict, batches: list, damping: float, show_progress: bool
) -> dict[int, torch.Tensor]:
    """Refit weights for every layer of ``columns`` (kept input indices), before any weight changes."""
    tokens = check_calibration_size(batches, max(len(c) for c in columns.values()), damping)
    grams = collect_grams(model, batches, kind, columns.keys(), show_progress=show_progress)
    logger.info("Refitting %d %s layers on %d calibration tokens", len(columns), kind, tokens)
    return plan_refits(model, kind, columns, grams, damping)


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
            for ``ATTENTION``: ``L2``, ``activation``, ``taylor``, ``random``).
            Default: ``hybrid`` when a ``dataloader`` is given (``activation`` with ``sequential``), else
            ``MAW`` (weight-only scores lose much more quality; a warning says so). Measured on the demo
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
            reload with :func:`load_pruned_model`.
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
    vocab_size = adapter.model.get_input_embeddings().num_embeddings
    batches = as_batches(dataloader, vocab_size) if dataloader is not None else None
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
    _check_reconstruct(pruning_type, reconstruct, damping, sequential, batches)
    original = count_parameters(model)
    event: dict[str, Any] = {"pruning_type": pruning_type, "parameters_before": original}

    if pruning_type in ("MLP_GLU", "MLP"):
        if pruning_type == "MLP_GLU" and not adapter.family.is_glu:
            raise ValueError(
                f"{adapter.family.name} has a plain (non-GLU) MLP: use pruning_type='MLP', which prunes "
                "fc1 rows and fc2 columns with the same scorers."
            )
        # hybrid measured best on the demo model (bench/bench_oneshot.py); sequential calibration
        # scores from per-layer activation sums only, so it keeps activation there
        data_default = "activation" if sequential else "hybrid"
        method = neuron_selection_method or (data_default if batches is not None else "MAW")
        if neuron_selection_method is None and batches is None:
            logger.warning(
                "Pruning with weight-only MAW scores because no dataloader was given; on real "
                "models this loses far more quality than neuron_selection_method='hybrid' "
                "with a few calibration batches."
            )
        if pruning_percentage is None and expansion_rate is None and target_parameters is None:
            pruning_percentage = 10
        width_request = dict(
            pruning_percentage=pruning_percentage,
            expansion_rate=expansion_rate,
            expansion_divisor=expansion_divisor,
            target_parameters=target_parameters,
            layer_indices=layer_indices,
        )
        if sequential:
            # global widths come from one non-sequential scoring pass; the sequential pass then
            # re-scores and refits each layer at that width on its pruned-prefix inputs
            if layer_allocation not in ("uniform", "global"):
                raise ValueError(f"layer_allocation must be 'uniform' or 'global', got {layer_allocation!r}.")
            targets = mlp_width_targets(model, **width_request)
            if layer_allocation == "global":
                first = plan_mlp_width(
                    model,
                    method=method,
                    batches=batches,
                    layer_allocation="global",
                    seed=seed,
                    **width_request,
                )
                targets = {i: len(k) for i, k in first.items()}
            check_calibration_size(batches, max(targets.values()), damping)
            plan, refits = sequential_mlp_plan(
                model,
                batches,
                method,
                targets,
                damping,
                seed=seed,
                fairness_weight=fairness_weight,
                show_progress=show_progress,
            )
        else:
            plan = plan_mlp_width(
                model,
                method=method,
                batches=batches,
                layer_allocation=layer_allocation,
                seed=seed,
                gradient_importance=gradient_importance,
                bias_pairs=bias_pairs,
                tokenizer=tokenizer,
                fairness_weight=fairness_weight,
                show_progress=show_progress,
                **width_request,
            )
            refits = _plan_refits(model, "mlp", plan, batches, damping, show_progress) if reconstruct else {}
        slices = apply_width_plan(model, plan)
        apply_refits(model, "mlp", refits)
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
        percentage = pruning_percentage if pruning_percentage is not None else 25
        if sequential:
            counts = head_keep_counts(model, percentage, head_granularity, layer_indices)
            # o_proj's full input width bounds the kept columns (the exact count is known per layer later)
            n_in = max(adapter.head_counts(i)[0] * adapter.head_counts(i)[2] for i in counts)
            check_calibration_size(batches, n_in, damping)
            plan, refits = sequential_head_plan(
                model,
                batches,
                method,
                counts,
                head_granularity,
                damping,
                seed=seed,
                show_progress=show_progress,
            )
        else:
            plan = plan_attention_heads(
                model,
                pruning_percentage=percentage,
                method=method,
                granularity=head_granularity,
                batches=batches,
                layer_indices=layer_indices,
                seed=seed,
                gradient_importance=gradient_importance,
                show_progress=show_progress,
            )
            refits = {}
            if reconstruct:
                columns = {i: head_columns(p.query_heads, adapter.head_counts(i)[2]) for i, p in plan.items()}
                refits = _plan_refits(model, "attention", columns, batches, damping, show_progress)
        slices = apply_head_plan(model, plan)
        apply_refits(model, "attention", refits)
        event.update(
            method=method,
            pruning_percentage=pruning_percentage,
            head_granularity=head_granularity,
            kept_query_heads={i: p.query_heads.tolist() for i, p in plan.items()},
            kept_kv_heads={i: p.kv_heads.tolist() for i, p in plan.items()},
        )
    elif pruning_type == "HIDDEN":
        if layer_indices is not None:
            raise ValueError("HIDDEN cuts residual channels in every block; layer_indices does not apply.")
        if sequential:
            raise ValueError("sequential=True is not available for HIDDEN; its refit is one-shot.")
        hidden, slices = prune_hidden(
            model,
            batches,
            pruning_percentage=10 if pruning_percentage is None else pruning_percentage,
            divisor=expansion_divisor,
            method=neuron_selection_method,
            damping=damping if reconstruct else None,
            show_progress=show_progress,
        )
        method = hidden.method
        event.update(hidden.summary(), pruning_percentage=pruning_percentage)
    else:
        method = layer_selection_method or (
            "custom"
            if layer_indices
            else "contiguous"
            if replace_with_linear
            else "importance"
            if batches is not None
            else "last"
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

    if reconstruct:
        event.update(reconstruct=True, damping=damping, sequential=sequential)
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
