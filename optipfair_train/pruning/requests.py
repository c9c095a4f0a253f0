"""Pruning requests: what to prune on one axis, with its defaults and checks applied once, where it is made.

A request holds either a unit count (``remove``: neurons per layer, KV groups / query heads per group,
or blocks) or a target (a percentage, an expansion rate, a parameter budget), and its scorer resolved
to an object. Everything that can be checked without the model is checked when the request is built;
what depends on the model's shapes (:meth:`Request.check`) is checked by
:func:`~optipfair_train.pruning.plan.plan`, before anything is scored. A new axis (e.g. the hidden
dimension) is one more request type with its own ``kind``, plus one entry in the axis registry of
:mod:`.axes`.

The default scorer of every axis is decided here, in :func:`default_method`, and nowhere else.

Example:
    >>> MLPWidthRequest(remove=32).scorer.name
    'MAW'
    >>> MLPWidthRequest(pruning_percentage=20, calibrated=True).scorer.name
    'hybrid'
    >>> HeadRequest(remove=1, calibrated=True).method, DepthRequest(remove=2).method
    ('activation', 'last')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..arch import get_adapter
from ..names import DEFAULT_METHODS
from .depth import check_layer_selection
from .fair_heads import DEFAULT_FAIRNESS_LAMBDA, HeadAblation, check_bias_items, check_fairness_lambda
from .heads import HEAD_ALLOCATIONS, check_head_granularity, check_head_method
from .refit_options import RefitOptions
from .scorers import Scorer, get_scorer
from .sequential import check_sequential_scorer
from .targets import check_layer_indices, check_percentage
from .taylor import TaylorImportance
from .width import check_layer_allocation

logger = logging.getLogger(__name__)

__all__ = [
    "Request",
    "MLPWidthRequest",
    "HeadRequest",
    "DepthRequest",
    "default_method",
    "check_layer_indices",
]


@runtime_checkable
class Request(Protocol):
    """What every request offers :func:`~optipfair_train.pruning.plan.plan`.

    ``kind`` names the axis (``"mlp"``, ``"heads"``, ``"depth"``; the axis registry of :mod:`.axes`
    maps it to a planner and an applier); ``check(model)`` refuses what this model cannot do.
    """

    kind: ClassVar[str]

    def check(self, model: torch.nn.Module) -> None: ...


def default_method(kind: str, *, calibrated: bool, gradients: bool = False, sequential: bool = False) -> str:
    """The scorer (or block selection) an axis uses when none is named: the one place this is decided
    (from the table ``optipfair_train.names.DEFAULT_METHODS``, which the command line's help reads too).

    Gradients from training give ``taylor``; calibration data gives ``hybrid`` for MLP neurons (best
    measured on the demo model, docs/benchmarks/oneshot.md; ``activation`` with ``sequential``, which
    scores from per-layer activation sums only), ``activation`` for heads and hidden channels and
    ``importance`` for blocks; without either, the weight-only ``MAW`` / ``L2`` / ``last`` / ``L2``
    (with a warning: far more quality lost).

    Example:
        >>> default_method("mlp", calibrated=True), default_method("heads", calibrated=False)
        ('hybrid', 'L2')
    """
    if gradients and not sequential:
        return "taylor"
    if calibrated:
        return DEFAULT_METHODS["sequential" if sequential else "calibrated"][kind]
    weight_only = DEFAULT_METHODS["weight_only"][kind]
    logger.warning(
        "Pruning %s with the weight-only %r selection because no calibration data was given; on real "
        "models this loses far more quality than a data-driven one with a few calibration batches.",
        kind,
        weight_only,
    )
    return weight_only


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Refuse a bool, a non-number, NaN/Inf or a value <= 0; ``None`` passes.

    Example:
        >>> check_positive("remove", 3, integer=True)
    """
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} > 0, got {value!r}.")


def _one_of(names: dict[str, Any]) -> None:
    given = [k for k, v in names.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"Give only one of {', '.join(names)} (got {', '.join(given)}).")


@dataclass
class MLPWidthRequest(RefitOptions):
    """Remove MLP neurons (GLU gate/up/down, or plain fc1/fc2) in every chosen layer.

    Give ``remove`` (neurons per layer) or one target: ``pruning_percentage`` (OptiPFair's rounding,
    default 10 when nothing is given), ``expansion_rate`` (percent of the hidden size) or
    ``target_parameters`` (a uniform width bringing the model to at most that many parameters).
    ``calibrated`` says calibration batches will be passed to ``plan`` (it decides the default scorer).
    ``glu_only`` (OptiPFair's ``MLP_GLU``) refuses families with a plain MLP.

    Example:
        >>> MLPWidthRequest(remove=16, method="L2").pruning_type
        'MLP'
    """

    kind: ClassVar[str] = "mlp"
    remove: int | None = None
    pruning_percentage: float | None = None
    expansion_rate: float | None = None
    expansion_divisor: int | None = None
    target_parameters: int | None = None
    method: str | None = None
    layer_indices: Sequence[int] | None = None
    layer_allocation: str = "uniform"
    calibrated: bool = False
    gradient_importance: TaylorImportance | None = None
    bias_pairs: Sequence[Sequence[str]] | None = None
    tokenizer: Any = None
    fairness_weight: float = 0.2
    seed: int = 0
    glu_only: bool = False
    scorer: Scorer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        targets = dict(
            remove=self.remove,
            pruning_percentage=self.pruning_percentage,
            expansion_rate=self.expansion_rate,
            target_parameters=self.target_parameters,
        )
        _one_of(targets)
        if all(v is None for v in targets.values()):
            self.pruning_percentage = 10
        check_positive("remove", self.remove, integer=True)
        if self.pruning_percentage is not None:
            check_percentage("pruning_percentage", self.pruning_percentage)
        check_positive("expansion_rate", self.expansion_rate)
        check_positive("expansion_divisor", self.expansion_divisor, integer=True)
        check_positive("target_parameters", self.target_parameters, integer=True)
        if self.remove is not None and self.expansion_divisor is not None:
            raise ValueError("expansion_divisor rounds a target width; a unit count (remove=) is exact.")
        check_layer_allocation(self.layer_allocation, calibrated=self.calibrated, sequential=self.sequential)
        self.check_refit(self.calibrated)
        if self.method is None:
            gradients = self.gradient_importance is not None
            self.method = default_method(
                "mlp", calibrated=self.calibrated, gradients=gradients, sequential=self.sequential
            )
        self.scorer = get_scorer(self.method)  # raises for an unknown name, listing the known ones
        self.method = self.scorer.name
        self.scorer.check_inputs(
            calibrated=self.calibrated,
            gradients=self.gradient_importance is not None,
            pairs=bool(self.bias_pairs) and self.tokenizer is not None,
        )
        if self.sequential:
            check_sequential_scorer(self.method)

    @property
    def pruning_type(self) -> str:
        """OptiPFair's name for this request (``MLP_GLU`` or ``MLP``), as recorded in the event."""
        return "MLP_GLU" if self.glu_only else "MLP"

    def check(self, model: torch.nn.Module) -> None:
        """Refuse what ``model`` cannot do: a plain MLP under ``glu_only``, bad layers, too many units."""
        from .width import mlp_width_targets  # the targets themselves are planned there

        adapter = get_adapter(model)
        if self.glu_only and not adapter.family.is_glu:
            raise ValueError(
                f"{adapter.family.name} has a plain (non-GLU) MLP: use pruning_type='MLP', which prunes "
                "fc1 rows and fc2 columns with the same scorers."
            )
        mlp_width_targets(model, **self.target_arguments())

    def target_arguments(self) -> dict[str, Any]:
        """The width target as :func:`~optipfair_train.pruning.width.mlp_width_targets` takes it."""
        return dict(
            remove=self.remove,
            pruning_percentage=self.pruning_percentage,
            expansion_rate=self.expansion_rate,
            expansion_divisor=self.expansion_divisor,
            target_parameters=self.target_parameters,
            layer_indices=self.layer_indices,
        )

    def settings(self) -> dict[str, Any]:
        """The JSON-ready settings recorded in the plan and the pruning event (OptiPFair's names)."""
        out = dict(
            pruning_type=self.pruning_type,
            method=self.method,
            pruning_percentage=self.pruning_percentage,
            expansion_rate=self.expansion_rate,
            expansion_divisor=self.expansion_divisor,
            target_parameters=self.target_parameters,
            layer_allocation=self.layer_allocation,
            fairness_weight=self.fairness_weight if self.method == "fairness" else None,
        )
        return out | _refit_settings(self)


@dataclass
class HeadRequest(RefitOptions):
    """Remove attention heads, GQA-aware: whole KV groups (``granularity="group"``) or query heads
    inside every group (``"query"``).

    ``remove`` counts the units per layer (groups, or query heads per group); ``pruning_percentage``
    is OptiPFair's share of them (floored; default 25 when neither is given). ``layer_allocation``:
    ``"uniform"`` (the same count in every layer) or ``"global"`` (the same total, ``remove`` x layers or
    the percentage of all units, taken where the scores are lowest; :mod:`.head_allocation`).
    ``method="fairness"`` scores heads by ablation on ``bias_items`` (StereoSet build items, with
    ``tokenizer``), the LM cost weighted by ``fairness_lambda``, ablating exactly every head or only the
    ``fairness_shortlist`` a first-order estimate ranks first (:mod:`.fair_heads`); ``head_ablation``
    gives effects measured before instead (one measurement for several cuts).

    Example:
        >>> HeadRequest(remove=1, method="L2", granularity="query").settings()["head_granularity"]
        'query'
    """

    kind: ClassVar[str] = "heads"
    pruning_type: ClassVar[str] = "ATTENTION"
    remove: int | None = None
    pruning_percentage: float | None = None
    method: str | None = None
    granularity: str = "group"
    layer_indices: Sequence[int] | None = None
    layer_allocation: str = "uniform"
    calibrated: bool = False
    gradient_importance: TaylorImportance | None = None
    bias_items: Sequence[Any] | None = None
    tokenizer: Any = None
    fairness_lambda: float = DEFAULT_FAIRNESS_LAMBDA
    head_ablation: HeadAblation | None = None
    fairness_shortlist: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(dict(remove=self.remove, pruning_percentage=self.pruning_percentage))
        if self.remove is None and self.pruning_percentage is None:
            self.pruning_percentage = 25
        check_positive("remove", self.remove, integer=True)
        if self.pruning_percentage is not None:
            check_percentage("pruning_percentage", self.pruning_percentage)
        check_head_granularity(self.granularity)
        if self.layer_allocation not in HEAD_ALLOCATIONS:
            raise ValueError(
                f"layer_allocation for attention heads must be one of {', '.join(HEAD_ALLOCATIONS)}, "
                f"got {self.layer_allocation!r}."
            )
        self.check_refit(self.calibrated)
        if self.method is None:
            gradients = self.gradient_importance is not None
            self.method = default_method("heads", calibrated=self.calibrated, gradients=gradients)
        check_head_method(
            self.method,
            calibrated=self.calibrated,
            gradients=self.gradient_importance is not None,
            items=bool(self.bias_items) and self.tokenizer is not None or self.head_ablation is not None,
        )
        if self.method == "fairness":
            if self.head_ablation is None:
                check_bias_items(self.bias_items)
            check_fairness_lambda(self.fairness_lambda)
            check_positive("fairness_shortlist", self.fairness_shortlist, integer=True)
        if self.sequential:
            check_sequential_scorer(self.method, "attention")
            if self.layer_allocation == "global":
                raise ValueError(
                    "layer_allocation='global' ranks all layers at once; it cannot be sequential."
                )

    def check(self, model: torch.nn.Module) -> None:
        """Refuse fused q/k/v, bad layers, uneven groups and counts that remove nothing or everything."""
        from .head_allocation import head_remove_total
        from .heads import head_keep_counts, head_units

        if self.layer_allocation == "global":
            units = head_units(model, self.granularity, self.layer_indices)
            head_remove_total(units, self.pruning_percentage, self.remove)
        else:
            head_keep_counts(
                model, self.pruning_percentage, self.granularity, self.layer_indices, remove=self.remove
            )

    def settings(self) -> dict[str, Any]:
        out = dict(
            pruning_type=self.pruning_type,
            method=self.method,
            pruning_percentage=self.pruning_percentage,
            head_granularity=self.granularity,
        )
        if self.layer_allocation != "uniform":
            out["layer_allocation"] = self.layer_allocation
        if self.method == "fairness":
            items = self.head_ablation.num_items if self.head_ablation else len(self.bias_items)
            out |= dict(fairness_lambda=self.fairness_lambda, bias_items=items)
            if self.fairness_shortlist is not None and self.head_ablation is None:
                out["fairness_shortlist"] = self.fairness_shortlist
        return out | _refit_settings(self)


@dataclass
class DepthRequest:
    """Remove whole blocks: ``remove`` of them, or ``depth_pruning_percentage`` (at least one), or the
    ``layer_indices`` themselves (``method="custom"``).

    ``replace_with_linear`` replaces the removed run of consecutive blocks by a fitted linear map folded
    into the block before it (:mod:`.depth_replace`; selection then defaults to ``contiguous``).

    Example:
        >>> DepthRequest(layer_indices=[1, 2]).method
        'custom'
    """

    kind: ClassVar[str] = "depth"
    pruning_type: ClassVar[str] = "DEPTH"
    remove: int | None = None
    depth_pruning_percentage: float | None = None
    layer_indices: Sequence[int] | None = None
    method: str | None = None
    replace_with_linear: bool = False
    linear_damping: float | None = None
    block_metric: str = "cosine"
    calibrated: bool = False
    gradient_importance: TaylorImportance | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.replace_with_linear, bool):
            raise ValueError(f"replace_with_linear must be True or False, got {self.replace_with_linear!r}.")
        if self.method is None:
            if self.layer_indices:
                self.method = "custom"
            elif self.replace_with_linear:
                self.method = "contiguous"
            else:
                gradients = self.gradient_importance is not None
                self.method = default_method("depth", calibrated=self.calibrated, gradients=gradients)
        gradients = self.gradient_importance is not None
        check_layer_selection(
            self.method, calibrated=self.calibrated, gradients=gradients, layer_indices=self.layer_indices
        )
        if self.method == "custom" and (self.remove is not None or self.depth_pruning_percentage is not None):
            raise ValueError("layer_selection_method='custom' removes layer_indices; give no count as well.")
        if self.method != "custom" and (self.remove is None) == (self.depth_pruning_percentage is None):
            raise ValueError(
                "Give exactly one of num_layers_to_remove and depth_pruning_percentage "
                "(or layer_indices with layer_selection_method='custom')."
            )
        check_positive("num_layers_to_remove", self.remove, integer=True)
        if self.depth_pruning_percentage is not None:
            check_percentage("depth_pruning_percentage", self.depth_pruning_percentage)
        if self.replace_with_linear and not self.calibrated:
            raise ValueError("replace_with_linear=True fits the map on calibration data: pass dataloader=...")
        if self.block_metric not in ("cosine", "angular"):
            raise ValueError(f"block_metric must be 'cosine' or 'angular', got {self.block_metric!r}.")

    def count(self, num_layers: int) -> int | None:
        """Blocks to remove from a model of ``num_layers`` (None for ``custom``); at least one stays."""
        from .targets import layers_to_remove_count

        if self.method == "custom":
            return None
        return layers_to_remove_count(num_layers, self.remove, self.depth_pruning_percentage)

    def check(self, model: torch.nn.Module) -> None:
        """Refuse counts that leave no block and custom indices out of range."""
        n = get_adapter(model).num_layers
        self.count(n)
        if self.method == "custom":
            check_layer_indices(self.layer_indices, n)
            if len(set(self.layer_indices)) >= n:
                raise ValueError(f"Cannot remove all {n} layers: at least one must stay.")

    def settings(self) -> dict[str, Any]:
        return dict(pruning_type=self.pruning_type, method=self.method)


def _refit_settings(request: RefitOptions) -> dict[str, Any]:
    if not request.reconstruct:
        return {}
    return dict(reconstruct=True, damping=request.damping, sequential=request.sequential)
