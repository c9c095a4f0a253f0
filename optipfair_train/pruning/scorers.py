"""Importance scorers for MLP neurons: a registry of small functions keyed by name.

A scorer takes one layer's :class:`~optipfair_train.arch.MLPParts` and a :class:`ScoringContext`
and returns one float32 score per intermediate neuron; higher means more important (kept first).
New method = one :func:`register_scorer` entry.

The weight-only scores reproduce OptiPFair 0.4.2 exactly (rows of gate/up are neurons):

- ``MAW`` (alias ``PPM``): ``(max_j W_g[i,j] + |min_j W_g[i,j]|) + (same for W_u)``
- ``VOW``: ``var(W_g[i]) + var(W_u[i])`` (unbiased)
- ``PON``: ``||W_g[i]||_1 * ||W_u[i]||_1``
- ``L2``: ``||W_g[i]||_2 + ||W_u[i]||_2``

Data-driven: ``activation``, ``hybrid`` (OptiPFair's data-driven score), ``fluctuation`` (FLAP),
``reconstruction`` (OBS saliency from the Gram matrix) — all below, from the streamed statistics of
:mod:`.calibration` —, ``taylor`` (gradients, :mod:`.taylor`) and ``fairness`` (demographic prompt
pairs, :mod:`.fairness`).

On the demo model these collapse quality (docs/benchmarks.md: MAW at 20% width -> perplexity 320 vs 31.98),
whereas ``activation`` (``sqrt(sum_t x_ti^2) * ||W_down[:, i]||_2`` over calibration tokens, padding
excluded) keeps it at 48.2, and ``hybrid`` does better still (bench/bench_oneshot.py: 45.3 vs 48.2 at
-20%, 57.3 vs 72.1 at -30%, unpruned 32.0): ``hybrid`` is ``prune_model``'s default with calibration data.

Example:
    >>> from optipfair_train.pruning.scorers import get_scorer, available_scorers
    >>> "MAW" in available_scorers() and get_scorer("ppm").name == "MAW"
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..arch import MLPParts, weight_out_in
from .calibration import InputMoments

__all__ = ["Scorer", "ScoringContext", "register_scorer", "get_scorer", "available_scorers"]


@dataclass
class ScoringContext:
    """What a scorer may read besides the weights.

    Attributes:
        layer_idx: index of the layer being scored.
        activation_sumsq: per-neuron sum over calibration tokens of the squared ``down_proj`` input,
            for data-driven scorers (None when no calibration data was collected).
        input_moments: streamed moments of the ``down_proj`` input (``hybrid``, ``fluctuation``).
        input_gram: ``sum_t x_t x_t^T`` of the ``down_proj`` input, float64 (``reconstruction``).
        taylor: per-neuron first-order Taylor scores (see :mod:`.taylor`), for ``taylor``.
        bias_gap: per-neuron mean activation gap over demographic prompt pairs (see :mod:`.fairness`).
        fairness_weight: weight of the bias gap against quality in ``fairness``.
        seed: seed for stochastic scorers (``random``).
    """

    layer_idx: int
    activation_sumsq: torch.Tensor | None = None
    input_moments: InputMoments | None = None
    input_gram: torch.Tensor | None = None
    taylor: torch.Tensor | None = None
    bias_gap: torch.Tensor | None = None
    fairness_weight: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class Scorer:
    """A registered importance method."""

    name: str
    fn: Callable[[MLPParts, ScoringContext], torch.Tensor]
    needs: str | None  # the ScoringContext field it reads ("activation_sumsq", "input_moments", ...) or None
    description: str

    @property
    def needs_calibration(self) -> bool:
        return self.needs is not None

    def check_inputs(self, *, calibrated: bool, gradients: bool = False, pairs: bool = False) -> None:
        """Refuse this scorer without the inputs it reads (the one copy of this rule).

        ``taylor`` reads gradients (from calibration data or a training loop's), ``fairness`` prompt pairs
        and a tokenizer, the other data-driven scorers calibration data.

        Example:
            >>> get_scorer("MAW").check_inputs(calibrated=False)
        """
        if self.needs == "taylor" and not (calibrated or gradients):
            raise ValueError(
                "The 'taylor' scorer needs gradients: calibration data (dataloader=...) or the training's own "
                "(gradient_importance=..., or PruningCallback's importance=GradientImportanceCallback())."
            )
        if self.needs == "bias_gap" and not pairs:
            raise ValueError(
                "The fairness scorer needs bias_pairs (prompt pairs that differ in a demographic "
                "term) and the tokenizer; see optipfair_train.bias.load_pairs."
            )
        if self.needs not in (None, "taylor", "bias_gap") and not calibrated:
            raise ValueError(
                f"Scorer {self.name!r} needs calibration data: pass dataloader=... "
                f"or choose a weight-only method ({', '.join(weight_only_scorers())})."
            )

    def __call__(self, parts: MLPParts, context: ScoringContext) -> torch.Tensor:
        if self.needs is not None and getattr(context, self.needs) is None:
            raise ValueError(
                f"Scorer {self.name!r} needs calibration data: pass dataloader=... "
                f"or choose a weight-only method ({', '.join(weight_only_scorers())})."
            )
        return self.fn(parts, context).float()


_REGISTRY: dict[str, Scorer] = {}
_ALIASES: dict[str, str] = {}


def register_scorer(
    name: str, *, needs: str | None = None, aliases: tuple[str, ...] = (), replace: bool = False
):
    """Decorator that registers a neuron scorer under ``name`` (case-insensitive) and ``aliases``.

    ``needs`` names the :class:`ScoringContext` statistic the scorer reads (computed from calibration
    data before scoring), or None for weight-only scorers. A name (or alias) already taken is refused
    unless ``replace=True``: silently swapping a scorer would change what every later call prunes.

    Example:
        >>> @register_scorer("ones")
        ... def ones(parts, context):
        ...     "Every neuron equally important."
        ...     return torch.ones(parts.intermediate_size)
    """

    def decorate(fn: Callable[[MLPParts, ScoringContext], torch.Tensor]):
        taken = [n for n in (name, *aliases) if n.upper() in _REGISTRY or n.upper() in _ALIASES]
        if taken and not replace:
            raise ValueError(
                f"A scorer named {taken[0]!r} is already registered; choose another name, or pass "
                "replace=True to replace it on purpose."
            )
        scorer = Scorer(name, fn, needs, (fn.__doc__ or "").strip().splitlines()[0])
        _REGISTRY[name.upper()] = scorer
        for alias in aliases:
            _ALIASES[alias.upper()] = name.upper()
        return fn

    return decorate


def get_scorer(name: str) -> Scorer:
    """Look up a scorer by name or alias (case-insensitive); the error lists what is available."""
    key = str(name).upper()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown neuron selection method {name!r}. Available: {', '.join(available_scorers())}."
        )
    return _REGISTRY[key]


def available_scorers() -> list[str]:
    """Names of all registered scorers."""
    return [s.name for s in _REGISTRY.values()]


def weight_only_scorers() -> list[str]:
    return [s.name for s in _REGISTRY.values() if not s.needs_calibration]


def _rows(parts: MLPParts) -> list[torch.Tensor]:
    """Neuron-major float32 weights of the projections that produce intermediate neurons."""
    return [weight_out_in(m).detach().float() for m in parts.width_linears]


@register_scorer("MAW", aliases=("PPM",))
def _maw(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Peak-to-peak magnitude: max + |min| of each neuron's gate and up rows."""
    return sum(w.max(dim=1).values + w.min(dim=1).values.abs() for w in _rows(parts))


@register_scorer("VOW")
def _vow(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Variance of weights: unbiased variance of each neuron's gate and up rows."""
    return sum(w.var(dim=1, unbiased=True) for w in _rows(parts))


@register_scorer("PON")
def _pon(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Product of norms: L1 norm of the gate row times L1 norm of the up row."""
    score = torch.ones(parts.intermediate_size)
    for w in _rows(parts):
        score = score * w.abs().sum(dim=1)
    return score


@register_scorer("L2")
def _l2(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Sum of the L2 norms of each neuron's gate and up rows."""
    return sum(w.norm(dim=1) for w in _rows(parts))


@register_scorer("random")
def _random(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Seeded random scores: the baseline every method must beat."""
    generator = torch.Generator().manual_seed(context.seed * 100_003 + context.layer_idx)
    return torch.rand(parts.intermediate_size, generator=generator)


@register_scorer("activation", needs="activation_sumsq")
def _activation(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Activation-aware: sqrt(sum of squared down_proj inputs over tokens) * ||W_down[:, i]||_2."""
    column_norms = weight_out_in(parts.down).detach().float().norm(dim=0)
    return context.activation_sumsq.float().sqrt() * column_norms


@register_scorer("taylor", needs="taylor")
def _taylor(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """First-order Taylor: sum over batches of |sum of w * dL/dw over the neuron's weights|."""
    return context.taylor


@register_scorer("fairness", needs="bias_gap")
def _fairness(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """Fairness-aware: quality (hybrid, else MAW) traded against the demographic bias gap."""
    from .fairness import combine_fairness  # local: fairness imports the bias package

    quality = _hybrid(parts, context) if context.input_moments is not None else _maw(parts, context)
    return combine_fairness(quality, context.bias_gap, context.fairness_weight)


# Ridge damping of the Gram matrix, relative to its mean diagonal (as in OBS/SparseGPT-style solvers).
RECONSTRUCTION_DAMPING = 0.01


def _ppm(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight.max(dim=dim).values + weight.min(dim=dim).values.abs()


@register_scorer("hybrid", needs="input_moments")
def _hybrid(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """OptiPFair 0.4.2's data-driven score, padding masked: batch-norm sum x normalised MAW of gate, up, down.

    ``score_i = (sum_b ||X_b[:, i]||_2) * (PPM_g[i] / max PPM_g + PPM_u[i] / max PPM_u
    + PPM_d[i] / max PPM_d)``
    where ``X_b`` is batch ``b``'s ``down_proj`` input over its unmasked tokens (OptiPFair counts padding
    tokens too; on unpadded batches both agree), ``PPM = max + |min|`` of the neuron's gate row, up row
    and down column. Source: OptiPFair 0.4.2 ``compute_neuron_pair_importance_maw_hybrid``.
    """
    ppms = [_ppm(w, 1) for w in _rows(parts)] + [_ppm(weight_out_in(parts.down).detach().float(), 0)]
    magnitude = sum(p / p.max().clamp_min(1e-12) for p in ppms)
    return context.input_moments.batch_norms.float() * magnitude


@register_scorer("fluctuation", needs="input_moments")
def _fluctuation(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """FLAP's fluctuation (WIFV): variance over tokens of the down_proj input x ||W_down[:, i]||_2^2.

    ``score_i = Var_t(x_ti) * ||W_d[:, i]||^2`` (unbiased variance over unmasked calibration tokens):
    removing neuron ``i`` and adding its mean ``E[x_i] W_d[:, i]`` as a bias leaves an output error
    whose energy is exactly this (An et al., "Fluctuation-based Adaptive Structured Pruning for Large
    Language Models", AAAI 2024). The bias compensation itself is not applied here.
    """
    column_sq = weight_out_in(parts.down).detach().double().pow(2).sum(dim=0)
    return context.input_moments.variance * column_sq


@register_scorer("reconstruction", needs="input_gram")
def _reconstruction(parts: MLPParts, context: ScoringContext) -> torch.Tensor:
    """OBS saliency: ||W_down[:, i]||^2 / [(G + lambda I)^-1]_ii, G = sum_t x_t x_t^T of the down_proj input.

    The least output error ``sum_t ||W_d x_t - W_d' x_t||^2`` left when neuron ``i`` alone is removed
    and the other columns are refit by least squares (Optimal Brain Surgeon, Hassibi & Stork 1993;
    structured for columns as in SlimGPT, Ling et al. 2024). ``lambda`` is
    ``RECONSTRUCTION_DAMPING`` times the mean of ``diag(G)``.
    """
    gram = context.input_gram.double()
    damping = RECONSTRUCTION_DAMPING * gram.diagonal().mean().clamp_min(1e-12)
    regularised = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype)
    inverse_diag = torch.cholesky_inverse(torch.linalg.cholesky(regularised)).diagonal()
    column_sq = weight_out_in(parts.down).detach().double().pow(2).sum(dim=0)
    return column_sq / inverse_diag
