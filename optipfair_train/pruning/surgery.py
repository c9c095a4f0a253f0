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

from ..arch import MLPParts, ModelAdapter

__all__ = ["ParamSlice", "slice_linear", "prune_mlp_neurons", "remove_layers", "record_mlp_sizes"]


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
    """Keep the output rows (``dim=0``, with the bias) or input columns (``dim=1``) ``index`` of a Linear."""
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (outputs) or 1 (inputs), got {dim}")
    slices = [_slice_param(linear.weight, dim, index)]
    if dim == 0:
        if getattr(linear, "bias", None) is not None:
            slices.append(_slice_param(linear.bias, 0, index))
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)
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
    return kept


def record_mlp_sizes(adapter: ModelAdapter) -> None:
    """Write the model's real MLP widths into its config, so a save describes what it holds.

    Uniform widths go to ``intermediate_size`` (plain ``from_pretrained`` then rebuilds the model);
    per-layer widths also go to ``layer_intermediate_sizes``, which ``load_pruned_model`` reads.
    """
    sizes = adapter.intermediate_sizes()
    config = adapter.config
    config.intermediate_size = max(sizes)
    if len(set(sizes)) > 1:
        config.layer_intermediate_sizes = sizes
    elif hasattr(config, "layer_intermediate_sizes"):
        del config.layer_intermediate_sizes
