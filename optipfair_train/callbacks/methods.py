"""Which scorer a :class:`~optipfair_train.callbacks.pruning.PruningCallback` uses, checked when it is built.

The defaults follow ``prune_model``'s: gradients from the training (``taylor``) when the callback is given
them, else with calibration data ``hybrid`` (``activation`` for heads, which have no hybrid score), else
the engine's weight-only default.

Example:
    >>> resolve_method("MLP_GLU", None, None, has_gradients=False, has_calibration=True)
    'hybrid'
    >>> resolve_method("ATTENTION", None, None, has_gradients=False, has_calibration=True)
    'activation'
"""

from __future__ import annotations

from ..pruning import get_scorer
from ..pruning.depth import LAYER_SELECTION_METHODS
from ..pruning.heads import HEAD_METHODS

__all__ = ["resolve_method"]


def resolve_method(
    pruning_type: str,
    neuron_method: str | None,
    layer_method: str | None,
    *,
    has_gradients: bool,
    has_calibration: bool,
) -> str | None:
    """The scorer (or, for ``DEPTH``, the block selection) an event will use; ``None`` leaves the choice to
    the engine's weight-only default. Raises ``ValueError`` for an unknown method or one without its data.

    Example:
        >>> resolve_method("MLP_GLU", "MAW", None, has_gradients=False, has_calibration=False)
        'MAW'
    """
    if pruning_type == "DEPTH":
        return _block_selection(neuron_method, layer_method, has_gradients, has_calibration)
    if layer_method is not None:
        raise ValueError("layer_selection_method applies to pruning_type='DEPTH' only.")
    default = "activation" if pruning_type == "ATTENTION" else "hybrid"
    method = neuron_method or ("taylor" if has_gradients else default if has_calibration else None)
    if method is None:
        return None  # the engine's documented weight-only default (with its warning)
    if pruning_type == "ATTENTION":
        if method not in HEAD_METHODS:
            raise ValueError(
                f"Unknown head importance method {method!r} for ATTENTION; choose one of {', '.join(HEAD_METHODS)}."
            )
        needs_calibration = method == "activation"
    else:
        scorer = get_scorer(method)  # raises for an unknown scorer, listing the known ones
        # taylor may use the training's gradients; fairness reads prompt pairs (quality: hybrid on
        # calibration data, else MAW)
        method, needs_calibration = scorer.name, scorer.needs not in (None, "taylor", "bias_gap")
    if needs_calibration and not has_calibration:
        raise ValueError(f"The {method!r} scorer needs calibration data: pass dataloader=...")
    if method == "taylor" and not has_gradients and not has_calibration:
        raise ValueError(
            "The 'taylor' scorer needs importance=GradientImportanceCallback() (gradients from training) "
            "or dataloader=... (calibration batches)."
        )
    return method


def _block_selection(
    neuron_method: str | None, layer_method: str | None, has_gradients: bool, has_calibration: bool
) -> str | None:
    if neuron_method is not None:
        raise ValueError(
            "For pruning_type='DEPTH' choose blocks with layer_selection_method=..., not a neuron scorer."
        )
    method = layer_method or ("taylor" if has_gradients else "importance" if has_calibration else None)
    if method is not None and method not in LAYER_SELECTION_METHODS:
        raise ValueError(
            f"Unknown layer_selection_method {method!r}; choose one of {', '.join(LAYER_SELECTION_METHODS)}."
        )
    if method == "custom":
        raise ValueError(
            "layer_selection_method='custom' removes fixed blocks once: call prune_model(..., "
            "layer_indices=...) before training instead of scheduling it."
        )
    needs = {"importance": has_calibration, "taylor": has_gradients or has_calibration}
    if method in needs and not needs[method]:
        raise ValueError(f"layer_selection_method={method!r} needs dataloader= (or importance= for taylor).")
    return method
