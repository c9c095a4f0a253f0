"""How many units to keep: percentages, expansion rates, divisors and parameter budgets.

All functions validate and raise a clear ``ValueError`` before anything is pruned.

Example:
    >>> kept_width(1536, hidden_size=576, pruning_percentage=20)
    1229
    >>> kept_width(1536, hidden_size=576, expansion_rate=200, expansion_divisor=64)
    1152
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "check_layer_indices",
    "check_percentage",
    "kept_width",
    "width_for_parameter_budget",
    "layers_to_remove_count",
    "units_to_remove",
    "round_share",
]


def check_percentage(name: str, value: float) -> None:
    """Refuse anything but a number strictly between 0 and 100 (``True`` is not 1%).

    Example:
        >>> check_percentage("pruning_percentage", 20)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise ValueError(f"{name} must be a number strictly between 0 and 100, got {value!r}.")


def check_layer_indices(layer_indices: Sequence[int] | None, num_layers: int) -> list[int]:
    """The chosen layers (default all), refused unless distinct, non-empty and in range (every axis and
    the pruning callback check ``layer_indices`` with this).

    Example:
        >>> check_layer_indices(None, 3), check_layer_indices([2, 0], 3)
        ([0, 1, 2], [2, 0])
    """
    layers = list(range(num_layers)) if layer_indices is None else list(layer_indices)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]!r} out of range: the model has layers 0..{num_layers - 1}.")
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"layer_indices must be distinct and non-empty, got {layer_indices!r}.")
    return layers


def _apply_divisor(k: int, width: int, divisor: int | None) -> int:
    if divisor is None:
        return k
    if not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"expansion_divisor must be a positive integer, got {divisor!r}.")
    if divisor > k:
        raise ValueError(
            f"expansion_divisor {divisor} is larger than the width it should round "
            f"({k} of {width} neurons kept); choose a divisor <= {k}."
        )
    return (k // divisor) * divisor  # round down: never makes a layer bigger than asked


def kept_width(
    width: int,
    *,
    hidden_size: int,
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
) -> int:
    """Neurons kept in an MLP of ``width`` neurons, exactly as OptiPFair computes it.

    ``k = width - min(int(p / 100 * width), width - 1)``; an ``expansion_rate`` r (percent of the hidden
    size) gives ``p = (1 - r / 100 * hidden / width) * 100``; ``expansion_divisor`` d rounds k down to a
    multiple of d. Exactly one of ``pruning_percentage`` and ``expansion_rate`` is required.

    Example:
        >>> kept_width(100, hidden_size=50, pruning_percentage=10)
        90
    """
    if (pruning_percentage is None) == (expansion_rate is None):
        raise ValueError(
            "Give exactly one of pruning_percentage and expansion_rate "
            f"(got pruning_percentage={pruning_percentage!r}, expansion_rate={expansion_rate!r})."
        )
    if expansion_rate is not None:
        if not isinstance(expansion_rate, (int, float)) or expansion_rate <= 0:
            raise ValueError(
                f"expansion_rate must be a positive percentage of the hidden size, got {expansion_rate!r}."
            )
        current = 100.0 * width / hidden_size
        if expansion_rate >= current:
            raise ValueError(
                f"expansion_rate {expansion_rate}% would not shrink the MLP: its current expansion "
                f"rate is {current:.1f}% ({width}/{hidden_size}); choose a smaller rate."
            )
        if expansion_rate / 100 * hidden_size < 1:
            raise ValueError(
                f"expansion_rate {expansion_rate}% leaves fewer than one neuron (hidden size {hidden_size})."
            )
        pruning_percentage = (1 - expansion_rate / 100 * hidden_size / width) * 100
    else:
        check_percentage("pruning_percentage", pruning_percentage)
    # the epsilon keeps 25.000000000000004% from flooring a neuron away through float error
    removed = min(int(pruning_percentage / 100 * width + 1e-9), width - 1)
    return _apply_divisor(width - removed, width, expansion_divisor)


def width_for_parameter_budget(
    total_parameters: int,
    target_parameters: int,
    widths: list[int],
    params_per_neuron: int,
    expansion_divisor: int | None = None,
) -> int:
    """The uniform width that brings a model of ``total_parameters`` to at most ``target_parameters``.

    ``widths`` are the current per-layer widths (all equal for a uniform model) and
    ``params_per_neuron`` what one neuron costs in one layer (gate row + up row + down column).

    Example:
        >>> width_for_parameter_budget(1000, 700, [10, 10], params_per_neuron=30)
        5
    """
    if not isinstance(target_parameters, int) or target_parameters <= 0:
        raise ValueError(f"target_parameters must be a positive integer, got {target_parameters!r}.")
    if target_parameters >= total_parameters:
        raise ValueError(
            f"target_parameters {target_parameters:,} is not below the model's "
            f"{total_parameters:,} parameters: nothing to prune."
        )
    if len(set(widths)) != 1:
        raise ValueError("A parameter budget needs a uniform model; its MLP widths differ per layer.")
    width, layers = widths[0], len(widths)
    removed = math.ceil((total_parameters - target_parameters) / (layers * params_per_neuron))
    k = width - removed
    if k < 1:
        floor = total_parameters - layers * (width - 1) * params_per_neuron
        raise ValueError(
            f"target_parameters {target_parameters:,} cannot be reached by MLP width pruning: "
            f"even one neuron per layer leaves {floor:,} parameters."
        )
    return _apply_divisor(k, width, expansion_divisor)


def layers_to_remove_count(
    num_layers: int, num_layers_to_remove: int | None, depth_pruning_percentage: float | None
) -> int:
    """Blocks to remove from a percentage or a count; at least one block always stays.

    Example:
        >>> layers_to_remove_count(30, None, 10)
        3
    """
    if (num_layers_to_remove is None) == (depth_pruning_percentage is None):
        raise ValueError(
            "Give exactly one of num_layers_to_remove and depth_pruning_percentage "
            "(or layer_indices with layer_selection_method='custom')."
        )
    if depth_pruning_percentage is not None:
        check_percentage("depth_pruning_percentage", depth_pruning_percentage)
        num_layers_to_remove = max(1, int(depth_pruning_percentage / 100 * num_layers + 1e-9))
    if not isinstance(num_layers_to_remove, int) or num_layers_to_remove < 1:
        raise ValueError(f"num_layers_to_remove must be a positive integer, got {num_layers_to_remove!r}.")
    if num_layers_to_remove >= num_layers:
        raise ValueError(
            f"Cannot remove {num_layers_to_remove} of {num_layers} layers: at least one must stay."
        )
    return num_layers_to_remove


def units_to_remove(current: int, original: int, target: float) -> int:
    """How many of ``current`` units to remove now so that ``target`` percent of ``original`` are gone.

    The final count removed from the original follows the engine's rounding (``int(p / 100 * n)``),
    at least one unit always stays, and a negative answer (already smaller) becomes 0.

    Example:
        >>> units_to_remove(current=90, original=100, target=25)
        15
    """
    removed_total = min(int(target / 100 * original + 1e-9), original - 1)
    return max(0, current - (original - removed_total))


def round_share(total: int, round_idx: int, num_rounds: int) -> int:
    """Units that round ``round_idx`` (1-based) of ``num_rounds`` removes so the rounds add up to ``total``.

    Example:
        >>> [round_share(10, k, 3) for k in (1, 2, 3)]
        [3, 3, 4]
    """
    return total * round_idx // num_rounds - total * (round_idx - 1) // num_rounds
