"""Linear replacement of a removed run of blocks, folded into the last kept block's MLP output projection.

After removing the consecutive blocks ``i+1 .. i+n``, the hidden state leaving block ``i`` is used
where the hidden state leaving block ``i+n`` used to be. A least-squares linear map ``T`` (ReplaceMe's
form) corrects that. With ``M`` the output of block ``i``'s ``down_proj``, ``Y`` block ``i``'s output
minus ``M`` (its residual stream before the MLP output is added) and ``L`` the hidden state leaving
the run, ``T`` minimises, over unmasked calibration tokens,

    ||M T + Y - L||^2 + damping * s * ||T - I||^2,   s = trace(M^T M) / hidden

(``damping`` pulls ``T`` toward the identity, i.e. toward plain removal, scale-free through ``s``).
Because ``M T = x (W^T T) + b T`` for ``down_proj(x) = x W^T + b``, the map folds exactly into the
weights: ``W <- T^T W`` and ``b <- T^T b``. The pruned model stays a plain model of its family and
reloads with ``from_pretrained``; no module is added. ``o_proj`` is left unchanged: the fit targets
the whole block output through the MLP term alone, which is what ReplaceMe does.

Only ``M^T M`` and ``M^T (L - Y)`` (``hidden x hidden``, float64) are kept, summed over batches and
all-reduced under ``torch.distributed``. A run that starts at block 0 has no block before it to fold
into; it is refused (``contiguous`` selection then only considers runs starting at block 1 or later).

Example:
    >>> fit = fit_linear_replacement(model, batches, [5, 6, 7, 8], damping=1e-3)  # doctest: +SKIP
    >>> remove_layers(adapter, [5, 6, 7, 8]); fold_linear_replacement(adapter, fit)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..arch import ModelAdapter, get_adapter, is_conv1d
from .calibration import CalibrationBatch, _all_reduce_, _hooks, _run

logger = logging.getLogger(__name__)

__all__ = ["LinearReplacement", "check_replaceable_run", "fit_linear_replacement", "fold_linear_replacement"]


@dataclass
class LinearReplacement:
    """A fitted map ``T`` (``[hidden, hidden]``, float64) for the removed run ``removed``, to fold into
    block ``layer``'s MLP output projection (``layer`` is an index of the model before removal, and
    also after it, since only later blocks go)."""

    layer: int
    removed: list[int]
    transform: torch.Tensor
    damping: float
    tokens: int
    relative_error: float  # ||M T + Y - L|| / ||L - Y|| on the calibration tokens
    identity_error: float  # the same with T = I (plain removal)

    def summary(self, adapter: ModelAdapter) -> dict[str, Any]:
        """JSON-ready description for the pruning event (what was folded where)."""
        f = adapter.family
        module = ".".join(p for p in (f.layers, str(self.layer), f.mlp, f.down) if p)
        return {
            "folded_into": module,
            "folded_into_layer": self.layer,
            "replaced_layers": list(self.removed),
            "damping": self.damping,
            "calibration_tokens": self.tokens,
            "relative_error": self.relative_error,
            "relative_error_without_map": self.identity_error,
        }


def check_replaceable_run(adapter: ModelAdapter, drop: Sequence[int]) -> int:
    """Validate that ``drop`` is one run of consecutive blocks that can be replaced; return the block
    before it (where the map is folded). Changes nothing.

    Example:
        >>> check_replaceable_run(adapter, [3, 4])  # doctest: +SKIP
        2
    """
    f = adapter.family
    drop = sorted(drop)
    if not drop or drop != list(range(drop[0], drop[0] + len(drop))):
        raise ValueError(
            f"replace_with_linear replaces one run of consecutive blocks, got {drop}: use "
            "layer_selection_method='contiguous', or 'custom' with consecutive layer_indices."
        )
    if drop[0] == 0:
        raise ValueError(
            "replace_with_linear cannot replace a run starting at block 0: the map is folded into the "
            "block before the run. Remove blocks starting at 1 or later."
        )
    if f.name == "gemma2":
        raise ValueError(
            "replace_with_linear does not support gemma2: its post-feedforward norm sits between "
            "down_proj and the residual, so a map on down_proj's output cannot be folded exactly."
        )
    if f.name == "opt" and not getattr(adapter.config, "do_layer_norm_before", True):
        raise ValueError(
            "replace_with_linear needs OPT with do_layer_norm_before=True (pre-norm): a post-norm "
            "block normalises after the MLP output is added."
        )
    down = adapter.mlp(drop[0] - 1).down
    if hasattr(down, "base_layer"):
        raise ValueError(
            "replace_with_linear cannot fold into a LoRA-wrapped down projection: merge it first."
        )
    return drop[0] - 1


def _solve(gram: torch.Tensor, cross: torch.Tensor, damping: float, tokens: int) -> torch.Tensor:
    """``(G + lam I)^-1 (C + lam I)`` by Cholesky, with ``lam = damping * trace(G) / d``."""
    d = gram.shape[0]
    lam = damping * float(gram.diagonal().sum()) / d
    eye = torch.eye(d, dtype=gram.dtype)
    system = gram + lam * eye
    eigenvalues = torch.linalg.eigvalsh(system)
    if float(eigenvalues[0]) <= 1e-12 * max(float(eigenvalues[-1]), 1e-300):
        raise ValueError(
            f"The linear replacement is ill-conditioned (smallest/largest eigenvalue "
            f"{float(eigenvalues[0]):.3g}/{float(eigenvalues[-1]):.3g} from {tokens:,} calibration tokens "
            f"for a {d}x{d} map): give more calibration tokens or set linear_damping > 0 (e.g. 1e-3)."
        )
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise ValueError(
            f"Cholesky failed on the linear replacement statistics ({tokens:,} tokens, {d}x{d} map): "
            "give more calibration tokens or set linear_damping > 0."
        )
    return torch.cholesky_solve(cross + lam * eye, factor)


def fit_linear_replacement(
    model: torch.nn.Module,
    batches: list[CalibrationBatch] | None,
    drop: Sequence[int],
    *,
    damping: float = 0.0,
    adapter: ModelAdapter | None = None,
    show_progress: bool = False,
) -> LinearReplacement:
    """Fit the map that replaces the run ``drop`` (see the module docstring). Changes no weight; every
    error (no data, too few tokens, ill-conditioned statistics) is raised here, before surgery.

    Example:
        >>> fit = fit_linear_replacement(model, batches, [2, 3], damping=1e-3)  # doctest: +SKIP
        >>> fit.transform.shape  # (hidden, hidden)  # doctest: +SKIP
    """
    adapter = adapter or get_adapter(model)
    layer = check_replaceable_run(adapter, drop)
    if batches is None:
        raise ValueError(
            "replace_with_linear fits the map on calibration data: pass dataloader=... "
            "(an iterable of dicts with input_ids and attention_mask)."
        )
    if not damping >= 0:
        raise ValueError(f"linear_damping must be >= 0, got {damping}.")
    d = adapter.hidden_size
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if damping == 0 and tokens < d:
        raise ValueError(
            f"replace_with_linear with linear_damping=0 needs at least hidden_size={d} calibration tokens "
            f"to determine a {d}x{d} map, got {tokens}: give more data or set linear_damping > 0."
        )
    last = max(drop)
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, d, dtype=torch.float64)
    sq = torch.zeros(2, dtype=torch.float64)  # ||L - Y||^2, ||L - block output||^2
    current: dict = {}
    seen: dict[str, torch.Tensor] = {}

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        # select real tokens (a fully padded row may hold NaN); OPT's MLP works on [batch*seq, dim]
        return tensor.reshape(-1, d)[current["mask"].reshape(-1).bool()].double()

    def on_down(module, args, output):
        seen["m"] = rows(output)

    def on_block(module, args, output):
        seen["out"] = rows(output[0] if isinstance(output, tuple) else output)

    def on_last(module, args, output):
        target = rows(output[0] if isinstance(output, tuple) else output)
        m, out = seen.pop("m"), seen.pop("out")
        residual = target - (out - m)  # L - Y
        gram.add_(m.T @ m)
        cross.add_(m.T @ residual)
        sq[0] += residual.square().sum()
        sq[1] += (target - out).square().sum()

    handles = [
        adapter.mlp(layer).down.register_forward_hook(on_down),
        adapter.layers[layer].register_forward_hook(on_block),
        adapter.layers[last].register_forward_hook(on_last),
    ]
    with _hooks(handles):
        _run(model, batches, show_progress, "linear replacement statistics", current)
    count = torch.tensor([float(tokens)], dtype=torch.float64)
    _all_reduce_([gram, cross, sq, count])
    tokens = int(count.item())
    transform = _solve(gram, cross, damping, tokens)
    # ||M T - R||^2 = tr(T^T G T) - 2 tr(T^T C) + ||R||^2, all from the streamed sums
    error = (transform * (gram @ transform)).sum() - 2 * (transform * cross).sum() + sq[0]
    norm = max(float(sq[0]), 1e-300)
    relative = float(error.clamp_min(0) / norm) ** 0.5
    identity = float(sq[1] / norm) ** 0.5
    logger.info(
        "Linear replacement of blocks %s folded into block %d: relative error %.4f (without map %.4f)",
        list(drop),
        layer,
        relative,
        identity,
    )
    return LinearReplacement(layer, sorted(drop), transform, float(damping), tokens, relative, identity)


@torch.no_grad()
def fold_linear_replacement(adapter: ModelAdapter, fit: LinearReplacement) -> None:
    """Fold ``fit.transform`` into block ``fit.layer``'s down projection, in place (same Parameters).

    Example:
        >>> fold_linear_replacement(adapter, fit)  # doctest: +SKIP
    """
    down = adapter.mlp(fit.layer).down
    weight = down.weight
    t = fit.transform.to(weight.device)
    if is_conv1d(down):  # stored [in, out] = W^T: W^T <- W^T T
        weight.copy_((weight.double() @ t).to(weight.dtype))
    else:
        weight.copy_((t.T @ weight.double()).to(weight.dtype))
    if getattr(down, "bias", None) is not None:
        down.bias.copy_((down.bias.double() @ t).to(down.bias.dtype))
