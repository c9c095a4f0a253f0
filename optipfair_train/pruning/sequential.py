"""Sequential (layer-by-layer) calibration: layer ``l`` is scored and refit on the inputs produced by the
already pruned and refit layers ``0..l-1``, so later layers correct the error of earlier ones.

The calibration batches go through the embeddings once: a forward pre-hook on block 0 records its
hidden states and call arguments (attention mask, position embeddings, ...) and stops the forward.
Then, per block: collect the Gram of the refit projection's input on the unpruned block (the refit
target is the unpruned block's output on these inputs), choose the kept units from it, refit, prune a
*copy* of the block and run that copy to produce the next block's inputs. Only one block's statistics
and one block copy are resident at a time, and the model itself is not touched: the result is a plan
plus refit weights that the caller applies (so an error in layer 20 leaves the model as it was).

Families whose blocks take different attention masks (Gemma-2's alternating sliding window) are
refused, because the captured arguments of block 0 would be wrong for the others.

Example:
    >>> plan, refits = sequential_mlp_plan(model, batches, "activation", {0: 96}, 0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from .calibration import CalibrationBatch, _all_reduce_
from .heads import HeadPlan, head_columns, layer_head_scores, prune_heads, select_heads
from .reconstruction import apply_refits, effective_weight, gram_hook, refit_columns, refit_target
from .scorers import ScoringContext, get_scorer
from .surgery import prune_mlp_neurons

logger = logging.getLogger(__name__)

__all__ = [
    "capture_block_inputs",
    "check_same_layer_types",
    "run_block",
    "sequential_plan",
    "sequential_mlp_plan",
    "sequential_head_plan",
    "check_sequential_scorer",
]


SEQUENTIAL_HEAD_METHODS = ("L2", "activation", "random")


class _Captured(Exception):
    """Raised by the block-0 hook to stop the forward once its inputs are recorded."""


def check_same_layer_types(adapter) -> None:
    """Refuse a model whose blocks take different attention masks (block 0's would be wrong for others).

    Example:
        >>> check_same_layer_types(get_adapter(model))  # doctest: +SKIP
    """
    types = getattr(adapter.config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise ValueError(
            f"sequential=True needs every block to take the same attention mask; {adapter.family.name} "
            f"mixes layer types {sorted(set(types))}. Use sequential=False."
        )


def capture_block_inputs(
    model: nn.Module, batches: list[CalibrationBatch]
) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
    """Per batch, ``(hidden_states, kwargs, attention_mask)`` as block 0 receives them.

    Example:
        >>> inputs = capture_block_inputs(model, batches)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    check_same_layer_types(adapter)
    device = next(model.parameters()).device
    captured: list = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Captured

    handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    )
                except _Captured:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    return [(h, kw, b["attention_mask"].to(device)) for (h, kw), b in zip(captured, batches, strict=True)]


def run_block(block: nn.Module, inputs: list, hook_state: dict | None = None) -> list[torch.Tensor]:
    """Run one decoder block on captured inputs; returns its output hidden states per batch."""
    outputs = []
    was_training = block.training
    block.eval()
    try:
        with torch.inference_mode():
            for hidden, kwargs, mask in inputs:
                if hook_state is not None:
                    hook_state["mask"] = mask
                out = block(hidden, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        block.train(was_training)
    return outputs


def _advance(block: nn.Module, inputs: list) -> list:
    """The next block's inputs: ``block``'s outputs with the same call arguments and masks."""
    return [(h, kw, m) for h, (_, kw, m) in zip(run_block(block, inputs), inputs, strict=True)]


def sequential_plan(
    model: nn.Module,
    batches: list[CalibrationBatch],
    kind: str,
    layers: Sequence[int],
    choose: Callable[[int, nn.Module, torch.Tensor], tuple[Any, torch.Tensor]],
    prune_block: Callable[[int, nn.Module, Any], None],
    damping: float,
    *,
    load_block: Callable[[int], nn.Module] | None = None,
    block_done: Callable[[int, nn.Module], None] | None = None,
    show_progress: bool = False,
) -> tuple[dict[int, Any], dict[int, torch.Tensor]]:
    """Plan pruning and refit layer by layer on pruned-prefix inputs. Changes no weight of ``model``.

    ``choose(layer_idx, block, gram)`` returns ``(plan_entry, kept_columns)`` for one layer from the Gram
    of its refit projection's input; ``prune_block(layer_idx, block, plan_entry)`` cuts a block (applied to a copy).
    Returns ``({layer: plan_entry}, {layer: refit weight [out, kept] float64})``.

    By default the blocks are the model's own. With ``load_block(i)`` every block (all of them, in order)
    comes from there instead and belongs to the caller: it is cut and refit in place, handed to
    ``block_done(i, block)`` and never copied, so only one block need be resident (see
    :mod:`~optipfair_train.pruning.streamed`).

    Example:
        >>> plan, refits = sequential_plan(  # doctest: +SKIP
        ...     model, batches, "mlp", [0, 1], choose, prune, 0.01)
    """
    adapter = get_adapter(model)
    wanted = set(layers)
    owned = load_block is not None
    count = adapter.num_layers if owned else max(wanted) + 1
    inputs = capture_block_inputs(model, batches)
    plan: dict[int, Any] = {}
    refits: dict[int, torch.Tensor] = {}
    for i in tqdm(range(count), desc=f"sequential {kind} refit", disable=not show_progress):
        block = load_block(i) if owned else adapter.layers[i]
        if i in wanted:
            grams: dict[int, torch.Tensor] = {}
            state: dict = {}
            handle = refit_target(adapter, kind, block).register_forward_pre_hook(gram_hook(i, grams, state))
            try:
                run_block(block, inputs, state)
            finally:
                handle.remove()
            _all_reduce_(grams.values())
            plan[i], columns = choose(i, block, grams[i])
            weight = effective_weight(refit_target(adapter, kind, block))
            refits[i] = refit_columns(weight, grams[i], columns, damping, name=f"layer {i} {kind} refit")
            del grams
            if not owned:
                block = copy.deepcopy(block)
            prune_block(i, block, plan[i])
            apply_refits(model, kind, {i: refits[i]}, blocks={i: block})
        if i < count - 1:  # the last block's outputs feed nothing
            inputs = _advance(block, inputs)
        if block_done is not None:
            block_done(i, block)
        del block
    return plan, refits


def check_sequential_scorer(method: str, kind: str = "mlp") -> None:
    """Refuse a scorer that cannot be computed from one layer's own calibration statistics.

    ``kind`` is ``"mlp"`` (neuron scorers) or ``"attention"`` (head methods).

    Example:
        >>> check_sequential_scorer("activation")  # weight-only and activation scorers pass
    """
    if kind == "attention":
        if method not in SEQUENTIAL_HEAD_METHODS:
            raise ValueError(
                f"sequential=True head pruning accepts the methods {', '.join(SEQUENTIAL_HEAD_METHODS)}, got "
                f"{method!r} (taylor needs gradients: use sequential=False)."
            )
        return
    needs = get_scorer(method).needs
    if needs not in (None, "activation_sumsq"):
        raise ValueError(
            f"sequential=True scores each layer from its own calibration statistics; the {method!r} "
            "scorer needs more than the layer's activations (gradients, prompt pairs or input moments). "
            "Use a weight-only or the activation scorer, or sequential=False."
        )


def sequential_mlp_plan(
    model: nn.Module,
    batches: list[CalibrationBatch],
    method: str,
    targets: dict[int, int],
    damping: float,
    *,
    seed: int = 0,
    fairness_weight: float = 0.2,
    show_progress: bool = False,
    **blocks: Any,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Sequential MLP width plan (``{layer: kept neurons}``) and ``down_proj`` refits; ``targets`` = widths.

    The scorer reads ``activation_sumsq`` = the Gram's diagonal on the pruned-prefix inputs. ``blocks``:
    ``load_block`` / ``block_done`` of :func:`sequential_plan`.

    Example:
        >>> plan, refits = sequential_mlp_plan(model, batches, "activation", {0: 96}, 0.01)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    scorer = get_scorer(method)
    check_sequential_scorer(method)

    def choose(i: int, block: nn.Module, gram: torch.Tensor):
        context = ScoringContext(
            i, seed=seed, fairness_weight=fairness_weight, activation_sumsq=gram.diagonal().float()
        )
        keep = scorer(adapter.block_mlp(block), context).topk(targets[i]).indices.sort().values
        return keep, keep

    def prune_block(i: int, block: nn.Module, keep: torch.Tensor) -> None:
        prune_mlp_neurons(adapter.block_mlp(block), keep)

    return sequential_plan(
        model,
        batches,
        "mlp",
        list(targets),
        choose,
        prune_block,
        damping,
        show_progress=show_progress,
        **blocks,
    )


def sequential_head_plan(
    model: nn.Module,
    batches: list[CalibrationBatch],
    method: str,
    counts: dict[int, int],
    granularity: str,
    damping: float,
    *,
    seed: int = 0,
    show_progress: bool = False,
    **blocks: Any,
) -> tuple[dict[int, HeadPlan], dict[int, torch.Tensor]]:
    """Sequential head plan and ``o_proj`` refits; ``counts`` from :func:`~.heads.head_keep_counts`;
    ``blocks``: ``load_block`` / ``block_done`` of :func:`sequential_plan`.

    Example:
        >>> plan, refits = sequential_head_plan(  # doctest: +SKIP
        ...     model, batches, "activation", {0: 1}, "group", 0.01)
    """
    check_sequential_scorer(method, "attention")
    adapter = get_adapter(model)
    geometry = {i: adapter.head_counts(i) for i in counts}

    def choose(i: int, block: nn.Module, gram: torch.Tensor):
        n_q, n_kv, head_dim = geometry[i]
        parts = adapter.block_attention(block)
        scores = layer_head_scores(parts, geometry[i], method, granularity, gram.diagonal().float(), seed, i)
        keep = select_heads(scores, n_q, n_kv, counts[i], granularity)
        return keep, head_columns(keep.query_heads, head_dim)

    def prune_block(i: int, block: nn.Module, keep: HeadPlan) -> None:
        prune_heads(adapter.block_attention(block), keep, geometry[i][1], geometry[i][2])

    return sequential_plan(
        model,
        batches,
        "attention",
        list(counts),
        choose,
        prune_block,
        damping,
        show_progress=show_progress,
        **blocks,
    )
