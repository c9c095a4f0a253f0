"""optipfair-train: structured pruning and bias probing of LLMs inside the Hugging Face training loop.

Example:
    >>> from optipfair_train import prune_model, save_pruned_model, load_pruned_model
    >>> model, stats = prune_model(model, pruning_percentage=20, dataloader=batches, return_stats=True)  # doctest: +SKIP
"""

import logging

from .lazy import lazy_attributes

# public name -> the module that defines it; imported on first use, so the command line's --help and
# argument checks need no torch
_LAZY = {
    "analyze": ".analysis",
    "count_parameters": ".analysis",
    "get_adapter": ".arch",
    "supported_model_types": ".arch",
    "BiasProbeCallback": ".callbacks",
    "FairnessGuardCallback": ".callbacks",
    "FairnessLossCallback": ".callbacks",
    "GradientImportanceCallback": ".callbacks",
    "PruningCallback": ".callbacks",
    "PruneThenHeal": ".pipeline",
    "load_config": ".pipeline",
    "available_scorers": ".pruning",
    "load_pruned_model": ".pruning",
    "prune_checkpoint": ".pruning",
    "prune_model": ".pruning",
    "register_scorer": ".pruning",
    "save_pruned_model": ".pruning",
}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__version__ = "0.1.0"

__all__ = [
    "PruningCallback",
    "BiasProbeCallback",
    "GradientImportanceCallback",
    "FairnessGuardCallback",
    "FairnessLossCallback",
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
