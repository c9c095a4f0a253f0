"""Refit the projections that read a pruned residual stream (after :mod:`.hidden`).

Removing residual channels ``R`` changes what every norm reading the stream hands on: its kept outputs
are rescaled per token, because the RMS now runs over the kept channels only. With the scales and
epsilon of :func:`~optipfair_train.pruning.hidden.apply_hidden`, the pruned norm's output on the kept
channels ``S`` is exactly ``x'_t = r_t x_{S,t}`` with

    r_t = sqrt((sum_all h_t^2 / d + eps) / (sum_S h_t^2 / d + eps))

(``h_t`` the norm's input, ``x_t`` its unpruned output). Each projection ``W`` (``[out, d]``) reading that
norm (q/k/v, gate/up, and an untied LM head) is refit so that ``W' x'_t`` reproduces ``W x_t`` on the
calibration tokens, by ridge toward the kept columns:

    minimise sum_t ||W x_t - W' x'_t||^2 + lam ||W' - W_S||^2
    W' = (W C + lam W_S) (G + lam I)^-1,   C = sum_t x_t x'_t^T,  G = sum_t x'_t x'_t^T,

``lam = damping * mean(diag G)``, solved by Cholesky in float64. This recovers what the removed channels
carried in so far as the kept channels predict it (the residual stream is strongly correlated). Nothing
sound refits o_proj/down_proj: they lose output rows, and their kept rows already write exactly what they
wrote before; what is lost lives in the removed channels, and its effect downstream is what the refit of
the readers addresses. A tied head is not refit (it is the embedding; refitting it would untie it), nor
are Gemma2's post-norms (they read sublayer outputs, whose RMS changes too).

Example:
    >>> refits = plan_hidden_refit(model, plan, batches)  # doctest: +SKIP
    >>> apply_hidden(model, plan); apply_hidden_refit(model, refits)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..arch import ModelAdapter, get_adapter, is_conv1d, weight_out_in
from .calibration import CalibrationBatch, _all_reduce_, _hooks, _run
from .hidden import HiddenPlan, apply_hidden, plan_hidden
from .hidden_rotation import stream_readers
from .reconstruction import (
    DEFAULT_DAMPING,
    _lora_delta,
    check_calibration_size,
    check_damping,
    damped_cholesky,
)

logger = logging.getLogger(__name__)

__all__ = [
    "plan_hidden_refit",
    "apply_hidden_refit",
    "prune_hidden",
    "refit_statistics_hook",
    "solve_hidden_refit",
]

REFIT_ROWS = 4096  # output rows solved at once (bounds the float64 temporaries of a 128k-row LM head)


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))


def plan_hidden_refit(
    model: nn.Module,
    plan: HiddenPlan,
    batches: list[CalibrationBatch],
    damping: float = DEFAULT_DAMPING,
    *,
    show_progress: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """New ``[out, kept]`` float64 effective weights of every projection reading a pruned norm, computed
    on the unpruned model before :func:`~optipfair_train.pruning.hidden.apply_hidden`. Changes nothing.

    Raises ``ValueError`` naming the norm when its system is singular (give damping or more tokens).

    Example:
        >>> refits = plan_hidden_refit(model, plan, batches, damping=0.01)  # doctest: +SKIP
    """
    check_damping(damping)
    adapter = get_adapter(model)
    keep = torch.as_tensor(plan.keep, dtype=torch.long)
    targets = stream_readers(adapter)
    sums: dict[str, dict[str, torch.Tensor]] = {}
    current: dict = {}
    handles = [
        norm.register_forward_hook(refit_statistics_hook(name, norm, keep, sums, current))
        for name, (norm, _) in targets.items()
    ]
    with _hooks(handles):
        _run(model, batches, show_progress, "hidden refit statistics", current)
    return {
        name: solve_hidden_refit(adapter, name, projections, keep, sums[name], damping)
        for name, (_, projections) in targets.items()
    }


def refit_statistics_hook(
    name: str, norm: nn.Module, keep: torch.Tensor, sums: dict[str, dict[str, torch.Tensor]], current: dict
):
    """Forward hook on a norm reading the stream: adds ``C = sum_t x_t x'_t^T`` and ``G = sum_t x'_t
    x'_t^T`` of this batch's real tokens (mask from ``current["mask"]``) to ``sums[name]``. Shared by
    :func:`plan_hidden_refit` and the streamed planner (:mod:`.streamed_hidden`)."""
    eps = _norm_eps(norm)

    def hook(module, args, output):
        d = output.shape[-1]
        mask = current["mask"].reshape(-1).bool()
        h = args[0].reshape(-1, d)[mask].double()
        x = output.reshape(-1, d)[mask].double()
        squares = h * h
        kept_sum = squares[:, keep.to(h.device)].sum(-1)
        ratio = ((squares.sum(-1) / d + eps) / (kept_sum / d + eps)).sqrt()
        x_new = x[:, keep.to(x.device)] * ratio[:, None]
        acc = sums.setdefault(name, {})
        acc["cross"] = acc.get("cross", 0) + (x.t() @ x_new).cpu()
        acc["gram"] = acc.get("gram", 0) + (x_new.t() @ x_new).cpu()

    return hook


def solve_hidden_refit(
    adapter: ModelAdapter,
    name: str,
    projections: list[nn.Module],
    keep: torch.Tensor,
    sums: dict[str, torch.Tensor],
    damping: float,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """The refit ``[out, kept]`` float64 weights of the (unpruned) ``projections`` reading norm ``name``
    from its :func:`refit_statistics_hook` sums (all-reduced here).

    Rows are solved :data:`REFIT_ROWS` at a time, so a large LM head never has more than that many rows
    in float64 temporaries; with ``dtype`` (plain projections only: a LoRA delta is subtracted later in
    float64) each block of rows is stored in that dtype at once, as it will be written.
    Raises ``ValueError`` naming the norm when its system is singular.

    Example:
        >>> solve_hidden_refit(adapter, "head", [model.lm_head], keep, sums["head"], 0.01)  # doctest: +SKIP
    """
    _all_reduce_([sums["cross"], sums["gram"]])
    factor = damped_cholesky(sums["gram"], damping)
    if factor is None:
        raise ValueError(
            f"{name}: the calibration Gram of the pruned norm output is singular (damping={damping}); "
            "pass a larger damping (e.g. 0.01) or more calibration tokens."
        )
    chol, lam = factor
    # Qwen3: apply_hidden multiplies q/k outputs by sqrt(d / d') for their per-head norms
    qk_factor = math.sqrt(adapter.hidden_size / len(keep)) if adapter.family.qk_norm else 1.0
    new = []
    for k, projection in enumerate(projections):
        weight, delta = weight_out_in(getattr(projection, "base_layer", projection)), _lora_delta(projection)
        factor = qk_factor if name.endswith("attention") and k < 2 else 1.0
        result = torch.empty(weight.shape[0], len(keep), dtype=dtype or torch.float64)
        for start in range(0, weight.shape[0], REFIT_ROWS):
            rows = slice(start, start + REFIT_ROWS)
            w = weight[rows].detach().double()
            w = (w if delta is None else w + delta[rows].to(w.device)).cpu()
            rhs = w @ sums["cross"] + lam * w[:, keep]  # W' (G + lam I) = W C + lam W_S
            result[rows] = torch.cholesky_solve(rhs.t(), chol).t() * factor
        new.append(result)
    return new


def apply_hidden_refit(model: nn.Module, refits: dict[str, list[torch.Tensor]]) -> None:
    """Write planned refits into the (already pruned) projections; a LoRA delta stays in its factors.

    Example:
        >>> apply_hidden_refit(model, refits)  # doctest: +SKIP
    """
    targets = stream_readers(get_adapter(model))
    for name, weights in refits.items():
        for projection, weight in zip(targets[name][1], weights, strict=True):
            delta = _lora_delta(projection)
            base = getattr(projection, "base_layer", projection)
            target = weight if delta is None else weight - delta.cpu()
            if tuple(target.shape) != tuple(weight_out_in(base).shape):
                raise RuntimeError(
                    f"{name}: refit weight {tuple(target.shape)} does not match the pruned projection "
                    f"{tuple(weight_out_in(base).shape)}; apply the hidden plan before the refit."
                )
            stored = target.t() if is_conv1d(base) else target
            with torch.no_grad():
                base.weight.data.copy_(stored.to(base.weight.dtype))


def prune_hidden(
    model: nn.Module,
    batches: list[CalibrationBatch] | None,
    *,
    pruning_percentage: float | None = None,
    keep: int | None = None,
    divisor: int | None = None,
    method: str | None = None,
    damping: float | None = None,
    show_progress: bool = False,
) -> tuple[HiddenPlan, list]:
    """Plan, (with ``damping`` not None) plan the refit, then cut and refit: everything that can fail
    runs before the first weight changes. Returns the plan and the parameter slices.

    Example:
        >>> plan, slices = prune_hidden(model, batches, pruning_percentage=10, damping=0.01)  # doctest: +SKIP
    """
    plan = plan_hidden(
        model,
        pruning_percentage=pruning_percentage,
        keep=keep,
        divisor=divisor,
        method=method,
        batches=batches,
        show_progress=show_progress,
    )
    if damping is not None and method == "pca":
        raise ValueError(
            "reconstruct=True is not available with method 'pca' (the refit reads axis-aligned channels)."
        )
    refits = {}
    if damping is not None:
        check_calibration_size(batches, len(plan.keep), damping)
        refits = plan_hidden_refit(model, plan, batches, damping, show_progress=show_progress)
    slices = apply_hidden(model, plan)
    apply_hidden_refit(model, refits)
    return plan, slices
