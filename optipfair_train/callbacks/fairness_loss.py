"""``FairnessLossCallback``: adds a fairness loss's gradient to any Trainer's healing step.

At every optimizer step it scores a batch of StereoSet **build** items
(:mod:`optipfair_train.heal.fair_loss`: ``d`` = stereotype minus anti-stereotype mean token log-prob,
loss ``mean(d ** 2)``, or ``mean(d) ** 2`` with ``objective="mean"``; with ``objective="counterfactual"``
the divergence of the model's predictions between each item's texts and their counterfactuals,
:mod:`optipfair_train.heal.fair_pairs`) and adds ``weight`` times that loss's gradient to the ``.grad`` of every
trainable parameter in ``on_pre_optimizer_step``. Transformers calls that hook after gradient clipping
and right before ``optimizer.step()``, so the optimizer minimises ``training loss + weight * fairness
loss`` for any Trainer or TRL trainer, LoRA or full-parameter, distillation included; the fairness term
itself is not clipped.

Resuming: the items of step ``s`` are a function of ``s`` and ``seed`` alone
(:class:`~optipfair_train.heal.fair_loss.ItemCycle`) and the loss is scored in eval mode (no dropout),
so a run resumed from a checkpoint adds the same gradients as the uninterrupted run.

Several processes (DDP): each rank scores its share of the step's batch (items ``rank::world``), the
gradients are summed over ranks with ``all_reduce`` (each share is already divided by the whole batch's
size) and every rank adds the same batch-mean gradient. FSDP and DeepSpeed, which shard parameters or
own their gradients, are refused at train begin.

Logged through the Trainer whenever it logs its loss: ``fairness_loss`` (the loss, averaged over the
steps since the last log), ``fairness_gap`` (mean ``|d|``, nats) and ``fairness_mean_gap`` (mean ``d``:
positive while the stereotype is preferred on average); the counterfactual objective logs its loss only.

Example:
    >>> build, held_out = split_items(load_stereoset("default"), seed=0)  # doctest: +SKIP
    >>> cb = FairnessLossCallback(build, tokenizer, weight=1.0, batch_size=8, seed=0)  # doctest: +SKIP
    >>> cb.attach(trainer); trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..bias.stereoset_data import StereoSetItem
from ..heal.fair_loss import ItemCycle, check_fairness_loss_settings, fairness_gradients
from ..heal.fair_pairs import TargetSwap, anchor_for
from .base import ReportingCallback

__all__ = ["FairnessLossCallback"]

logger = logging.getLogger(__name__)


def _process_group(args: Any) -> tuple[int, int]:
    """(rank, world size) of the run; refused when several processes train without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        raise RuntimeError(
            f"FairnessLossCallback: the Trainer reports {world} processes but no torch.distributed process "
            "group is initialised, so the fairness gradients cannot be kept in sync."
        )
    return 0, 1


class FairnessLossCallback(ReportingCallback):
    """Adds ``weight`` x the gradient of the fairness loss on StereoSet build items at each optimizer step.

    Args:
        items: StereoSet items to train on: only the **build** half of
            :func:`~optipfair_train.bias.split_items` (the held-out half judges the result).
        tokenizer: the model's tokenizer (the items are tokenized as the StereoSet probe does).
        weight: the loss's weight (>= 0; 0 adds nothing and scores nothing).
        batch_size: items per optimizer step (>= 1), cycled deterministically under ``seed``.
        seed: the order in which items are cycled.
        objective: ``"items"`` (``mean(d ** 2)``), ``"mean"`` (``mean(d) ** 2`` over the step's batch) or
            ``"counterfactual"`` (invariance to the group a text names; partners among ``items``' targets,
            drawn under ``seed``); see :data:`~optipfair_train.heal.fair_loss.OBJECTIVES`.
        reference: the counterfactual objective's anchor, the model as it was before training (a frozen
            copy; it costs one model's memory); leave None for a PEFT (LoRA) model, whose base is read
            with its adapters disabled. Taken before training, so a resumed run anchors alike.
        trainer: for logging through every ``report_to`` backend (see :mod:`.base`).

    Raises:
        ValueError: a negative or non-finite weight, no items (or objects that are not items), a batch
            size below 1: at construction, before any training.

    Example:
        >>> FairnessLossCallback(build, tokenizer, weight=1.0).attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        items: Sequence[StereoSetItem],
        tokenizer,
        weight: float = 1.0,
        batch_size: int = 8,
        seed: int = 0,
        trainer: Any | None = None,
        objective: str = "items",
        reference: torch.nn.Module | None = None,
    ):
        super().__init__(trainer)
        check_fairness_loss_settings(weight, items, batch_size, objective)
        self.tokenizer, self.weight, self.batch_size, self.seed = tokenizer, float(weight), batch_size, seed
        self.objective = objective
        self.cycle = ItemCycle(items, batch_size, seed)
        self.swap = TargetSwap(items, seed) if objective == "counterfactual" else None
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self._sums = [0.0, 0.0, 0.0, 0, 0]  # loss (per step), |d|, d, items, steps since the last log

    def on_train_begin(self, args: Any, state: Any, control: Any, model=None, **kwargs):
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise RuntimeError(
                "FairnessLossCallback supports single-process and DDP training; FSDP and DeepSpeed shard "
                "the parameters or own their gradients. Train with DDP or on one process."
            )
        _process_group(args)  # refuse an unsynchronisable multi-process run before the first step
        if self.swap is not None and model is not None and self.weight > 0:
            anchor_for(model, self.reference)  # no anchor: refused before the first step
        self._sums = [0.0, 0.0, 0.0, 0, 0]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model=None, **kwargs):
        if self.weight == 0 or model is None:
            return
        rank, world = _process_group(args)
        batch = self.cycle.batch(state.global_step)
        params = [p for p in model.parameters() if p.requires_grad]
        n, share = len(batch), batch[rank::world]
        pairs = anchor = None
        if self.swap is not None:
            pairs, anchor = self.swap.pairs(share, state.global_step), anchor_for(model, self.reference)
        grads, sums = fairness_gradients(
            model, self.tokenizer, share, params, n, objective=self.objective, pairs=pairs, anchor=anchor
        )
        if world > 1:  # each rank holds its share of the batch's sums: their sum is the batch's
            for g in grads:
                torch.distributed.all_reduce(g)
            totals = torch.tensor(sums, dtype=torch.float64, device=grads[0].device)
            torch.distributed.all_reduce(totals)
            sums = totals.tolist()
        squares, gaps, signed = sums
        # "mean": grads hold d/dθ mean(d); the gradient of mean(d) ** 2 is 2 mean(d) times it
        scale = self.weight * (2 * signed / n if self.objective == "mean" else 1.0)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g.mul_(scale)
                else:
                    p.grad.add_(g, alpha=scale)
        loss = (signed / n) ** 2 if self.objective == "mean" else squares / n
        s = self._sums
        self._sums = [s[0] + loss, s[1] + gaps, s[2] + signed, s[3] + n, s[4] + 1]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs):
        # DefaultFlowCallback (first in the list) has decided whether the Trainer logs at this step
        if getattr(control, "should_log", False) and self._sums[4]:
            loss, gaps, signed, n, steps = self._sums
            scalars = {"fairness_loss": loss / steps}
            if self.swap is None:
                scalars |= {"fairness_gap": gaps / n, "fairness_mean_gap": signed / n}
            self.log_scalars(args, state, scalars)
            self._sums = [0.0, 0.0, 0.0, 0, 0]
