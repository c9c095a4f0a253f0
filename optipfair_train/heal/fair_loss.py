"""A fairness loss for healing: each StereoSet build item's stereotype preference pushed toward indifference.

For an item, ``d`` = mean per-token log-probability of its stereotype sentence minus that of its
anti-stereotype sentence, scored exactly as the StereoSet probe scores options
(:func:`~optipfair_train.bias.stereoset.item_sequences`, :func:`~optipfair_train.bias.stereoset.padded_options`,
:func:`~optipfair_train.bias.stereoset.scored_log_probs`): the probe counts an item as stereotyped when
``d > 0``, so SS is the share of items with ``d > 0``. The loss is ``mean(d ** 2)`` over a batch of
items: zero when the model is indifferent between the two sentences, and each item's gradient
points toward its own indifference (an item preferring the anti-stereotype is pushed back as well, so
the loss does not buy a lower SS by reversing preferences). The unrelated option is not scored: the
loss never asks the model to rank meaningful sentences differently against nonsense, which is what LMS
measures. ``objective="mean"`` pushes the batch's mean gap instead, and ``"counterfactual"`` is not a gap
at all: the items' texts and their group-swapped counterfactuals should get the same predictions
(:mod:`.fair_pairs`).

Only **build-half** items may feed it (:func:`~optipfair_train.bias.split_items`); the other half
judges the result. :class:`~optipfair_train.callbacks.FairnessLossCallback` adds its gradient to any
Trainer's; :func:`check_fairness_loss_settings` refuses bad settings.

Example:
    >>> build, held_out = split_items(load_stereoset("default"), seed=0)  # doctest: +SKIP
    >>> loss = fairness_loss(model, tokenizer, build[:8])  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from ..bias.stereoset import item_sequences, padded_options, scored_log_probs
from ..bias.stereoset_data import StereoSetItem
from ..bias.tokens import pad_token_id
from ..names import FAIRNESS_LOSS_OBJECTIVES
from .fair_pairs import Anchor, TargetSwap, TextPair, anchor_for, invariance_losses

__all__ = [
    "OBJECTIVES",
    "check_fairness_loss_settings",
    "preference_gaps",
    "fairness_loss",
    "fairness_gradients",
    "ItemCycle",
]

logger = logging.getLogger(__name__)


#: What the loss pushes toward zero. ``items``: every item's gap (``mean(d ** 2)``), which is mostly
#: item-specific variance; ``mean``: the batch's mean gap (``mean(d) ** 2``), the systematic preference
#: that SS counts, the part a held-out item shares with the build items; ``counterfactual``: the
#: divergence between the model's predictions on an item's texts and on the same texts naming another
#: group (:mod:`.fair_pairs`), an invariance rather than a preference.
OBJECTIVES = FAIRNESS_LOSS_OBJECTIVES


def check_fairness_loss_settings(
    weight: float, items: Sequence[StereoSetItem], batch_size: int, objective: str = "items"
) -> None:
    """Refuse settings the fairness loss cannot use, naming the setting and what is accepted.

    Raises:
        ValueError: ``weight`` negative or not finite, no items, items that are not
            :class:`~optipfair_train.bias.StereoSetItem`, or ``batch_size`` below 1.

    Example:
        >>> check_fairness_loss_settings(-1.0, [], 8)
        Traceback (most recent call last):
        ...
        ValueError: fairness loss weight must be a finite number >= 0 (0 = off), got -1.0.
    """
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"fairness loss weight must be a finite number >= 0 (0 = off), got {weight!r}.")
    if objective not in OBJECTIVES:
        raise ValueError(
            f"fairness loss objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fairness loss batch_size must be an integer >= 1, got {batch_size!r}.")
    if len(items) == 0:
        raise ValueError("the fairness loss needs StereoSet items (the build half of split_items), got none.")
    bad = [type(item).__name__ for item in items if not isinstance(item, StereoSetItem)]
    if bad:
        raise ValueError(
            f"fairness loss items must be StereoSetItem objects (load_stereoset, then split_items), got {bad[0]}."
        )


def preference_gaps(model: nn.Module, tokenizer, items: Sequence[StereoSetItem]) -> torch.Tensor:
    """Per item, ``d`` = mean token log-prob of the stereotype sentence minus the anti-stereotype's
    (float64, [n_items]); differentiable with respect to the model's parameters. One padded forward pass
    for all items (two sequences each); the caller chooses the mode (eval for the probe's scores) and
    whether gradients are recorded.

    Example:
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     d = preference_gaps(model, tokenizer, build[:8])
        >>> float((d > 0).double().mean())  # the items' share scored as stereotyped  # doctest: +SKIP
    """
    seqs = item_sequences(tokenizer, items)
    flat = [seq for options in seqs for seq in options[:2]]  # stereotype, anti-stereotype
    input_ids, attention, scored = padded_options(flat, pad_token_id(tokenizer))
    sums = scored_log_probs(model, input_ids, attention, scored).view(-1, 2)
    counts = scored[:, 1:].sum(1).view(-1, 2).to(sums)
    mean = sums / counts
    return mean[:, 0] - mean[:, 1]


def fairness_loss(
    model: nn.Module,
    tokenizer,
    items: Sequence[StereoSetItem],
    objective: str = "items",
    reference: nn.Module | None = None,
) -> torch.Tensor:
    """The fairness loss over ``items`` (:func:`preference_gaps`): ``objective="items"``, ``mean(d ** 2)``,
    zero when the model is indifferent on every item; ``"mean"``, ``mean(d) ** 2``, zero when the
    stereotype and anti-stereotype preferences cancel over the batch; ``"counterfactual"``, the mean
    invariance loss of the items' counterfactual pairs (partners drawn among ``items``' own targets, seed
    0, :class:`~optipfair_train.heal.fair_pairs.TargetSwap`), anchored on ``reference`` (the model before
    healing; a PEFT model's base when None, :func:`~optipfair_train.heal.fair_pairs.anchor_for`); see
    :data:`OBJECTIVES`.

    Example:
        >>> fairness_loss(model, tokenizer, build[:8]).backward()  # doctest: +SKIP
    """
    if objective == "counterfactual":
        groups = TargetSwap(items).pairs(items, step=0)
        return invariance_losses(model, tokenizer, groups, anchor_for(model, reference)).mean()
    d = preference_gaps(model, tokenizer, items)
    return d.pow(2).mean() if objective == "items" else d.mean().pow(2)


def fairness_gradients(
    model: nn.Module,
    tokenizer,
    items: Sequence[StereoSetItem],
    params: Sequence[nn.Parameter],
    batch_items: int,
    objective: str = "items",
    pairs: Sequence[Sequence[TextPair]] | None = None,
    anchor: Anchor | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """Gradients with respect to ``params`` of ``sum(d ** 2) / batch_items`` (``objective="items"``) or
    of ``sum(d) / batch_items`` (``"mean"``: the caller multiplies by ``2 * mean(d)`` once every share's
    sum is known, which makes it the gradient of ``mean(d) ** 2``), over ``items`` (zeros when empty),
    with the sums of ``d ** 2``, ``|d|`` and ``d``. With ``"counterfactual"``, of the sum of the items'
    invariance losses over ``pairs`` (``items``' counterfactual pairs, :meth:`TargetSwap.pairs`) divided
    by ``batch_items``, anchored on ``anchor`` (:func:`~optipfair_train.heal.fair_pairs.anchor_for`),
    with that sum and two zeros. The model runs in eval mode (no dropout: the probe's
    scores) and its mode is restored; nothing is written to ``.grad``.

    Dividing by the whole batch's size, not this share's, lets processes that each score a shard of
    one batch add their results into the batch's (the callback all-reduces them).

    Example:
        >>> params = [p for p in model.parameters() if p.requires_grad]  # doctest: +SKIP
        >>> grads, (sq, ab, sd) = fairness_gradients(model, tokenizer, build[:8], params, 8)  # doctest: +SKIP
    """
    if not items:
        return [torch.zeros_like(p) for p in params], [0.0, 0.0, 0.0]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            if objective == "counterfactual":
                if pairs is None or len(pairs) != len(items) or anchor is None:
                    raise ValueError(
                        "the counterfactual objective needs one group of text pairs per item and an anchor"
                    )
                d = invariance_losses(model, tokenizer, pairs, anchor)
                loss = d.sum() / batch_items
            else:
                d = preference_gaps(model, tokenizer, items)
                loss = (d.pow(2) if objective == "items" else d).sum() / batch_items
            grads = torch.autograd.grad(loss, list(params), allow_unused=True) if loss.requires_grad else None
    finally:
        model.train(was_training)
    if grads is None:  # no aligned pair in the batch: nothing to add
        grads = [None] * len(params)
    out = [torch.zeros_like(p) if g is None else g.to(p.dtype) for p, g in zip(params, grads, strict=True)]
    d = d.detach()
    if objective == "counterfactual":
        return out, [float(d.sum()), 0.0, 0.0]
    return out, [float(d.pow(2).sum()), float(d.abs().sum()), float(d.sum())]


class ItemCycle:
    """Which items a training step uses: a deterministic function of the step and the seed, so a run
    resumed from a checkpoint at step ``s`` draws exactly what the uninterrupted run drew.

    Position ``k = step * batch_size + j`` of the stream is item ``order_p[k mod n]`` of pass
    ``p = k // n``, where ``order_p`` is a permutation of the ``n`` items seeded by ``(seed, p)``: every
    item once per pass, a new order each pass.

    Example:
        >>> cycle = ItemCycle(list("abcde"), batch_size=2, seed=0)
        >>> [sorted(cycle.batch(0) + cycle.batch(1) + cycle.batch(2)[:1])] == [list("abcde")]
        True
    """

    def __init__(self, items: Sequence, batch_size: int, seed: int):
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, p: int) -> list[int]:
        if p not in self._orders:
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}:{p}").shuffle(order)
            self._orders = {p: order}  # only the current pass is needed again
        return self._orders[p]

    def batch(self, step: int) -> list:
        """The ``batch_size`` items of ``step`` (0-based optimizer step)."""
        n, out = len(self.items), []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self.items[self._order(k // n)[k % n]])
        return out
