"""The bias subspace: the debiasing settings' checks and the estimate from prompt pairs (nothing changes).

:func:`estimate_bias_subspace` reads the residual stream of the chosen blocks for both prompts of every
pair and keeps the top principal directions of their differences, as a :class:`BiasSubspace`;
:func:`pair_difference_grams` and :func:`subspace_from_grams` are its two halves (one pass serves any
``k``). The method, and how :func:`~optipfair_train.bias.debias.project_out_bias` folds the subspace's
removal into the weights, are described in :mod:`optipfair_train.bias.debias`.

Example:
    >>> g = {0: (torch.diag(torch.tensor([4.0, 1.0])), torch.zeros(2))}
    >>> subspace_from_grams(g, k=1, num_pairs=2).k
    1
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from .capture import eval_mode, model_device
from .tokens import encode_texts

__all__ = [
    "BiasSubspace",
    "SCOPES",
    "check_debias_settings",
    "estimate_bias_subspace",
    "pair_difference_grams",
    "subspace_from_grams",
]

logger = logging.getLogger(__name__)

#: What :func:`project_out_bias` projects: every write into the stream, or only the subspace's blocks.
SCOPES = ("stream", "layers")
_NORMED_WRITES = ("gemma2", "gemma3", "gemma3_text", "olmo2")  # blocks that normalise their writes


@dataclass(frozen=True)
class BiasSubspace:
    """Orthonormal bias directions in the residual stream and how they were estimated.

    Example:
        >>> s = BiasSubspace(torch.eye(4)[:1], (0,), (1.0,), 3)
        >>> s.k, s.hidden_size
        (1, 4)
    """

    directions: torch.Tensor  # [k, hidden], orthonormal rows
    layers: tuple[int, ...]  # blocks whose outputs the directions were estimated on
    explained: tuple[float, ...]  # share of the (block-normalised) pair-difference energy per direction
    num_pairs: int
    mean: torch.Tensor | None = None  # [hidden]: the prompts' mean pooled stream (kept along V by the fold)

    @property
    def k(self) -> int:
        return int(self.directions.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[1])


def _check_pairs(pairs: Sequence[Sequence[str]]) -> None:
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError("estimate_bias_subspace needs a non-empty list of (prompt1, prompt2) pairs")
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise ValueError(f"pair {i} must be two non-empty strings, got {pair!r}")


def _check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if not chosen or bad:
        raise ValueError(f"layers must be block indices in 0..{num_layers - 1}, got {list(layers)!r}")
    return chosen


def check_debias_settings(
    model: nn.Module, *, k: int = 1, strength: float = 1.0, scope: str = "stream", method: str = "projection"
) -> None:
    """Refuse settings :func:`project_out_bias` cannot apply, before anything is computed or changed.

    Raises:
        ValueError: naming the bad key (``method``, ``k``, ``strength`` or ``scope``) and what is accepted,
            or the model family whose blocks normalise their writes.

    Example:
        >>> check_debias_settings(model, k=2, strength=0.5)  # doctest: +SKIP
    """
    if method != "projection":
        raise ValueError(f"debias method must be 'projection', got {method!r}")
    adapter = get_adapter(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= adapter.hidden_size:
        raise ValueError(
            f"debias k must be an integer in 1..{adapter.hidden_size} (the hidden size), got {k!r}"
        )
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(
            f"debias strength must be a number in (0, 1] (1 removes the subspace), got {strength!r}"
        )
    if scope not in SCOPES:
        raise ValueError(f"debias scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    model_type = adapter.config.model_type
    if model_type in _NORMED_WRITES:
        raise ValueError(
            f"{model_type} blocks normalise what they write into the residual stream, so a projection cannot "
            "be folded into their weights exactly; debiasing by projection supports "
            "llama, mistral, qwen2, qwen3, gemma, phi, opt and gpt2"
        )
    if hasattr(model, "peft_config"):
        raise ValueError(
            "merge the LoRA adapters first (merge_and_unload): their updates would bypass the fold"
        )


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def pair_difference_grams(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Sequence[str]],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per block, ``(sum over pairs of d d^T, mean pooled output)`` ([hidden, hidden] and [hidden], float64)
    with ``d`` the difference of the two prompts' mean-pooled block outputs (first token left out). One pass
    serves any ``k`` and any subset of the blocks (:func:`subspace_from_grams`). Nothing in the model changes.

    Raises:
        ValueError: for no pairs, a pair that is not two non-empty strings or a bad block index.

    Example:
        >>> grams = pair_difference_grams(model, tokenizer, pairs, layers=[10, 20])  # doctest: +SKIP
        >>> sorted(grams)  # doctest: +SKIP
        [10, 20]
    """
    _check_pairs(pairs)
    adapter = get_adapter(model)
    chosen = _check_layers(layers, adapter.num_layers)
    hidden = adapter.hidden_size
    grams = {i: torch.zeros(hidden, hidden, dtype=torch.float64) for i in chosen}
    sums = {i: torch.zeros(hidden, dtype=torch.float64) for i in chosen}
    pooled: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        def record(module, args, output) -> None:
            pooled[layer] = _block_output(output).float()

        return record

    handles = [adapter.layers[i].register_forward_hook(hook(i)) for i in chosen]
    device = model_device(model)
    try:
        with eval_mode(model):
            starts = range(0, len(pairs), batch_size)
            for start in tqdm(starts, desc="bias subspace", disable=not show_progress):
                chunk = pairs[start : start + batch_size]
                n = len(chunk)
                batch = encode_texts(tokenizer, [p[0] for p in chunk] + [p[1] for p in chunk])
                mask = batch.attention_mask.clone().float()
                mask[:, 0] = 0  # the first token is an attention sink, the same in both prompts
                mask[mask.sum(1) == 0, 0] = 1  # a one-token prompt keeps its only token
                batch = batch.to(device)
                model(**batch.model_inputs(), use_cache=False)
                for i in chosen:
                    x = pooled[i].cpu()
                    mean = torch.einsum("bs,bsd->bd", mask, x) / mask.sum(1, keepdim=True)
                    diff = (mean[:n] - mean[n:]).double()
                    grams[i] += diff.T @ diff
                    sums[i] += mean.double().sum(0)
    finally:
        for handle in handles:
            handle.remove()
    return {i: (grams[i], sums[i] / (2 * len(pairs))) for i in chosen}


def subspace_from_grams(
    grams: dict[int, tuple[torch.Tensor, torch.Tensor]], k: int, num_pairs: int
) -> BiasSubspace:
    """The top-``k`` eigenvectors of ``sum_l G_l / trace(G_l)`` over the given blocks' Gram matrices, and
    the blocks' mean pooled stream (what :func:`project_out_bias` keeps along the directions).

    Raises:
        ValueError: for no blocks or ``k`` outside 1..hidden.

    Example:
        >>> g = {0: (torch.diag(torch.tensor([4.0, 1.0])), torch.zeros(2))}
        >>> s = subspace_from_grams(g, k=1, num_pairs=2)
        >>> s.directions.abs().tolist(), s.explained
        ([[1.0, 0.0]], (0.8,))
    """
    if not grams:
        raise ValueError("subspace_from_grams needs the Gram matrix of at least one block")
    hidden = next(iter(grams.values()))[0].shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= hidden:
        raise ValueError(f"debias k must be an integer in 1..{hidden} (the hidden size), got {k!r}")
    total = sum(g / g.trace().clamp_min(1e-30) for g, _ in grams.values())
    mean = sum(m for _, m in grams.values()) / len(grams)
    values, vectors = torch.linalg.eigh(total)  # ascending
    top = vectors[:, -k:].flip(-1).T.contiguous()  # [k, hidden], largest first
    share = (values[-k:].flip(-1) / values.sum().clamp_min(1e-30)).tolist()
    return BiasSubspace(
        top.float(), tuple(sorted(grams)), tuple(round(float(s), 6) for s in share), num_pairs, mean.float()
    )


def estimate_bias_subspace(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[Sequence[str]],
    layers: Sequence[int] | None = None,
    k: int = 1,
    batch_size: int = 16,
    show_progress: bool = False,
) -> BiasSubspace:
    """The top-``k`` principal directions of the pairs' residual-stream differences (module docstring).

    ``layers``: the blocks whose outputs are read (default: all). Nothing in the model changes.

    Raises:
        ValueError: for no pairs, a pair that is not two non-empty strings, a bad block index or ``k``.

    Example:
        >>> s = estimate_bias_subspace(model, tokenizer, [("He is a nurse.", "She is a nurse.")], k=1)  # doctest: +SKIP
        >>> s.directions.shape  # doctest: +SKIP
        torch.Size([1, 576])
    """
    check_debias_settings(model, k=k)
    grams = pair_difference_grams(model, tokenizer, pairs, layers, batch_size, show_progress)
    subspace = subspace_from_grams(grams, k, len(pairs))
    logger.info(
        "bias subspace from %d pairs at %d blocks: share %s", len(pairs), len(grams), subspace.explained
    )
    return subspace
