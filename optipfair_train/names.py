"""The pruning engine's names and defaults, defined once here, in a module that imports no torch.

The engine (``optipfair_train.pruning``) and the command-line parser (which must answer ``--help`` and
argument mistakes without importing torch) both read them from here, so neither keeps a copy.

Example:
    >>> DEFAULT_METHODS["calibrated"]["mlp"], DEFAULT_METHODS["weight_only"]["depth"]
    ('hybrid', 'last')
"""

from __future__ import annotations

__all__ = [
    "PRUNING_TYPES",
    "LAYER_SELECTION_METHODS",
    "BUILTIN_SCORERS",
    "DEFAULT_DAMPING",
    "DEFAULT_METHODS",
]

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
