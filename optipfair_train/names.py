"""The engine's names and defaults, defined once here, in a module that imports no torch.

The engine (``optipfair_train.pruning``, ``optipfair_train.bias``) and the command-line parser (which must
answer every command's ``--help`` and argument mistakes without importing torch) both read them from here,
so neither keeps a copy. The zero-shot task names and defaults live in :mod:`optipfair_train.zeroshot.tasks`,
which is as light.

Example:
    >>> DEFAULT_METHODS["calibrated"]["mlp"], DEFAULT_METHODS["weight_only"]["depth"]
    ('hybrid', 'last')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "FAIRNESS_LOSS_OBJECTIVES",
    "MAX_BIAS_VECTOR_STRENGTH",
    "BUDGET_AXES",
    "parse_shares",
    "DTYPES",
    "PRUNING_TYPES",
    "LAYER_SELECTION_METHODS",
    "BUILTIN_SCORERS",
    "DEFAULT_DAMPING",
    "DEFAULT_METHODS",
    "COMPONENTS",
    "ALL_COMPONENTS",
    "SCORE_METHODS",
    "VISUALIZATION_TYPES",
    "DEFAULT_FIGURE_COMPONENTS",
    "FIGURE_FORMATS",
]

#: Weight precisions a model is loaded in (``models.resolve_dtype`` also takes aliases such as ``bf16``).
DTYPES = ("float32", "bfloat16", "float16")

PRUNING_TYPES = ("MLP_GLU", "MLP", "ATTENTION", "DEPTH", "HIDDEN")
LAYER_SELECTION_METHODS = ("last", "first", "custom", "importance", "contiguous", "taylor")
# the scorers registered by optipfair_train.pruning.scorers (tests/test_cli.py checks the registry has them)
BUILTIN_SCORERS = (
    "MAW", "VOW", "PON", "L2", "random", "activation", "taylor", "fairness", "hybrid", "fluctuation",
    "reconstruction",
)  # fmt: skip
# ridge strength of the refits, relative to the mean Gram diagonal (docs/benchmarks/reconstruction.md)
DEFAULT_DAMPING = 0.01
# The scorer (or block selection) each axis uses when none is named; the rules choosing between these
# rows (gradients -> taylor, sequential -> activation) are in pruning.requests.default_method.
# hybrid: best measured on the demo model (docs/benchmarks/oneshot.md).
DEFAULT_METHODS = {
    "calibrated": {"mlp": "hybrid", "heads": "activation", "depth": "importance", "hidden": "activation"},
    "sequential": {"mlp": "activation", "heads": "activation", "depth": "importance", "hidden": "activation"},
    "weight_only": {"mlp": "MAW", "heads": "L2", "depth": "last", "hidden": "L2"},
}

# bias probes (optipfair_train.bias)
#: OptiPFair's component names, in the order they are reported.
COMPONENTS: tuple[str, ...] = (
    "attention_output",
    "mlp_output",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_norm",
)
#: Also capturable: the input of ``down_proj`` (the MLP intermediate activation).
ALL_COMPONENTS: tuple[str, ...] = COMPONENTS + ("down_proj_input",)
#: Behavioural log-likelihood: the full sentence, or the shared tokens after the difference.
SCORE_METHODS = ("full", "shared")
VISUALIZATION_TYPES = ("mean_diff", "heatmap", "pca")
DEFAULT_FIGURE_COMPONENTS = ("attention_output", "mlp_output")
FIGURE_FORMATS = ("png", "pdf", "svg", "jpg")


#: The axes one parameter budget is spent across (``pruning.budget``), as ``budget_shares`` names them.
BUDGET_AXES = ("hidden", "mlp", "heads", "depth")


def parse_shares(shares: Mapping[str, float] | str) -> dict[str, float]:
    """Check the shares of the removed parameters per axis; a string is ``"hidden=0.5,mlp=0.5"``.

    Keys among ``hidden``, ``mlp``, ``heads``, ``depth``; values >= 0 summing to 1 (within 1e-6).
    Axes with share 0 are dropped.

    Example:
        >>> parse_shares("hidden=0.25, mlp=0.75")
        {'hidden': 0.25, 'mlp': 0.75}
    """
    if isinstance(shares, str):
        parsed: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in shares.split(","))):
            key, sep, value = item.partition("=")
            try:
                parsed[key.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(
                    f"budget shares must read like 'hidden=0.5,mlp=0.5'; could not read {item!r}."
                ) from None
        shares = parsed
    if not isinstance(shares, Mapping) or not shares:
        raise ValueError(f"shares must map axes to shares, e.g. {{'mlp': 1.0}}; got {shares!r}.")
    unknown = [k for k in shares if k not in BUDGET_AXES]
    if unknown:
        raise ValueError(f"Unknown budget axis {unknown[0]!r}; accepted: {', '.join(BUDGET_AXES)}.")
    for k, v in shares.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"The share of {k!r} must be a number >= 0, got {v!r}.")
    total = sum(shares.values())
    if abs(total - 1) > 1e-6:
        raise ValueError(f"The shares must sum to 1, got {total:g} ({dict(shares)}).")
    return {k: float(v) for k, v in shares.items() if v > 0}


#: What the healing-time fairness loss pushes to zero (:mod:`optipfair_train.heal.fair_loss`): each item's
#: stereotype-minus-anti-stereotype gap, the step batch's mean gap, or the divergence of the model's
#: predictions between an item's texts and their counterfactuals (:mod:`optipfair_train.heal.fair_pairs`).
FAIRNESS_LOSS_OBJECTIVES = ("items", "mean", "counterfactual")

#: The largest bias-vector strength accepted (:mod:`optipfair_train.bias.bias_vector`): beyond it the
#: subtraction extrapolates far past what the two fine-tunes moved.
MAX_BIAS_VECTOR_STRENGTH = 8.0
