"""Structured pruning engine: requests -> plan -> apply, scorers, surgery, save/load (docs/architecture.md)."""

from .api import PRUNING_TYPES, prune_model, pruning_request
from .apply import apply
from .budget import BUDGET_AXES, budget_requests, parse_shares
from .calibration import as_batches, block_influence, mlp_activation_sumsq
from .depth import LAYER_SELECTION_METHODS, select_layers_to_remove
from .hidden import HiddenPlan, apply_hidden, plan_hidden
from .hidden_axis import HiddenRequest
from .hidden_refit import prune_hidden
from .io import MANIFEST_NAME, load_pruned_model, pruning_manifest, save_pruned_model
from .plan import PruningPlan, model_fingerprint, plan
from .requests import DepthRequest, HeadRequest, MLPWidthRequest, Request, default_method
from .scorers import ScoringContext, available_scorers, get_scorer, register_scorer
from .search import SearchResult, search
from .streamed import prune_checkpoint
from .surgery import ParamSlice, prune_mlp_neurons, remove_layers, slice_linear
from .width import apply_width_plan, neuron_scores, plan_mlp_width

__all__ = [
    "PRUNING_TYPES",
    "prune_model",
    "pruning_request",
    "plan",
    "apply",
    "BUDGET_AXES",
    "budget_requests",
    "parse_shares",
    "search",
    "SearchResult",
    "PruningPlan",
    "model_fingerprint",
    "Request",
    "MLPWidthRequest",
    "HeadRequest",
    "DepthRequest",
    "HiddenRequest",
    "default_method",
    "as_batches",
    "block_influence",
    "mlp_activation_sumsq",
    "LAYER_SELECTION_METHODS",
    "select_layers_to_remove",
    "HiddenPlan",
    "plan_hidden",
    "apply_hidden",
    "prune_hidden",
    "MANIFEST_NAME",
    "load_pruned_model",
    "pruning_manifest",
    "save_pruned_model",
    "prune_checkpoint",
    "ScoringContext",
    "available_scorers",
    "get_scorer",
    "register_scorer",
    "ParamSlice",
    "prune_mlp_neurons",
    "remove_layers",
    "slice_linear",
    "apply_width_plan",
    "neuron_scores",
    "plan_mlp_width",
]
