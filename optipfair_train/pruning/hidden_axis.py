"""The hidden-dimension axis in the engine: :class:`HiddenRequest`, its planner and its cutter.

The channel choice, the cut and the refit themselves live in :mod:`.hidden` and :mod:`.hidden_refit`;
this module only connects them to :func:`~optipfair_train.pruning.plan.plan` and
:func:`~optipfair_train.pruning.apply.apply`. The axis is model-wide, so its step keeps its channels
under the layer key ``-1``. It is planned and applied after MLP width (:data:`.axes.AXIS_ORDER`).

Example:
    >>> HiddenRequest(pruning_percentage=25, method="L2").settings()["pruning_type"]
    'HIDDEN'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..arch import get_adapter
from .axes import Axis, Step, check_finite_scores, is_meta, register_axis, scores_json
from .hidden import HIDDEN_METHODS, HiddenPlan, apply_hidden, hidden_keep_count, plan_hidden
from .hidden_refit import apply_hidden_refit, plan_hidden_refit
from .reconstruction import DEFAULT_DAMPING, check_calibration_size
from .refit_options import RefitOptions
from .requests import check_positive, default_method
from .targets import check_percentage

__all__ = ["HiddenRequest"]

MODEL_WIDE = -1  # the layer key of a model-wide axis


@dataclass
class HiddenRequest(RefitOptions):
    """Remove residual (hidden) channels of the whole model: ``remove`` of them, or
    ``pruning_percentage`` (default 10) rounded down to a multiple of ``divisor`` (default the head
    count). ``reconstruct`` refits the stream's readers (:mod:`.hidden_refit`); not sequential.

    Example:
        >>> HiddenRequest(remove=8, method="L2").remove
        8
    """

    kind: ClassVar[str] = "hidden"
    pruning_type: ClassVar[str] = "HIDDEN"
    remove: int | None = None
    pruning_percentage: float | None = None
    divisor: int | None = None
    method: str | None = None
    calibrated: bool = False
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        if self.remove is not None and self.pruning_percentage is not None:
            raise ValueError("Give only one of remove, pruning_percentage.")
        if self.remove is None and self.pruning_percentage is None:
            self.pruning_percentage = 10
        check_positive("remove", self.remove, integer=True)
        if self.pruning_percentage is not None:
            check_percentage("pruning_percentage", self.pruning_percentage)
        self.check_refit(self.calibrated)
        if self.sequential:
            raise ValueError("sequential=True is not available for HIDDEN; its refit is one-shot.")
        if self.method is None:
            self.method = default_method("hidden", calibrated=self.calibrated)
        if self.method not in HIDDEN_METHODS:
            raise ValueError(
                f"Unknown hidden method {self.method!r}; choose one of {', '.join(HIDDEN_METHODS)}."
            )
        if self.method in ("activation", "activation_l2", "pca") and not self.calibrated:
            raise ValueError(f"Hidden method {self.method!r} reads calibration data: pass dataloader=...")
        if self.reconstruct and self.method == "pca":
            raise ValueError(
                "reconstruct=True is not available with method 'pca' (the refit reads axis-aligned channels)."
            )

    def kept(self, model: torch.nn.Module) -> int:
        """Channels kept, checked against the family's config."""
        if self.remove is not None:
            return hidden_keep_count(model, keep=get_adapter(model).hidden_size - self.remove)
        return hidden_keep_count(model, self.pruning_percentage, divisor=self.divisor)

    def check(self, model: torch.nn.Module) -> None:
        """Refuse a family without a hidden axis, and counts that leave no channel."""
        if self.remove is not None and self.remove >= get_adapter(model).hidden_size:
            raise ValueError(
                f"Cannot remove {self.remove} of {get_adapter(model).hidden_size} hidden channels."
            )
        self.kept(model)

    def settings(self) -> dict[str, Any]:
        out = dict(
            pruning_type=self.pruning_type, method=self.method, pruning_percentage=self.pruning_percentage
        )
        if self.reconstruct:
            out.update(reconstruct=True, damping=self.damping, sequential=False)
        return out


def _plan(model, request: HiddenRequest, batches: list | None, show_progress: bool) -> Step:
    kept = request.kept(model)
    step = Step("hidden", request.settings())
    if request.remove is not None:  # OptiPFair's name for the share this count is
        step.settings["pruning_percentage"] = 100.0 * request.remove / get_adapter(model).hidden_size
    if is_meta(model):
        step.shape_only = True
        step.layers = {MODEL_WIDE: {"keep": list(range(kept))}}
        return step
    hidden = plan_hidden(
        model, keep=kept, method=request.method, batches=batches, show_progress=show_progress
    )
    step.layers = {MODEL_WIDE: {"keep": hidden.keep.tolist()}}
    if hidden.scores is not None:
        check_finite_scores({MODEL_WIDE: hidden.scores}, f"{request.method} hidden channel")
        step.layers[MODEL_WIDE]["scores"] = scores_json(hidden.scores)
    if hidden.rotation is not None:
        step.tensors["rotation"] = hidden.rotation
    if request.reconstruct:
        check_calibration_size(batches, kept, request.damping)
        refits = plan_hidden_refit(model, hidden, batches, request.damping, show_progress=show_progress)
        for name, weights in refits.items():
            step.tensors.update({f"hidden_refit/{name}/{j}": w for j, w in enumerate(weights)})
    return step


def _cut(model, step: Step) -> tuple[list, list, dict[str, Any]]:
    adapter = get_adapter(model)
    keep = torch.tensor(step.layers[MODEL_WIDE]["keep"])
    rotation = None if is_meta(model) else step.tensors.get("rotation")  # a rotation keeps every shape
    hidden = HiddenPlan(keep, adapter.hidden_size, step.settings["method"], rotation=rotation)
    slices = apply_hidden(model, hidden)
    refits: dict[str, list[torch.Tensor]] = {}
    for key in sorted(k for k in step.tensors if k.startswith("hidden_refit/")):
        _, name, j = key.split("/")
        refits.setdefault(name, []).insert(int(j), step.tensors[key])
    if not is_meta(model):
        apply_hidden_refit(model, refits)
    summary = hidden.summary()
    summary.pop("method")
    return slices, [], summary


register_axis(Axis("hidden", _plan, _cut, HiddenRequest))
