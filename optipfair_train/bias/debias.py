"""Weight-only debiasing: estimate a bias subspace from prompt pairs and fold its removal into the weights.

**Estimate** (:func:`estimate_bias_subspace`, in :mod:`.subspace`). Each pair is two prompts that differ in
a demographic or stereotyped term (counterfactual pairs, or StereoSet stereotype / anti-stereotype
sentences). For every chosen decoder block, each prompt's residual stream (the block's output) is
mean-pooled over its tokens, the first token left out (it carries the attention-sink activations, which have
nothing to do with the prompt), and the pair's difference is kept. The subspace is spanned by the top-``k``
eigenvectors of ``sum_l G_l / trace(G_l)`` with ``G_l`` the second-moment matrix of the differences at block
``l``: the principal directions of the pair differences (SentenceDebias, Liang et al. 2020), every block
weighted alike although the stream's scale grows with depth.

**Remove** (:func:`project_out_bias`). With ``V`` the ``[k, hidden]`` orthonormal directions and
``P = I - strength * V^T V``, everything that *writes* into the residual stream is multiplied by ``P``:
with ``scope="stream"`` the token (and learned position) embedding rows, every attention output
projection and every MLP down projection, biases included. At ``strength=1`` the stream then never
carries a component along ``V``: every block's input and output has ``V h = 0`` exactly, so no later
layer can read the removed directions. With ``scope="layers"`` only the attention / MLP writes of the
blocks the subspace was estimated on are projected (embeddings untouched): a milder edit that removes
what those blocks add along ``V``.

Centering (``center=True``, off by default). The stream can instead be held at the pairs' mean
component ``V mean`` along ``V`` rather than at 0 (concept erasure in the LEACE sense: the component no
longer varies with the input, its level is kept). On the demo model it did not prevent the collapse that
some directions cause (``docs/benchmarks/debias.md``).

Why the writes and not the reads: the readers sit behind a norm (``g * h / rms(h)``), which is not
linear in ``h``, while every write is a linear map whose output can be projected exactly by
multiplying its weight. The model keeps its family, shapes and parameter count and reloads with plain
``from_pretrained``; the event is appended to ``config.debias_history``.

Tied embeddings. The LM head then reads the projected matrix: logits become ``E P (g * h / rms)``
instead of ``E (g * h / rms)``. For ``h`` without a ``V`` component both are equal only when the final
norm's weight ``g`` is uniform; in general the head also stops separating tokens along ``V`` (e.g.
"he" vs "she" along a gender direction), which is part of the edit, not a rounding effect. Its cost
is measured in ``docs/benchmarks/debias.md`` (perplexity and the pronoun prior beside the bias scores).
Models whose blocks normalise their writes (Gemma-2's post-attention / post-feed-forward norms) cannot be
projected exactly by a weight fold and are refused.

Example:
    >>> subspace = estimate_bias_subspace(model, tokenizer, pairs, k=1)  # doctest: +SKIP
    >>> record = project_out_bias(model, subspace)  # doctest: +SKIP
    >>> model.save_pretrained("debiased")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..arch import get_adapter, weight_out_in
from .pairs import load_pairs
from .subspace import (  # re-exported: the subspace is half of this module's public interface
    SCOPES,
    BiasSubspace,
    _check_layers,
    check_debias_settings,
    estimate_bias_subspace,
    pair_difference_grams,
    subspace_from_grams,
)

__all__ = [
    "BiasSubspace",
    "SCOPES",
    "check_debias_settings",
    "debias_model",
    "estimate_bias_subspace",
    "pair_difference_grams",
    "project_out_bias",
    "subspace_from_grams",
]

logger = logging.getLogger(__name__)


def _writers(model: nn.Module, layers: Sequence[int], scope: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose output is added to the residual stream."""
    adapter = get_adapter(model)
    out = [
        (f"layers.{i}.{part}", module)
        for i in layers
        for part, module in (("attention_output", adapter.attention(i).o), ("mlp_down", adapter.mlp(i).down))
    ]
    if scope == "stream":
        decoder = adapter.decoder
        out.append(("embed_tokens", adapter.model.get_input_embeddings()))
        for name in ("wpe", "embed_positions"):  # learned position embeddings (GPT-2, OPT)
            if isinstance(getattr(decoder, name, None), nn.Embedding):
                out.append((name, getattr(decoder, name)))
        if getattr(decoder, "project_in", None) is not None:
            raise ValueError(
                "OPT models with project_in (word_embed_proj_dim != hidden_size) are not supported"
            )
    return out


def _digest(directions: torch.Tensor) -> str:
    return hashlib.sha256(directions.detach().cpu().float().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def project_out_bias(
    model: nn.Module,
    subspace: BiasSubspace,
    strength: float = 1.0,
    scope: str = "stream",
    center: bool = False,
) -> dict:
    """Fold ``P = I - strength * V^T V`` into every module that writes into the residual stream (in place).

    See the module docstring for what ``scope`` projects and what tied embeddings mean. With ``center``
    (and ``scope="stream"``) the stream keeps the constant ``V mean`` along the directions instead of 0: the
    token embeddings write it once and every later write is projected, so it carries no information but the
    norms that read the stream see their usual scale. Returns the
    event appended to ``model.config.debias_history`` (so it survives ``save_pretrained``).

    Raises:
        ValueError: for a bad ``strength`` / ``scope``, a subspace of another hidden size or without
            orthonormal rows, a block index the model lacks, or an unsupported family; always before any
            weight changes.

    Example:
        >>> record = project_out_bias(model, estimate_bias_subspace(model, tokenizer, pairs))  # doctest: +SKIP
        >>> model.config.debias_history[-1]["k"]  # doctest: +SKIP
        1
    """
    adapter = get_adapter(model)
    check_debias_settings(model, k=max(1, subspace.k), strength=strength, scope=scope)
    v = subspace.directions.double()
    if v.dim() != 2 or v.shape[1] != adapter.hidden_size:
        raise ValueError(
            f"subspace directions must be [k, {adapter.hidden_size}] for this model, got {tuple(v.shape)}"
        )
    if not torch.allclose(v @ v.T, torch.eye(len(v), dtype=v.dtype), atol=1e-4):
        raise ValueError("subspace directions must be orthonormal rows (as estimate_bias_subspace returns)")
    layers = (
        list(range(adapter.num_layers))
        if scope == "stream"
        else _check_layers(subspace.layers, adapter.num_layers)
    )
    writers = _writers(model, layers, scope)
    projection = torch.eye(adapter.hidden_size, dtype=torch.float64) - strength * v.T @ v
    token_embedding = adapter.model.get_input_embeddings()
    use_mean = center and scope == "stream" and subspace.mean is not None
    offset = v @ subspace.mean.double() if use_mean else torch.zeros(len(v), dtype=torch.float64)
    keep = offset.double() @ v  # [hidden]: V^T (V mean)
    for _, module in writers:
        if isinstance(module, nn.Embedding):
            weight = module.weight  # [num, hidden]: each row is written into the stream
            new = weight.double() @ projection
            if module is token_embedding:  # the stream's constant component along V, written once
                new += strength * keep
            weight.copy_(new.to(weight.dtype))
            continue
        weight = weight_out_in(module)  # [hidden, in]: the output is written
        p = projection.to(weight.device)
        weight.copy_((p @ weight.double()).to(weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_((p @ module.bias.double()).to(module.bias.dtype))
    head = adapter.model.get_output_embeddings()
    tied = head is not None and head.weight is adapter.model.get_input_embeddings().weight
    record = {
        "method": "projection",
        "k": subspace.k,
        "layers": list(subspace.layers),
        "scope": scope,
        "strength": float(strength),
        "num_pairs": subspace.num_pairs,
        "explained": list(subspace.explained),
        "tied_head_projected": bool(tied and scope == "stream"),
        "offset": [round(float(x), 6) for x in offset],
        "modules_projected": len(writers),
        "directions_sha256": _digest(subspace.directions),
    }
    config = adapter.config
    config.debias_history = list(getattr(config, "debias_history", None) or []) + [
        json.loads(json.dumps(record))
    ]
    logger.info("projected %d bias direction(s) out of %d modules (%s)", subspace.k, len(writers), scope)
    return record


def debias_model(
    model: nn.Module,
    tokenizer,
    pairs: str | Sequence[Sequence[str]],
    *,
    method: str = "projection",
    k: int = 1,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    scope: str = "stream",
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict:
    """Check every setting, estimate the bias subspace from ``pairs`` and project it out (in place).

    ``pairs``: a list of prompt pairs, or a pair-set spec for :func:`~optipfair_train.bias.load_pairs`
    (a ``.jsonl`` / ``.json`` / ``.csv`` file, ``crows-pairs:PATH``...). Returns the recorded event.

    Raises:
        ValueError / FileNotFoundError: for a bad setting (the key named) or an empty, missing or
            malformed pair file (the file named), before any weight changes.

    Example:
        >>> debias_model(model, tokenizer, "gender_pairs.jsonl", k=1)["k"]  # doctest: +SKIP
        1
    """
    check_debias_settings(model, k=k, strength=strength, scope=scope, method=method)
    _check_layers(layers, get_adapter(model).num_layers)
    if isinstance(pairs, str):
        pairs = load_pairs(pairs)
    subspace = estimate_bias_subspace(
        model, tokenizer, pairs, layers=layers, k=k, batch_size=batch_size, show_progress=show_progress
    )
    return project_out_bias(model, subspace, strength=strength, scope=scope)
