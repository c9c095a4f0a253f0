"""optipfair-train: structured pruning and bias probing of LLMs inside the Hugging Face training loop.

Example:
    >>> from optipfair_train import prune_model, save_pruned_model, load_pruned_model
    >>> model, stats = prune_model(model, pruning_percentage=20, dataloader=batches, return_stats=True)  # doctest: +SKIP
"""

import logging

from .analysis import analyze, count_parameters
from .arch import get_adapter, supported_model_types
from .callbacks import BiasProbeCallback, FairnessGuardCallback, GradientImportanceCallback, PruningCallback
from .pipeline import PruneThenHeal, load_config
from .pruning import (
    available_scorers,
    load_pruned_model,
    prune_checkpoint,
    prune_model,
    register_scorer,
    save_pruned_model,
)

__version__ = "0.1.0"

__all__ = [
    "PruningCallback",
    "BiasProbeCallback",
    "GradientImportanceCallback",
    "FairnessGuardCallback",
    "PruneThenHeal",
    "load_config",
    "analyze",
    "count_parameters",
    "get_adapter",
    "supported_model_types",
    "available_scorers",
    "load_pruned_model",
    "prune_model",
    "prune_checkpoint",
    "register_scorer",
    "save_pruned_model",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
