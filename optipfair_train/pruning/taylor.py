"""First-order Taylor (gradient) importance per MLP neuron, attention head and block.

Removing a unit whose weights are ``w`` changes the loss by about ``-sum(w * dL/dw)`` over those
weights. The score of a unit is that estimate's magnitude summed over batches:
``score_u = sum_b |sum_{w in u} w * g_b(w)|``, where ``g_b`` is the gradient of batch ``b``. Only one
running vector per layer and kind of unit is kept; no gradient is stored.

:class:`TaylorImportance` reads gradients the caller has already computed (a training loop, before
``zero_grad``), so it costs a few multiply-adds per weight; :func:`taylor_importance` computes them
itself on calibration batches (one-shot use).

Example:
    >>> taylor = TaylorImportance(model)  # doctest: +SKIP
    >>> loss.backward(); taylor.accumulate(); optimizer.step()  # doctest: +SKIP
    >>> taylor.neuron_scores()[0].shape  # (intermediate_size,)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ..arch import get_adapter, weight_out_in
from .calibration import CalibrationBatch

__all__ = ["TaylorImportance", "taylor_importance"]


def _contribution(linear: torch.nn.Module, dim: int, groups: int) -> torch.Tensor | None:
    """``sum(w * grad)`` over each of ``groups`` equal blocks of a Linear along ``dim`` (None without grad)."""
    weight = getattr(linear, "weight", None)  # linear is None for a fused projection (GPT-2's q)
    if weight is None or weight.grad is None:
        return None
    product = weight_out_in(linear, weight.detach().float() * weight.grad.float())
    if dim == 1:
        product = product.t()
    return product.reshape(groups, -1).sum(dim=1)


class TaylorImportance:
    """Accumulates first-order Taylor scores from gradients already on the model's weights."""

    def __init__(self, model: torch.nn.Module):
        self.adapter = get_adapter(model)
        self.batches = 0
        self.neurons: dict[int, torch.Tensor] = {}
        self.heads: dict[int, torch.Tensor] = {}
        self.blocks: torch.Tensor | None = None

    def _add(self, store: dict, key: int, value: torch.Tensor) -> None:
        value = value.abs().double().cpu()
        store[key] = store[key] + value if key in store else value

    @torch.no_grad()
    def accumulate(self) -> bool:
        """Add the current gradients' contribution. Returns False when the MLP weights carry no gradient
        (frozen, e.g. under LoRA), in which case nothing is added."""
        adapter = self.adapter
        blocks = torch.zeros(adapter.num_layers, dtype=torch.float64)
        seen = False
        for i in range(adapter.num_layers):
            mlp = adapter.mlp(i)
            width = mlp.intermediate_size
            parts = [_contribution(m, 0, width) for m in mlp.width_linears] + [
                _contribution(mlp.down, 1, width)
            ]
            if all(p is not None for p in parts):
                seen = True
                neuron = sum(parts)
                self._add(self.neurons, i, neuron)
                blocks[i] += neuron.sum().double()
            attention = adapter.attention(i)
            n_q, _, _ = adapter.head_counts(i)
            head_parts = [_contribution(attention.q, 0, n_q), _contribution(attention.o, 1, n_q)]
            if all(p is not None for p in head_parts):
                head = head_parts[0] + head_parts[1]
                self._add(self.heads, i, head)
                blocks[i] += head.sum().double()
        if seen:
            self.blocks = blocks.abs() if self.blocks is None else self.blocks + blocks.abs()
            self.batches += 1
        return seen

    def neuron_scores(self) -> dict[int, torch.Tensor]:
        """Per layer, one score per intermediate neuron."""
        return {i: v.float() for i, v in self.neurons.items()}

    def head_scores(self) -> dict[int, torch.Tensor]:
        """Per layer, one score per query head (q rows and o_proj columns of the head)."""
        return {i: v.float() for i, v in self.heads.items()}

    def block_scores(self) -> torch.Tensor:
        """One score per block (its MLP and query/output projections)."""
        if self.blocks is None:
            raise ValueError("No gradient has been accumulated yet.")
        return self.blocks.float()


@contextlib.contextmanager
def _weights_require_grad(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily make every weight trainable (a PEFT model freezes its base weights)."""
    params = list(model.parameters())
    previous = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def taylor_importance(
    model: torch.nn.Module, batches: list[CalibrationBatch], *, show_progress: bool = False
) -> TaylorImportance:
    """One-shot Taylor scores: forward + backward of the language-model loss on each batch.

    Padding positions are excluded from the loss (label -100). Gradients are cleared afterwards.

    Example:
        >>> scores = taylor_importance(model, as_batches(loader)).neuron_scores()  # doctest: +SKIP
    """
    accumulator = TaylorImportance(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the same scores on every run
    try:
        with _weights_require_grad(model):
            for batch in tqdm(batches, desc="taylor importance", disable=not show_progress):
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                labels = ids.masked_fill(mask == 0, -100)
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
                accumulator.accumulate()
    finally:
        model.train(was_training)
    return accumulator
