"""Structural surgery: slicing Linears and removing blocks, in place.

This is the one module that changes shapes; the one-shot API, the callbacks and the pipeline all
call it. Parameters are sliced *in place* (``param.data = param.data.index_select(...)``) so the same
``nn.Parameter`` objects survive: an optimizer that holds them keeps stepping the pruned weights.
Every slice is returned as a :class:`ParamSlice` so optimizer state can be sliced the same way.

Example:
    >>> lin = torch.nn.Linear(4, 3)
    >>> slices = slice_linear(lin, torch.tensor([0, 2]), dim=0)
    >>> lin.weight.shape, lin.out_features, slices[0].dim
    (torch.Size([2, 4]), 2, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import MLPParts, ModelAdapter, is_conv1d

__all__ = [
    "ParamSlice",
    "slice_linear",
    "prune_mlp_neurons",
    "remove_layers",
    "record_mlp_sizes",
    "slice_optimizer_state",
    "check_optimizer_state",
    "drop_optimizer_parameters",
    "record_attention_sizes",
]


@dataclass
class ParamSlice:
    """``param`` kept only ``index`` along ``dim`` (to replay the same cut on optimizer state)."""

    param: nn.Parameter
    dim: int
    index: torch.Tensor


def _slice_param(param: nn.Parameter, dim: int, index: torch.Tensor) -> ParamSlice:
    index = index.to(param.device)
    param.data = param.data.index_select(dim, index).contiguous()
    param.grad = None  # a gradient of the old shape would be wrong either way
    return ParamSlice(param, dim, index)


def slice_linear(linear: nn.Module, index: torch.Tensor, dim: int) -> list[ParamSlice]:
    """Keep the outputs (``dim=0``, with the bias) or inputs (``dim=1``) ``index`` of a projection.

    ``dim`` is logical: GPT-2's ``Conv1D`` stores its weight ``[in, out]`` and is cut accordingly.
    A PEFT LoRA layer is sliced consistently without merging: the base layer, and ``lora_B`` rows
    (outputs) or ``lora_A`` columns (inputs) of every adapter, so that merging afterwards gives the
    same weights as slicing the merged layer.
    """
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (outputs) or 1 (inputs), got {dim}")
    base = getattr(linear, "base_layer", None)
    if base is None:
        slices = [_slice_param(linear.weight, 1 - dim if is_conv1d(linear) else dim, index)]
        if dim == 0 and getattr(linear, "bias", None) is not None:
            slices.append(_slice_param(linear.bias, 0, index))
    else:
        if any(getattr(linear, "use_dora", {}).values()):
            raise ValueError("Cannot slice a DoRA layer exactly (its column norms change): merge it first.")
        slices = slice_linear(base, index, dim)
        lora = linear.lora_B if dim == 0 else linear.lora_A
        for adapter_linear in lora.values():
            slices.append(_slice_param(adapter_linear.weight, dim, index))
            if dim == 0 and getattr(adapter_linear, "bias", None) is not None:
                slices.append(_slice_param(adapter_linear.bias, 0, index))
    attribute = {(False, 0): "out_features", (False, 1): "in_features", (True, 0): "nf", (True, 1): "nx"}
    setattr(linear, attribute[(base is None and is_conv1d(linear), dim)], len(index))
    return slices


def prune_mlp_neurons(parts: MLPParts, keep: torch.Tensor) -> list[ParamSlice]:
    """Keep only the intermediate neurons ``keep`` (sorted indices) of one MLP block."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    slices: list[ParamSlice] = []
    for linear in parts.width_linears:
        slices += slice_linear(linear, keep, dim=0)
    slices += slice_linear(parts.down, keep, dim=1)
    if hasattr(parts.module, "intermediate_size"):
        parts.module.intermediate_size = len(keep)
    return slices


def remove_layers(adapter: ModelAdapter, drop: list[int]) -> list[int]:
    """Remove the blocks ``drop`` and renumber what stays so generation with a KV cache keeps working.

    Updates ``layer_idx`` on every submodule that has one, ``config.num_hidden_layers`` and
    ``config.layer_types``. Returns the original indices of the kept blocks.
    """
    config = adapter.config
    drop_set = set(drop)
    kept = [i for i in range(adapter.num_layers) if i not in drop_set]
    new_layers = nn.ModuleList(adapter.layers[i] for i in kept)
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent, _, name = adapter.family.layers.rpartition(".")
    setattr(adapter.decoder, name, new_layers)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    record_mlp_sizes(adapter)
    if hasattr(config, "layer_num_attention_heads"):
        record_attention_sizes(adapter)
    return kept


def record_mlp_sizes(adapter: ModelAdapter) -> None:
    """Write the model's real MLP widths into its config, so a save describes what it holds.

    Uniform widths go to the family's width field (``intermediate_size``, ``ffn_dim``, ``n_inner``) so plain
    ``from_pretrained`` rebuilds the model; per-layer widths also go to ``layer_intermediate_sizes``,
    which ``load_pruned_model`` reads.
    """
    sizes = adapter.intermediate_sizes()
    config = adapter.config
    setattr(config, adapter.family.intermediate_key, max(sizes))
    if len(set(sizes)) > 1:
        config.layer_intermediate_sizes = sizes
    elif hasattr(config, "layer_intermediate_sizes"):
        del config.layer_intermediate_sizes


def record_attention_sizes(adapter: ModelAdapter) -> None:
    """Write the real head counts into the config.

    When every layer has the same counts and the hidden size divides by them (transformers validates
    that on load), ``num_attention_heads`` / ``num_key_value_heads`` hold them and plain
    ``from_pretrained`` rebuilds the model. Otherwise those keep their earlier (larger, valid) values and
    ``layer_num_attention_heads`` / ``layer_num_key_value_heads`` list the real ones for ``load_pruned_model``.
    """
    config = adapter.config
    geometry = [adapter.head_counts(i) for i in range(adapter.num_layers)]
    config.head_dim = geometry[0][2]  # explicit, so head_dim is not re-derived from a smaller head count
    n_q, n_kv = [g[0] for g in geometry], [g[1] for g in geometry]
    if len(set(n_q)) == 1 and len(set(n_kv)) == 1 and config.hidden_size % n_q[0] == 0:
        config.num_attention_heads, config.num_key_value_heads = n_q[0], n_kv[0]
        for name in ("layer_num_attention_heads", "layer_num_key_value_heads"):
            if hasattr(config, name):
                delattr(config, name)
    else:
        config.layer_num_attention_heads, config.layer_num_key_value_heads = n_q, n_kv


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def slice_optimizer_state(optimizer: torch.optim.Optimizer, slices: list[ParamSlice]) -> None:
    """Replay ``slices`` on the optimizer state, then check every state tensor has its parameter's shape.

    Every state tensor with the parameter's number of dimensions (Adam's ``exp_avg``, ``exp_avg_sq``,
    momentum buffers, ...) is cut like the parameter was; scalars such as ``step`` are kept. This
    matters because the default fused AdamW does not notice stale shapes: it silently uses wrong moments.

    Example:
        >>> slices = prune_mlp_neurons(parts, keep)  # doctest: +SKIP
        >>> slice_optimizer_state(trainer.optimizer, slices)  # doctest: +SKIP
    """
    state = _torch_optimizer(optimizer).state
    for cut in slices:
        param_state = state.get(cut.param)
        if not param_state:
            continue
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.dim() == cut.param.dim() and value.dim() > 0:
                param_state[key] = value.index_select(cut.dim, cut.index.to(value.device)).contiguous()
    check_optimizer_state(optimizer)


def drop_optimizer_parameters(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Remove ``params`` (e.g. those of removed blocks) and their state from the optimizer.

    Example:
        >>> drop_optimizer_parameters(trainer.optimizer, list(removed_block.parameters()))  # doctest: +SKIP
    """
    opt = _torch_optimizer(optimizer)
    gone = {id(p) for p in params}
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in params:
        opt.state.pop(p, None)
    check_optimizer_state(optimizer)


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise if any non-scalar optimizer state tensor differs in shape from its parameter."""
    opt = _torch_optimizer(optimizer)
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise RuntimeError(
                        f"Optimizer state {key!r} has shape {tuple(value.shape)} but its parameter "
                        f"has shape {tuple(param.shape)}: the state was not sliced with the model."
                    )
