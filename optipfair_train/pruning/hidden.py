"""The hidden-dimension axis: remove residual-stream channels from the whole model.

:func:`plan_hidden` scores every residual channel and chooses the kept ones (it changes nothing);
:func:`apply_hidden` then cuts every tensor that reads or writes the residual stream: the embedding's
columns, every norm, the input columns of q/k/v/gate/up, the output rows (and biases) of o_proj/down_proj,
the LM head's columns (a tied head is the embedding and is cut with it), ``config.hidden_size``, PEFT
LoRA factors and optimizer state. ``head_dim`` never changes (it is written into the config explicitly).

Scores (Minitron's activation importance): the output of every norm that reads the residual stream
(each block's pre-attention and pre-MLP norm, and the final norm), summed over real calibration tokens
as ``|y|`` (``activation``) or per norm as ``sqrt(sum y^2)`` (``activation_l2``), then summed over
norms; streamed, never storing a ``[batch, seq, dim]`` tensor. Without data, the embedding's column norms
(``L2``, weight-only, with a warning). ``pca`` first carries the stream in the basis of its principal
components and keeps the strongest directions (untied heads only; :mod:`.hidden_rotation`).

Why norms are rescaled: an RMSNorm divides by ``sqrt(mean_d(x^2) + eps)``. After keeping ``d'`` of ``d``
channels the mean runs over ``d'``. When the removed channels carry zero, the sum of squares is unchanged,
so ``mean_d'(x^2) + eps d/d' = (d/d') (mean_d(x^2) + eps)``: with ``eps' = eps d/d'`` and every norm's
scale multiplied by ``sqrt(d/d')`` the norm's output on the kept channels is unchanged, and the logits are
equal. Gemma's norms scale by ``1 + w``, so ``1 + w' = (1 + w) sqrt(d/d')``. Gemma multiplies the
embedding by ``sqrt(hidden_size)``, which a reload computes from ``d'``: the embedding absorbs
``sqrt(d/d')``; a tied head then scales the logits by the same factor, which the final norm takes back
(its scale is left as it was). Channels that do carry signal are lost, and the RMS is then taken over
what remains: that is the one-shot error this axis trades for its parameters.
``config.rms_norm_eps`` is shared by all norms, so Qwen3's per-head ``q_norm``/``k_norm`` (head_dim wide,
not cut) get ``eps d/d'`` too; q_proj and k_proj outputs (weights, biases, LoRA ``B``) are multiplied by
``sqrt(d/d')`` so those norms' outputs are unchanged as well (they only read q_proj/k_proj).

Adam moments of rescaled parameters (norm scales, Gemma's embedding) are sliced, not rescaled.
LayerNorm families (GPT-2, OPT, Phi) are refused: LayerNorm subtracts the mean over channels, so even
channels that carry nothing change every output when removed.

Example:
    >>> plan = plan_hidden(model, pruning_percentage=10, batches=batches)  # doctest: +SKIP
    >>> slices = apply_hidden(model, plan, optimizer=trainer.optimizer)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import (
    FAMILIES,
    ModelAdapter,
    UnsupportedModelError,
    get_adapter,
)
from .calibration import CalibrationBatch, _all_reduce_, _hooks, _run
from .hidden_cut import cut_hidden_block, cut_hidden_outside_blocks
from .hidden_rotation import check_rotatable, rotate_stream, rotation_basis
from .surgery import ParamSlice, slice_optimizer_state

logger = logging.getLogger(__name__)

__all__ = [
    "HIDDEN_METHODS",
    "HiddenPlan",
    "hidden_channel_scores",
    "hidden_keep_count",
    "plan_hidden",
    "plan_from_scores",
    "apply_hidden",
    "channel_statistics_hook",
    "combine_channel_statistics",
]

HIDDEN_METHODS = ("activation", "activation_l2", "L2", "pca")


@dataclass
class HiddenPlan:
    """Residual channels to keep: ``keep`` (sorted indices) of a model whose hidden size is ``hidden_size``."""

    keep: torch.Tensor
    hidden_size: int
    method: str = "custom"
    scores: torch.Tensor | None = None
    rotation: torch.Tensor | None = None  # [d, d] orthogonal basis the stream is carried in first ('pca')

    def summary(self) -> dict:
        """JSON-serialisable description for the pruning history."""
        return {
            "method": self.method,
            "hidden_size_before": self.hidden_size,
            "hidden_size": len(self.keep),
            "kept_channels": self.keep.tolist(),
            "rotated": self.rotation is not None,
        }


def _supported_adapter(model: nn.Module) -> ModelAdapter:
    adapter = get_adapter(model)
    if not adapter.has_hidden_axis:
        names = ", ".join(f.name for f in FAMILIES if f.final_norm is not None)
        raise UnsupportedModelError(
            f"Hidden-dimension pruning supports the RMSNorm families ({names}); {adapter.family.name} uses "
            "LayerNorm, whose mean over channels changes when any channel is removed."
        )
    return adapter


def _norm_modules(adapter: ModelAdapter) -> list[nn.Module]:
    """Norms that read the residual stream: each block's residual norms, then the final norm."""
    return [n for i in range(adapter.num_layers) for n in adapter.block_norms(i)[0]] + [adapter.final_norm()]


def hidden_channel_scores(
    model: nn.Module,
    batches: list[CalibrationBatch] | None = None,
    method: str = "activation",
    *,
    show_progress: bool = False,
) -> torch.Tensor:
    """Importance of each residual channel (``[hidden_size]`` float64; higher = keep).

    ``activation``: sum over norms of the mean ``|y|`` of their outputs over real tokens; ``activation_l2``:
    sum over norms of ``sqrt(sum_t y^2)``; ``L2``: the embedding's column norms (no data). (``pca`` scores
    rotated directions, not channels: see :mod:`.hidden_rotation`.)

    Example:
        >>> hidden_channel_scores(model, batches).shape  # doctest: +SKIP
        torch.Size([576])
    """
    adapter = _supported_adapter(model)
    if method not in HIDDEN_METHODS:
        raise ValueError(
            f"Unknown hidden channel method {method!r}; choose one of {', '.join(HIDDEN_METHODS)}."
        )
    if method == "pca":
        raise ValueError("method 'pca' scores rotated directions: use plan_hidden(..., method='pca').")
    if method == "L2":
        return adapter.model.get_input_embeddings().weight.detach().double().norm(dim=0).cpu()
    if batches is None:
        raise ValueError(f"method {method!r} reads calibration data: pass batches (or use 'L2').")
    norms = _norm_modules(adapter)
    sums = torch.zeros(len(norms), adapter.hidden_size, dtype=torch.float64)
    tokens = torch.zeros(1, dtype=torch.float64)
    current: dict = {}
    handles = [
        norm.register_forward_hook(channel_statistics_hook(k, method, sums, tokens, current))
        for k, norm in enumerate(norms)
    ]
    with _hooks(handles):
        _run(model, batches, show_progress, "hidden channel statistics", current)
    return combine_channel_statistics(sums, tokens, method)


def channel_statistics_hook(k: int, method: str, sums: torch.Tensor, tokens: torch.Tensor, current: dict):
    """Forward hook adding norm ``k``'s output statistic to ``sums[k]`` (and, for ``k == 0``, the real
    token count to ``tokens``); the batch's mask is read from ``current["mask"]``. Shared by
    :func:`hidden_channel_scores` and the streamed planner (:mod:`.streamed_hidden`)."""

    def hook(module, args, output):
        mask = current["mask"].reshape(-1).bool()
        y = output.reshape(-1, output.shape[-1])[mask].float()
        sums[k] += (y.abs() if method == "activation" else y * y).sum(dim=0).double().cpu()
        if k == 0:
            tokens[0] += int(mask.sum())

    return hook


def combine_channel_statistics(sums: torch.Tensor, tokens: torch.Tensor, method: str) -> torch.Tensor:
    """Per-channel score from the per-norm sums of :func:`channel_statistics_hook` (all-reduced first).

    Example:
        >>> combine_channel_statistics(torch.ones(2, 3), torch.tensor([2.0]), "activation")
        tensor([1., 1., 1.])
    """
    _all_reduce_([sums, tokens])
    return (sums / tokens).sum(dim=0) if method == "activation" else sums.sqrt().sum(dim=0)


def _check_config(adapter: ModelAdapter, kept: int) -> None:
    """Refuse a width the family's config rejects (LLaMA and Gemma2 need a multiple of the head count)."""
    trial = copy.deepcopy(adapter.config)
    trial.hidden_size = kept
    try:
        trial.validate()
    except Exception as err:  # the config's own validation error, whatever its class
        raise ValueError(
            f"A hidden size of {kept} is not a valid {adapter.family.name} configuration ({err}); keep a "
            f"multiple of num_attention_heads ({adapter.config.num_attention_heads})."
        ) from err


def hidden_keep_count(
    model: nn.Module,
    pruning_percentage: float | None = None,
    keep: int | None = None,
    divisor: int | None = None,
) -> int:
    """How many residual channels to keep, checked against the family's config.

    ``pruning_percentage`` removes ``int(p / 100 * d)`` channels, then the count is rounded down to a
    multiple of ``divisor`` (default ``num_attention_heads``, which LLaMA and Gemma2 configs require);
    ``keep`` gives the count directly (not rounded).

    Example:
        >>> hidden_keep_count(model, pruning_percentage=10)  # d=64, 4 heads: 58 rounded down  # doctest: +SKIP
        56
    """
    adapter = _supported_adapter(model)
    d = adapter.hidden_size
    if (pruning_percentage is None) == (keep is None):
        raise ValueError(
            f"Give exactly one of pruning_percentage and keep (got {pruning_percentage!r}, {keep!r})."
        )
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < d:
            raise ValueError(f"keep must be an integer number of channels in [1, {d - 1}], got {keep!r}.")
        kept = keep
    else:
        if isinstance(pruning_percentage, bool) or not isinstance(pruning_percentage, (int, float)):
            raise ValueError(f"pruning_percentage must be a number, got {pruning_percentage!r}.")
        if not 0 < pruning_percentage < 100:
            raise ValueError(
                f"pruning_percentage must be strictly between 0 and 100, got {pruning_percentage}."
            )
        divisor = adapter.config.num_attention_heads if divisor is None else divisor
        if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
            raise ValueError(f"divisor must be a positive integer, got {divisor!r}.")
        # the epsilon keeps 25.000000000000004% from flooring a channel away through float error
        kept = (d - int(pruning_percentage / 100 * d + 1e-9)) // divisor * divisor
        if kept < 1:
            raise ValueError(
                f"pruning_percentage={pruning_percentage} with divisor {divisor} keeps 0 of {d} channels; "
                "remove less or use a smaller divisor."
            )
    _check_config(adapter, kept)
    return kept


def plan_hidden(
    model: nn.Module,
    *,
    pruning_percentage: float | None = None,
    keep: int | None = None,
    divisor: int | None = None,
    method: str | None = None,
    batches: list[CalibrationBatch] | None = None,
    show_progress: bool = False,
) -> HiddenPlan:
    """Choose the residual channels to keep (highest scores). Changes nothing.

    ``method`` defaults to ``activation`` with ``batches`` and to weight-only ``L2`` without (a warning
    says so). See :func:`hidden_keep_count` for ``pruning_percentage`` / ``keep`` / ``divisor``.

    Example:
        >>> plan = plan_hidden(model, pruning_percentage=20, batches=batches)  # doctest: +SKIP
        >>> apply_hidden(model, plan)  # doctest: +SKIP
    """
    kept = hidden_keep_count(model, pruning_percentage, keep, divisor)
    if method is None:
        method = "activation" if batches is not None else "L2"
        if batches is None:
            logger.warning(
                "Choosing hidden channels from the embedding's column norms because no calibration data "
                "was given; activation statistics of the norms ('activation') need a few batches."
            )
    if method == "pca":
        adapter = get_adapter(model)
        check_rotatable(adapter)
        if batches is None:
            raise ValueError("method 'pca' reads calibration data: pass batches.")
        rotation, energy = rotation_basis(model, adapter, batches, show_progress=show_progress)
        return HiddenPlan(torch.arange(kept), adapter.hidden_size, method, energy, rotation)
    scores = hidden_channel_scores(model, batches, method, show_progress=show_progress)
    return plan_from_scores(scores, kept, method)


def plan_from_scores(scores: torch.Tensor, kept: int, method: str = "custom") -> HiddenPlan:
    """Keep the ``kept`` highest-scoring channels (ties: the lower index first).

    Example:
        >>> plan_from_scores(torch.tensor([0.5, 2.0, 1.0, 2.0]), 2).keep
        tensor([1, 3])
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return HiddenPlan(order[:kept].sort().values, len(scores), method, scores)


def _check_plan(adapter: ModelAdapter, plan: HiddenPlan, optimizer) -> torch.Tensor:
    d = adapter.hidden_size
    if plan.rotation is not None:
        check_rotatable(adapter, optimizer)
        q = plan.rotation.double()
        if q.shape != (d, d) or not torch.allclose(q.t() @ q, torch.eye(d, dtype=torch.float64), atol=1e-6):
            raise ValueError(f"plan.rotation must be an orthogonal [{d}, {d}] matrix.")
    if plan.hidden_size != d:
        raise ValueError(f"The plan was made for hidden size {plan.hidden_size}; the model's is {d}.")
    keep = torch.as_tensor(plan.keep, dtype=torch.long).cpu()
    if keep.dim() != 1 or not 1 <= len(keep) < d:
        raise ValueError(f"A hidden plan keeps between 1 and {d - 1} channels, got {tuple(keep.shape)}.")
    if keep.min() < 0 or keep.max() >= d or len(keep.unique()) != len(keep):
        raise ValueError(f"Kept channels must be distinct indices in [0, {d - 1}].")
    _check_config(adapter, len(keep))
    embedding = adapter.model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"The input embedding is a {type(embedding).__name__}: merge or remove adapters on the "
            "embedding before hidden-dimension pruning."
        )
    for module in adapter.model.modules():
        if any(getattr(module, "use_dora", {}).values()):
            raise ValueError("Cannot slice a DoRA layer exactly (its column norms change): merge it first.")
    return keep.sort().values


def apply_hidden(
    model: nn.Module, plan: HiddenPlan, optimizer: torch.optim.Optimizer | None = None
) -> list[ParamSlice]:
    """Keep only the residual channels ``plan.keep`` everywhere in ``model`` (in place).

    Everything is checked before the first weight changes. ``optimizer`` state is sliced like the
    weights (the same ``nn.Parameter`` objects survive). Returns every slice made.

    Example:
        >>> apply_hidden(model, HiddenPlan(torch.tensor([0, 2, 3]), hidden_size=4))  # doctest: +SKIP
    """
    adapter = _supported_adapter(model)
    keep = _check_plan(adapter, plan, optimizer)
    if plan.rotation is not None:  # the same function in the rotated basis; then its first d_new coordinates
        rotate_stream(adapter, plan.rotation)
    slices = [s for i in range(adapter.num_layers) for s in cut_hidden_block(adapter, i, keep)]
    slices += cut_hidden_outside_blocks(adapter, keep)
    if optimizer is not None:
        slice_optimizer_state(optimizer, slices)
    logger.info("Hidden size %d -> %d (%s)", plan.hidden_size, len(keep), plan.method)
    return slices
