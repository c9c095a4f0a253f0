"""Cutting the residual channels of a model, block by block and outside the blocks (see :mod:`.hidden`).

:func:`~optipfair_train.pruning.hidden.apply_hidden` checks a plan and calls both;
:mod:`.streamed_hidden` calls :func:`cut_hidden_block` on each block as it is read from a checkpoint and
:func:`cut_hidden_outside_blocks` last. Why the norms are rescaled and the epsilon grows: the
:mod:`.hidden` module docstring.

Example:
    >>> for i in range(adapter.num_layers):  # doctest: +SKIP
    ...     cut_hidden_block(adapter, i, keep)
    >>> cut_hidden_outside_blocks(adapter, keep)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import ModelAdapter, rms_norm_eps, set_embedding_scale, set_rms_norm_eps
from .surgery import ParamSlice, _slice_param, slice_linear

__all__ = ["cut_hidden_block", "cut_hidden_outside_blocks"]


def _rescale_norm(norm: nn.Module, keep: torch.Tensor, factor: float, plus_one: bool) -> list[ParamSlice]:
    """Keep ``keep`` of an RMSNorm and multiply its effective scale (``w`` or ``1 + w``) by ``factor``."""
    slices = [_slice_param(norm.weight, 0, keep)]
    with torch.no_grad():
        if plus_one:
            norm.weight.add_(1).mul_(factor).sub_(1)
        else:
            norm.weight.mul_(factor)
    return slices


def _scale_outputs(linear: nn.Module, factor: float) -> None:
    """Multiply a projection's outputs by ``factor``: base weight, bias and every LoRA ``B`` (and bias)."""
    with torch.no_grad():
        for module in [getattr(linear, "base_layer", linear), *getattr(linear, "lora_B", {}).values()]:
            module.weight.mul_(factor)
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(factor)


def cut_hidden_block(adapter: ModelAdapter, i: int, keep: torch.Tensor) -> list[ParamSlice]:
    """Cut block ``i`` to the residual channels ``keep`` (sorted; checked by the caller): the input
    columns of q/k/v/gate/up, the output rows of o_proj/down_proj, its norms rescaled. The config still
    gives the old hidden size, so blocks can be cut one at a time (:mod:`.streamed_hidden`) before
    :func:`cut_hidden_outside_blocks` finishes.

    Example:
        >>> cut_hidden_block(get_adapter(model), 0, torch.arange(56))  # doctest: +SKIP
    """
    family = adapter.family
    factor = math.sqrt(adapter.hidden_size / len(keep))
    attention, mlp = adapter.attention(i), adapter.mlp(i)
    slices = []
    for linear in (attention.q, attention.k, attention.v, mlp.gate, mlp.up):
        if linear is not None:
            slices += slice_linear(linear, keep, dim=1)
    for linear in (attention.o, mlp.down):
        slices += slice_linear(linear, keep, dim=0)
    if family.qk_norm:  # their per-head norms get eps * d / d_new from the shared config value
        for linear in (attention.q, attention.k):
            _scale_outputs(linear, factor)
    residual, output = adapter.block_norms(i)
    for norm in residual + output:
        slices += _rescale_norm(norm, keep, factor, family.norm_plus_one)
    return slices


def cut_hidden_outside_blocks(adapter: ModelAdapter, keep: torch.Tensor) -> list[ParamSlice]:
    """Cut the embedding, the LM head (tied or not) and the final norm to ``keep``, then set the norms'
    epsilon, ``head_dim`` and ``hidden_size`` in the config: the last step of :func:`apply_hidden`.

    Example:
        >>> cut_hidden_outside_blocks(get_adapter(model), torch.arange(56))  # doctest: +SKIP
    """
    inner, family = adapter.model, adapter.family
    d, d_new = adapter.hidden_size, len(keep)
    factor = math.sqrt(d / d_new)
    embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    tied = head is not None and getattr(head, "base_layer", head).weight is embedding.weight
    head_dims = {adapter.head_counts(i)[2] for i in range(adapter.num_layers)}
    eps = rms_norm_eps(inner)

    slices = [_slice_param(embedding.weight, 1, keep)]
    embedding.embedding_dim = d_new
    embedding_factor = 1.0
    if family.scaled_embedding:  # a reload multiplies by sqrt(d_new): fold sqrt(d / d_new) into the rows
        embedding_factor = factor
        with torch.no_grad():
            embedding.weight.mul_(factor)
        set_embedding_scale(embedding, math.sqrt(d_new))
    if head is not None and not tied:
        slices += slice_linear(head, keep, dim=1)
    elif tied:
        getattr(head, "base_layer", head).in_features = d_new
    # a tied head was scaled with Gemma's embedding: the final norm takes that factor back
    final_factor = factor / embedding_factor if tied else factor
    slices += _rescale_norm(adapter.final_norm(), keep, final_factor, family.norm_plus_one)

    set_rms_norm_eps(inner, eps * d / d_new)
    config = adapter.config
    (config.head_dim,) = head_dims  # explicit: hidden_size / num_heads no longer gives it
    config.hidden_size = d_new
    for module in inner.modules():  # e.g. LlamaMLP.hidden_size, kept in step with the config
        if getattr(module, "hidden_size", None) == d and not isinstance(module, nn.Embedding):
            module.hidden_size = d_new
    return slices
