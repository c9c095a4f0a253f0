"""Refit the kept input columns of ``down_proj`` / ``o_proj`` after width or head pruning.

When a layer keeps only the inputs ``S`` of a projection ``W`` (``[out, in]``), the kept columns are
refit so the pruned layer reproduces the unpruned output on calibration inputs ``x_t``. With the
streamed Gram ``G = sum_t x_t x_t^T`` (real tokens only; float32 per batch, summed in float64), ridge toward the original columns

    minimise  sum_t ||W x_t - W' x_{S,t}||^2 + lam ||W' - W_S||^2

has the closed form (set the gradient ``-(W X - W' X_S) X_S^T + lam (W' - W_S)`` to zero and use
``W X X_S^T = W_S G_SS + W_R G_RS``)

    W' = W_S + W_R G_RS (G_SS + lam I)^-1,   lam = damping * mean(diag G_SS),

solved by Cholesky in float64. ``R`` are the removed inputs. The Gram includes the inputs' mean, so a
separate FLAP-style bias (``W_R E[x_R]``) is not added: the refit already moves the mean into the kept
columns, and most families (Qwen2, Mistral, Gemma, Gemma2, Qwen3) cannot hold a ``down_proj`` bias and
still reload with plain ``from_pretrained`` (LLaMA only through ``mlp_bias``, which adds gate/up biases
too).

A PEFT LoRA projection keeps its adapter factors (sliced by :mod:`.surgery`); the base weight absorbs
the refit so that ``base + scale * B @ A[:, S]`` equals the refit of the effective weight.

Everything is planned first (:func:`plan_refits` raises on a singular system naming the layer), then
:func:`apply_refits` writes weights, after the surgery has cut the shapes.

Example:
    >>> refits = plan_refits(model, "mlp", {0: keep}, grams, damping=0.01)  # doctest: +SKIP
    >>> apply_width_plan(model, {0: keep}); apply_refits(model, refits)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..arch import ModelAdapter, get_adapter, is_conv1d, weight_out_in
from ..names import DEFAULT_DAMPING
from .calibration import CalibrationBatch, _all_reduce_, _hooks, _run

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DAMPING",
    "RECONSTRUCT_KINDS",
    "gram_hook",
    "collect_grams",
    "refit_columns",
    "plan_refits",
    "apply_refits",
    "refit_target",
    "effective_weight",
    "check_calibration_size",
    "check_damping",
    "check_undamped_tokens",
]

RECONSTRUCT_KINDS = ("mlp", "attention")
# relative pivot below which G_SS + lam I counts as singular (float64 has ~1e-16 resolution)
_MIN_PIVOT = 1e-12


def refit_target(adapter: ModelAdapter, kind: str, layer: int | nn.Module) -> nn.Module:
    """The projection whose input columns are refit: ``down_proj``/``fc2`` (``"mlp"``) or ``o_proj``.

    ``layer`` is an index or a decoder block module (e.g. a copy used by sequential calibration).
    """
    if kind not in RECONSTRUCT_KINDS:
        raise ValueError(f"kind must be one of {RECONSTRUCT_KINDS}, got {kind!r}.")
    block = adapter.layers[layer] if isinstance(layer, int) else layer
    return adapter.block_mlp(block).down if kind == "mlp" else adapter.block_attention(block).o


def gram_hook(key, grams: dict, current: dict):
    """A forward pre-hook adding ``x^T x`` (real tokens of ``current["mask"]``) into ``grams[key]``.

    Each batch's product is taken in float32 and summed across batches in float64: a float64 matmul
    costs about 1.8x a float32 one on CPU (the Gram is the refit's largest cost, about half a forward
    pass's FLOPs), and one batch's float32 product is within ~1e-7 relative of float64, far below the
    ridge damping; the float64 sum keeps the error from growing with the number of batches.
    """

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])[current["mask"].reshape(-1).bool()].float()
        gram = (x.t() @ x).double().cpu()
        grams[key] = grams[key] + gram if key in grams else gram

    return hook


def collect_grams(
    model: nn.Module,
    batches: list[CalibrationBatch],
    kind: str,
    layers: Iterable[int],
    *,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Input Gram (``[in, in]`` float64) of each layer's refit projection, in one pass over ``batches``.

    Example:
        >>> grams = collect_grams(model, batches, "mlp", [0, 1])  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    grams: dict[int, torch.Tensor] = {}
    current: dict = {}
    handles = [
        refit_target(adapter, kind, i).register_forward_pre_hook(gram_hook(i, grams, current)) for i in layers
    ]
    with _hooks(handles):
        _run(model, batches, show_progress, f"{kind} Gram statistics", current)
    _all_reduce_(grams.values())
    return grams


def damped_cholesky(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, float] | None:
    """Cholesky factor of ``gram + lam I`` with ``lam = damping * mean(diag(gram))``, and ``lam``; None when
    the system is singular or too ill-conditioned to solve (a pivot below 1e-12 of the largest diagonal).
    The refits of the MLP/attention axes and of the hidden axis share it.

    Example:
        >>> chol, lam = damped_cholesky(torch.eye(2, dtype=torch.float64), 0.01)
        >>> round(lam, 3), chol.shape
        (0.01, torch.Size([2, 2]))
    """
    lam = damping * float(gram.diagonal().mean())
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    chol, info = torch.linalg.cholesky_ex(system)
    scale = float(system.diagonal().max())
    if info.item() != 0 or not scale > 0 or float(chol.diagonal().min()) ** 2 < _MIN_PIVOT * scale:
        return None
    return chol, lam


def refit_columns(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float, name: str = "layer"
) -> torch.Tensor:
    """``W_S + W_R G_RS (G_SS + lam I)^-1`` in float64 (``weight`` is ``[out, in]``, ``keep`` sorted).

    Raises ``ValueError`` naming ``name`` when ``G_SS + lam I`` is not numerically positive definite.

    Example:
        >>> w, x = torch.randn(3, 4), torch.randn(4, 50)
        >>> refit_columns(w, x @ x.T, torch.tensor([0, 1, 2, 3]), 0.0).allclose(w.double())
        True
    """
    w = weight.detach().double().cpu()
    gram = gram.double().cpu()
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[keep] = False
    if not removed.any():
        return w.clone()
    factor = damped_cholesky(gram[keep][:, keep], damping)
    if factor is None:
        raise ValueError(
            f"{name}: the calibration Gram of the kept inputs is singular or ill-conditioned "
            f"(damping={damping}); pass a larger damping (e.g. 0.01) or more calibration tokens."
        )
    chol, _ = factor
    g_sr = gram[keep][:, removed]  # = G_RS^T
    # W' ^T = W_S^T + (G_SS + lam I)^-1 G_SR W_R^T
    correction = torch.cholesky_solve(g_sr @ w[:, removed].t(), chol)
    return w[:, keep] + correction.t()


def _lora_delta(module: nn.Module) -> torch.Tensor | None:
    """``sum scale * B @ A`` of a LoRA layer's active adapters as ``[out, in]`` float64 (None if plain)."""
    if getattr(module, "base_layer", None) is None:
        return None
    if getattr(module, "merged", False):
        raise ValueError("Cannot refit a LoRA layer whose adapters are merged: unmerge it first.")
    if any(getattr(module, "use_dora", {}).values()):
        raise ValueError("Cannot refit a DoRA layer exactly (its column norms change): merge it first.")
    delta = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        part = module.scaling[name] * (
            module.lora_B[name].weight.detach().double() @ module.lora_A[name].weight.detach().double()
        )
        delta = part if delta is None else delta + part
    return delta


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` float64 weight the projection applies: the base weight plus active LoRA deltas."""
    w = weight_out_in(getattr(module, "base_layer", module)).detach().double()
    delta = _lora_delta(module)
    return w if delta is None else w + delta.to(w.device)


def plan_refits(
    model: nn.Module,
    kind: str,
    keep_columns: dict[int, torch.Tensor],
    grams: dict[int, torch.Tensor],
    damping: float = DEFAULT_DAMPING,
) -> dict[int, torch.Tensor]:
    """New effective ``[out, kept]`` float64 weight of each layer's refit projection. Changes nothing.

    Example:
        >>> refits = plan_refits(model, "mlp", {0: torch.tensor([0, 2])}, grams)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    check_damping(damping)
    return {
        i: refit_columns(
            effective_weight(refit_target(adapter, kind, i)),
            grams[i],
            keep,
            damping,
            name=f"layer {i} {kind} refit",
        )
        for i, keep in keep_columns.items()
    }


def apply_refits(model: nn.Module, kind: str, refits: dict[int, torch.Tensor], blocks=None) -> None:
    """Write planned refits into the (already sliced) projections; the LoRA delta stays in its factors.

    ``blocks`` optionally maps layer index to the block module to write into (default the model's).

    Example:
        >>> apply_refits(model, "mlp", refits)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    for i, weight in refits.items():
        module = refit_target(adapter, kind, blocks[i] if blocks is not None else i)
        delta = _lora_delta(module)
        base = getattr(module, "base_layer", module)
        target = weight if delta is None else weight - delta.cpu()
        if tuple(target.shape) != tuple(weight_out_in(base).shape):
            raise RuntimeError(
                f"Layer {i}: refit weight {tuple(target.shape)} does not match the sliced projection "
                f"{tuple(weight_out_in(base).shape)}; apply the pruning plan before the refit."
            )
        stored = target.t() if is_conv1d(base) else target
        with torch.no_grad():
            base.weight.data.copy_(stored.to(base.weight.dtype))


def check_damping(damping: Any) -> None:
    """Refuse a ridge strength that is not a finite number >= 0 (every refit and the pipeline's
    ``damping`` key go through this one rule).

    Example:
        >>> check_damping(0.0)
    """
    bad = isinstance(damping, bool) or not isinstance(damping, (int, float))
    if bad or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a number >= 0 (default {DEFAULT_DAMPING}), got {damping!r}.")


def check_undamped_tokens(
    tokens: int,
    kept_inputs: int,
    damping: float,
    *,
    setting: str = "damping=0",
    counted: str = "real calibration tokens",
    at_most: bool = False,
) -> None:
    """Refuse an undamped refit on fewer tokens than kept inputs (its Gram is then singular). The
    pipeline's pre-flight applies the same rule to the tokens it will read, worded with its keys
    (``at_most``: ``kept_inputs`` is an upper bound, the unpruned width).

    Example:
        >>> check_undamped_tokens(64, 128, 0.0)
        Traceback (most recent call last):
        ValueError: reconstruct with damping=0 needs at least as many real calibration tokens as kept inputs (128); got 64. Give more calibration data or damping > 0 (e.g. 0.01).
    """
    if damping == 0 and tokens < kept_inputs:
        raise ValueError(
            f"reconstruct with {setting} needs at least as many {counted} as kept inputs "
            f"({'up to ' if at_most else ''}{kept_inputs}); got {tokens}. Give more calibration data or "
            f"damping > 0 (e.g. {DEFAULT_DAMPING})."
        )


def check_calibration_size(batches: list[CalibrationBatch], system_size: int, damping: float) -> int:
    """Number of real calibration tokens; raise/warn when they are too few for ``system_size`` unknowns.

    With ``damping == 0`` fewer tokens than kept inputs make the Gram singular: an error. With damping,
    fewer than four tokens per kept input overfits the calibration text (measured: an undamped refit on
    ~1.6 tokens per input raised the demo's perplexity from 48 to 74): a warning.
    """
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    check_undamped_tokens(tokens, system_size, damping)
    if tokens < 4 * system_size:
        logger.warning(
            "Refitting %d kept inputs per layer on only %d calibration tokens may overfit the "
            "calibration text; give at least %d tokens.",
            system_size,
            tokens,
            4 * system_size,
        )
    return tokens
