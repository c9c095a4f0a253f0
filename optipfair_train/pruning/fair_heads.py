"""Fairness-aware head scores by ablation: the attention heads whose removal lowers the model's stereotype
preference most while costing its language modelling least (the idea of Zayed et al., AAAI 2024).

Each query head of the chosen layers is removed in turn by a forward pre-hook that zeroes its
``head_dim`` columns of the ``o_proj`` input (exactly what cutting the head does, without copying
weights), and StereoSet items are scored as :mod:`optipfair_train.bias.stereoset` scores them: ``s`` =
the mean per-token log-probability of an option. Over the items:

- bias margin ``B`` = mean of ``s(stereotype) - s(anti-stereotype)``, nats per token (> 0: stereotypes
  preferred; SS is the share of items with a positive margin). A head's **bias reduction** is
  ``sign(B0) * (B0 - B_h)``: how far removing it moves the margin toward 0 (``B0``: intact model,
  ``B_h``: head ``h`` removed);
- LM margin ``M`` = mean of ``(s(stereotype) + s(anti-stereotype)) / 2 - s(unrelated)`` (LMS counts
  how often the meaningful options beat the unrelated one). A head's **LM cost** is ``M0 - M_h``, plus,
  when calibration batches are given, the rise of their mean next-token NLL (the log of perplexity);
- keep-importance = ``fairness_lambda * cost - reduction``. The engine keeps the highest, so the heads
  that remove most bias for the least LM cost go first; a head with no effect on either scores 0.

Why margins and not SS / LMS themselves: SS and LMS count sign flips, so a head's small effect on a few
hundred items is mostly invisible; the margins they threshold move smoothly and are paired (the same
items with and without the head). ``fairness_lambda = 1`` weighs one nat of LM margin lost as much as
one nat of bias margin removed. A group's score (``head_granularity="group"``) is the sum of its query
heads' scores, as for every head scorer; the effects of several removed heads are assumed to add.

The items must be the *build* half of StereoSet (:func:`~optipfair_train.bias.split_items`): scores
tuned on the items that judge the result are no result. Only forward passes: per batch of items, one
pass of the intact model keeps every block's input (nothing that depends on a head), then one pass
per head runs only the blocks from the head's layer on, and the LM head only at the scored positions
(families with mixed layer types or logit soft-capping, and those without a final RMSNorm, run the
whole model per head instead). The cost is ``query heads x items`` short forwards; the measured time
on the demo model is in docs/benchmarks/fair-heads.md.

Example:
    >>> build, held_out = split_items(load_stereoset("default"))  # doctest: +SKIP
    >>> effects = head_ablation_effects(model, tokenizer, build[:64])  # doctest: +SKIP
    >>> effects.importance(1.0)[0].shape  # (num_query_heads,)  # doctest: +SKIP
    >>> prune_model(model, pruning_type="ATTENTION", neuron_selection_method="fairness",
    ...             head_granularity="query", layer_allocation="global", pruning_percentage=3.4,
    ...             bias_items=build[:64], tokenizer=tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ModelAdapter, get_adapter
from ..bias.capture import eval_mode, model_device
from ..bias.stereoset import item_sequences, padded_options
from ..bias.stereoset_data import StereoSetItem
from ..bias.tokens import pad_token_id
from .calibration import CalibrationBatch
from .sequential import capture_block_inputs, run_block

__all__ = ["HeadAblation", "head_ablation_effects", "check_fairness_lambda", "check_bias_items"]

DEFAULT_FAIRNESS_LAMBDA = 1.0


def check_fairness_lambda(value: float) -> None:
    """Refuse a weight of the LM cost that is not a finite number >= 0.

    Example:
        >>> check_fairness_lambda(0.5)
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not (ok and value >= 0):
        raise ValueError(
            f"fairness_lambda must be a finite number >= 0 (the weight of the LM cost against the bias "
            f"reduction; 0 = bias only), got {value!r}."
        )


def check_bias_items(items: Sequence | None) -> None:
    """Refuse missing, empty or non-StereoSet items for the ``fairness`` head scorer.

    Example:
        >>> check_bias_items([])
        Traceback (most recent call last):
        ValueError: The fairness head scorer needs bias_items: StereoSet items (the build half of split_items), got none.
    """
    if not items:
        raise ValueError(
            "The fairness head scorer needs bias_items: StereoSet items (the build half of split_items), "
            "got none."
        )
    wrong = next((x for x in items if not isinstance(x, StereoSetItem)), None)
    if wrong is not None:
        raise ValueError(
            f"bias_items must be StereoSetItem objects (load_stereoset, then split_items), got "
            f"{type(wrong).__name__}: {wrong!r:.80}."
        )


@dataclass
class HeadAblation:
    """Per layer, each query head's bias reduction and LM cost (nats per token; module docstring), and
    the intact model's margins."""

    bias_reduction: dict[int, torch.Tensor]
    lm_cost: dict[int, torch.Tensor]
    base_bias_margin: float
    base_lm_margin: float
    base_nll: float | None
    num_items: int
    exact: dict[int, torch.Tensor] | None = None  # heads ablated exactly (the rest: first-order estimates)
    first_order: HeadAblation | None = None  # every head's first-order estimate, when a shortlist was used

    def importance(self, fairness_lambda: float = DEFAULT_FAIRNESS_LAMBDA) -> dict[int, torch.Tensor]:
        """Keep-importance per query head: ``fairness_lambda * lm_cost - bias_reduction``.

        Example:
            >>> e = HeadAblation({0: torch.tensor([0.5, 0.0])}, {0: torch.tensor([0.1, 0.0])}, 1.0, 2.0, None, 8)
            >>> e.importance(1.0)[0]
            tensor([-0.4000,  0.0000])
        """
        check_fairness_lambda(fairness_lambda)
        return {i: fairness_lambda * self.lm_cost[i] - self.bias_reduction[i] for i in self.lm_cost}


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor  # [B, T] positions whose token is scored
    items: bool  # StereoSet options (3 rows an item) or calibration text


def _item_batches(tokenizer, items: Sequence[StereoSetItem], batch_size: int) -> list[_Batch]:
    seqs = item_sequences(tokenizer, items)
    order = sorted(range(len(items)), key=lambda i: max(len(ids) for ids, _ in seqs[i]))  # little padding
    pad = pad_token_id(tokenizer)
    out = []
    for start in range(0, len(order), batch_size):
        flat = [seq for i in order[start : start + batch_size] for seq in seqs[i]]
        out.append(_Batch(*padded_options(flat, pad), items=True))
    return out


def _text_batches(batches: Sequence[CalibrationBatch]) -> list[_Batch]:
    out = []
    for b in batches:
        mask = b["attention_mask"].bool()
        scored = mask & (mask.long().cumsum(1) > 1)  # every real token after the first
        out.append(_Batch(b["input_ids"], b["attention_mask"], scored, items=False))
    return out


@contextmanager
def _head_removed(o_proj: nn.Module, head: int, head_dim: int) -> Iterator[None]:
    """Zero one head's columns of ``o_proj``'s input for the block (the head's output never reaches it)."""

    def hook(module, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0
        return (x, *args[1:])

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _runs_from_a_block(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Whether a pass may start at any block from the stored block inputs (else: the whole model)."""
    config = adapter.config
    types = getattr(config, "layer_types", None)
    return (
        adapter.family.final_norm is not None
        and (types is None or len(set(types)) == 1)
        and getattr(config, "final_logit_softcapping", None) is None
    )


def _totals(
    logits: torch.Tensor, input_ids: torch.Tensor, where: torch.Tensor, batch: _Batch
) -> torch.Tensor:
    """``[bias margin sum, LM margin sum, NLL sum]`` of a batch (items: summed over items; text: over
    tokens) from the logits at its scored positions; differentiable."""
    logits = logits.float()
    target = input_ids[:, 1:][where]
    lp = logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(len(input_ids), dtype=torch.float64, device=lp.device)
    sums = sums.index_add(0, where.nonzero()[:, 0], lp.double()).cpu()
    zero = torch.zeros((), dtype=torch.float64)
    if not batch.items:
        return torch.stack([zero, zero, -sums.sum()])
    mean = (sums / batch.scored[:, 1:].sum(1).double()).view(-1, 3)  # [items, options]
    meaningful = (mean[:, 0] + mean[:, 1]) / 2
    return torch.stack([(mean[:, 0] - mean[:, 1]).sum(), (meaningful - mean[:, 2]).sum(), zero])


class _Passes:
    """The forward passes of one batch: the intact model once (its block inputs kept), then one per head."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batch: _Batch, partial: bool):
        self.model, self.adapter, self.batch, self.partial = model, adapter, batch, partial
        device = model_device(model)
        self.input_ids = batch.input_ids.to(device)
        self.attention_mask = batch.attention_mask.to(device)
        self.where = batch.scored[:, 1:].to(device)  # the output at t predicts the token at t + 1

    def _logits(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the scored positions: from the final norm's input ``hidden``, or the whole model."""
        if hidden is None:
            out = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False)
            return out.logits[:, :-1][self.where]
        states = self.adapter.final_norm()(hidden[:, :-1][self.where])
        return self.model.get_output_embeddings()(states)

    def intact(self) -> torch.Tensor:
        """The intact model's totals; keeps every block's input for :meth:`without`."""
        if not self.partial:
            return _totals(self._logits(), self.input_ids, self.where, self.batch)
        hidden, kwargs, mask = capture_block_inputs(
            self.model, [dict(input_ids=self.input_ids, attention_mask=self.attention_mask)]
        )[0]
        self.inputs = []
        for block in self.adapter.layers:
            self.inputs.append((hidden, kwargs, mask))
            hidden = run_block(block, [(hidden, kwargs, mask)])[0]
        return _totals(self._logits(hidden), self.input_ids, self.where, self.batch)

    def without(self, layer: int, head: int, head_dim: int) -> torch.Tensor:
        """The totals with one head of ``layer`` removed (run from that block on, when possible)."""
        with _head_removed(self.adapter.attention(layer).o, head, head_dim):
            if not self.partial:
                return _totals(self._logits(), self.input_ids, self.where, self.batch)
            hidden, kwargs, mask = self.inputs[layer]
            for block in self.adapter.layers[layer:]:
                hidden = run_block(block, [(hidden, kwargs, mask)])[0]
            return _totals(self._logits(hidden), self.input_ids, self.where, self.batch)

    def first_order(self, geometry: dict[int, tuple[int, int, int]]) -> tuple[torch.Tensor, dict]:
        """The intact totals and, per layer, the first-order change of the totals when each head goes:
        ``-gradient . head output`` ([n_q, 3]), from one forward and one backward pass per total."""
        added, outputs = {}, {}

        def hook_for(i: int):
            def hook(module, args):  # adding a zero that requires grad keeps every path through the head
                added[i] = torch.zeros_like(args[0], requires_grad=True)
                outputs[i] = args[0].detach()
                return (args[0] + added[i], *args[1:])

            return hook

        handles = [self.adapter.attention(i).o.register_forward_pre_hook(hook_for(i)) for i in geometry]
        try:
            with torch.enable_grad():
                totals = _totals(self._logits(), self.input_ids, self.where, self.batch)
                change = {i: torch.zeros(n_q, 3, dtype=torch.float64) for i, (n_q, _, _) in geometry.items()}
                ks = (0, 1) if self.batch.items else (2,)  # items: the two margins; text: its NLL
                for k in ks:
                    grads = torch.autograd.grad(
                        totals[k], [added[i] for i in geometry], retain_graph=k != ks[-1]
                    )
                    for (i, (n_q, _, head_dim)), g in zip(geometry.items(), grads, strict=True):
                        per_head = (g * outputs[i]).reshape(-1, n_q, head_dim).sum((0, 2))
                        change[i][:, k] = -per_head.double().cpu()
        finally:
            for handle in handles:
                handle.remove()
        return totals.detach(), change


def _effects(base: torch.Tensor, ablated: dict, exact: dict, num_items: int, tokens: int) -> HeadAblation:
    """Effects from summed totals (intact ``base`` [3], ``ablated`` [n_q, 3] per layer)."""
    scale = torch.tensor([1 / num_items, 1 / num_items, 1 / max(tokens, 1)], dtype=torch.float64)
    base, ablated = base * scale, {i: a * scale for i, a in ablated.items()}
    sign = 1.0 if base[0] >= 0 else -1.0
    return HeadAblation(
        bias_reduction={i: (sign * (base[0] - a[:, 0])).float() for i, a in ablated.items()},
        lm_cost={i: ((base[1] - a[:, 1]) + (a[:, 2] - base[2])).float() for i, a in ablated.items()},
        base_bias_margin=float(base[0]),
        base_lm_margin=float(base[1]),
        base_nll=float(base[2]) if tokens else None,
        num_items=num_items,
        exact=exact,
    )


def head_ablation_effects(
    model: nn.Module,
    tokenizer,
    items: Sequence[StereoSetItem],
    *,
    batches: Sequence[CalibrationBatch] | None = None,
    layer_indices: Sequence[int] | None = None,
    batch_size: int = 16,
    shortlist: int | None = None,
    fairness_lambda: float = DEFAULT_FAIRNESS_LAMBDA,
    show_progress: bool = False,
) -> HeadAblation:
    """Each query head's bias reduction and LM cost, from one ablation per head (module docstring).

    ``items``: StereoSet items (the build half only); ``batches``: calibration text whose NLL rise is
    added to the LM cost (optional; its cost is one more forward per head and batch). ``shortlist``:
    first estimate every head's effects to first order (one forward and backward per batch: removing
    head ``h`` changes a total by about ``-gradient . output of h``), then ablate exactly only the
    ``shortlist`` heads with the lowest estimated keep-importance at ``fairness_lambda``; the others keep
    their estimate (``exact`` marks which is which). None: every head exactly.

    Example:
        >>> effects = head_ablation_effects(model, tokenizer, build_items[:32])  # doctest: +SKIP
        >>> effects.bias_reduction[5].argmax()  # doctest: +SKIP
    """
    check_bias_items(items)
    check_fairness_lambda(fairness_lambda)
    adapter = get_adapter(model)
    layers = list(range(adapter.num_layers)) if layer_indices is None else sorted(layer_indices)
    work = _item_batches(tokenizer, items, batch_size) + _text_batches(batches or [])
    geometry = {i: adapter.head_counts(i) for i in layers}
    heads = [(i, h) for i, (n_q, _, _) in geometry.items() for h in range(n_q)]
    if shortlist is not None and not (isinstance(shortlist, int) and 0 < shortlist <= len(heads)):
        raise ValueError(f"shortlist must be a whole number of heads in 1..{len(heads)}, got {shortlist!r}.")
    tokens = sum(int(b.scored[:, 1:].sum()) for b in work if not b.items)
    partial = _runs_from_a_block(model, adapter)
    base = torch.zeros(3, dtype=torch.float64)
    ablated = {i: torch.zeros(n_q, 3, dtype=torch.float64) for i, (n_q, _, _) in geometry.items()}
    exact = {i: torch.zeros(n_q, dtype=torch.bool) for i, (n_q, _, _) in geometry.items()}
    chosen = heads
    with eval_mode(model):
        if shortlist is not None:
            for batch in tqdm(work, desc="head effects, first order", disable=not show_progress):
                totals, change = _Passes(model, adapter, batch, partial).first_order(geometry)
                base += totals
                for i in ablated:
                    ablated[i] += totals + change[i]
            first_order = _effects(base, {i: a.clone() for i, a in ablated.items()}, {}, len(items), tokens)
            estimate = first_order.importance(fairness_lambda)
            chosen = sorted(heads, key=lambda ih: (float(estimate[ih[0]][ih[1]]), ih))[:shortlist]
            for i, h in chosen:
                ablated[i][h] = 0
        measured = torch.zeros(3, dtype=torch.float64)
        with tqdm(
            total=len(work) * (1 + len(chosen)), desc="head ablation", disable=not show_progress
        ) as bar:
            for batch in work:
                passes = _Passes(model, adapter, batch, partial)
                measured += passes.intact()
                bar.update()
                for i, h in chosen:
                    ablated[i][h] += passes.without(i, h, geometry[i][2])
                    exact[i][h] = True
                    bar.update()
    effects = _effects(measured, ablated, exact, len(items), tokens)
    if shortlist is not None:
        effects.first_order = first_order
    return effects
