"""The hidden axis on a checkpoint larger than memory: two streamed passes, one block resident at a time.

:func:`stream_hidden` is what :func:`~optipfair_train.pruning.streamed.prune_checkpoint` runs for
``pruning_type="HIDDEN"``. The model is on ``meta`` except the outer weights (embeddings, final norm,
LM head); blocks are read from the checkpoint one at a time:

1. **Scores** (not for the weight-only ``L2``): the calibration batches go through the embeddings and
   stop at block 0; then block by block, read block ``i``, run it with the hooks of
   :func:`~optipfair_train.pruning.hidden.hidden_channel_scores` on its norms, hand its outputs on as
   block ``i + 1``'s inputs and drop it; last, the final norm. The channels are then chosen as
   :func:`~optipfair_train.pruning.hidden.plan_hidden` chooses them.
2. **Cut and refit**: the batches go through the embeddings again; block by block, read block ``i``
   (unpruned), run it with the hooks of :func:`~optipfair_train.pruning.hidden_refit.plan_hidden_refit`
   on its two norms, hand its (unpruned) outputs on, solve the refits of q/k/v and gate/up, cut the
   block (:func:`~optipfair_train.pruning.hidden_cut.cut_hidden_block`), write the refits and the block's
   shard. Last, the final norm's statistics (the refit of an untied LM head), then the embedding, head
   and final norm are cut and the config gets the new ``hidden_size``.

The in-memory refit reads the *unpruned* model's activations, so nothing here depends on an earlier
cut: every statistic is summed over the same batches in the same order from the same block calls as
``prune_model(model, "HIDDEN", reconstruct=True)``, and the result is the same model, weight for weight
(tests/test_streamed_hidden.py). The price is reading the checkpoint twice (once with ``L2``).

Resident at once: one block, the outer weights, the calibration hidden states (tokens x hidden size, a
block's input and output), and in pass 2 one norm's or one block's refit systems (``C`` and ``G``, kept x
hidden and kept x kept float64, per norm), the refit weights in the checkpoint's dtype and the float64
temporaries of :data:`~optipfair_train.pruning.hidden_refit.REFIT_ROWS` rows at a time; pass 1 holds
only ``(2 L + 1) x hidden`` float64 sums. Sizes for 1B/8B/70B: docs/memory-plan.md.

Example:
    >>> prune_checkpoint("Llama-3.1-8B", "Llama-3.1-8B-h10", batches,
    ...                  pruning_type="HIDDEN", pruning_percentage=10)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ModelAdapter, get_adapter
from .axes import check_finite_scores
from .calibration import CalibrationBatch, _hooks
from .hidden import (
    _check_plan,
    _norm_modules,
    channel_statistics_hook,
    combine_channel_statistics,
    hidden_channel_scores,
    plan_from_scores,
)
from .hidden_axis import HiddenRequest
from .hidden_cut import cut_hidden_block, cut_hidden_outside_blocks
from .hidden_refit import apply_hidden_refit, refit_statistics_hook, solve_hidden_refit
from .hidden_rotation import stream_readers
from .sequential import capture_block_inputs, run_block

logger = logging.getLogger(__name__)

__all__ = ["stream_hidden", "check_streamed_hidden_method", "STREAMED_HIDDEN_METHODS"]

STREAMED_HIDDEN_METHODS = ("activation", "activation_l2", "L2")

Inputs = list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]


def _forward(block: nn.Module, inputs: Inputs, current: dict) -> Inputs:
    """Run ``block`` on every batch (hooks see the batch's mask in ``current``); the next block's inputs."""
    outputs = run_block(block, inputs, current)
    return [(h, kw, m) for h, (_, kw, m) in zip(outputs, inputs, strict=True)]


def _final_norm(adapter: ModelAdapter, inputs: Inputs, current: dict) -> None:
    """Run the final norm on the last block's outputs (for the hooks on it), as the model's forward does."""
    norm = adapter.final_norm()
    with torch.inference_mode():
        for hidden, _, mask in inputs:
            current["mask"] = mask
            norm(hidden)


def _stream_scores(
    model: nn.Module,
    load: Callable[[int], nn.Module],
    batches: list[CalibrationBatch],
    method: str,
    show_progress: bool,
) -> torch.Tensor:
    """Pass 1: the per-channel scores of ``hidden_channel_scores``, one block resident at a time."""
    adapter = get_adapter(model)
    sums = torch.zeros(len(_norm_modules(adapter)), adapter.hidden_size, dtype=torch.float64)
    tokens = torch.zeros(1, dtype=torch.float64)
    current: dict = {}
    inputs = capture_block_inputs(model, batches)
    k = 0  # the norms' order of hidden_channel_scores: each block's residual norms, then the final norm
    for i in tqdm(range(adapter.num_layers), desc="hidden channel statistics", disable=not show_progress):
        block = load(i)
        norms = adapter.block_norms(i)[0]
        hooks = [channel_statistics_hook(k + j, method, sums, tokens, current) for j in range(len(norms))]
        k += len(norms)
        with _hooks([norm.register_forward_hook(h) for norm, h in zip(norms, hooks, strict=True)]):
            inputs = _forward(block, inputs, current)
        block.to("meta")
    hook = channel_statistics_hook(k, method, sums, tokens, current)
    with _hooks([adapter.final_norm().register_forward_hook(hook)]):
        _final_norm(adapter, inputs, current)
    return combine_channel_statistics(sums, tokens, method)


def check_streamed_hidden_method(method: str | None) -> None:
    """Refuse a hidden method the streamed path does not take (``None`` is the default, ``activation``).

    Example:
        >>> check_streamed_hidden_method("pca")
        Traceback (most recent call last):
        ...
        ValueError: Streamed hidden pruning takes the methods activation, activation_l2, L2, got 'pca' ('pca' rotates every weight of the model: use prune_model).
    """
    if method is not None and method not in STREAMED_HIDDEN_METHODS:
        raise ValueError(
            f"Streamed hidden pruning takes the methods {', '.join(STREAMED_HIDDEN_METHODS)}, got "
            f"{method!r} ('pca' rotates every weight of the model: use prune_model)."
        )


def stream_hidden(
    model: nn.Module,
    load: Callable[[int], nn.Module],
    done: Callable[[int, nn.Module], None],
    batches: list[CalibrationBatch],
    request: HiddenRequest,
    *,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Plan and apply ``request`` (with ``reconstruct=True``) block by block; returns the event fields
    (as the in-memory apply records them).

    ``model`` holds its outer weights, its blocks on ``meta``; ``load(i)`` reads block ``i`` into it and
    ``done(i, block)`` writes the cut block and frees it (``prune_checkpoint``'s block stream). The
    embedding, final norm and LM head are cut in ``model`` last; the caller saves them with the config.

    Example:
        >>> stream_hidden(model, stream.load, stream.done, batches,  # doctest: +SKIP
        ...               HiddenRequest(pruning_percentage=10, calibrated=True, reconstruct=True))
    """
    check_streamed_hidden_method(request.method)
    if not request.reconstruct:
        raise ValueError("Streamed hidden pruning refits the stream's readers: pass reconstruct=True.")
    adapter = get_adapter(model)
    kept = request.kept(model)
    if request.method == "L2":  # the embedding's column norms: the embedding is resident
        scores = hidden_channel_scores(model, None, "L2")
    else:
        scores = _stream_scores(model, load, batches, request.method, show_progress)
    check_finite_scores({-1: scores}, f"{request.method} hidden channel")
    plan = plan_from_scores(scores, kept, request.method)
    keep = _check_plan(adapter, plan, None)

    readers = stream_readers(adapter)
    dtype = adapter.model.get_input_embeddings().weight.dtype  # the checkpoint's, as prune_checkpoint read it
    sums: dict[str, dict[str, torch.Tensor]] = {}
    current: dict = {}

    def statistics(names: list[str]) -> list:
        return [
            readers[n][0].register_forward_hook(refit_statistics_hook(n, readers[n][0], keep, sums, current))
            for n in names
        ]

    def refits(names: list[str]) -> dict[str, list[torch.Tensor]]:
        return {  # on the unpruned projections, before the cut; stored in the weights' dtype at once
            n: solve_hidden_refit(adapter, n, readers[n][1], keep, sums.pop(n), request.damping, dtype)
            for n in names
        }

    inputs = capture_block_inputs(model, batches)
    for i in tqdm(range(adapter.num_layers), desc="hidden cut and refit", disable=not show_progress):
        block = load(i)
        names = [f"layer {i} attention", f"layer {i} mlp"]
        with _hooks(statistics(names)):
            inputs = _forward(block, inputs, current)
        weights = refits(names)
        cut_hidden_block(adapter, i, keep)
        apply_hidden_refit(model, weights)
        done(i, block)
    head = ["head"] if "head" in readers else []  # an untied LM head reads the final norm
    if head:
        with _hooks(statistics(head)):
            _final_norm(adapter, inputs, current)
    weights = refits(head)
    d = adapter.hidden_size
    cut_hidden_outside_blocks(adapter, keep)
    apply_hidden_refit(model, weights)
    logger.info("Hidden size %d -> %d (%s, streamed)", d, len(keep), plan.method)
    summary = plan.summary()
    summary.pop("method")
    return summary
