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

__all__ = [
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
