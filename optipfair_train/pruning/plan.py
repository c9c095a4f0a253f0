"""``plan``: what a set of pruning requests would remove, and what it would cost, before any weight changes.

A :class:`PruningPlan` lists, per axis and per layer, the units that stay, the scores that decided them,
the refits computed for them and the parameter count before and after; it records a fingerprint of
the model it was made for, so :func:`~optipfair_train.pruning.apply.apply` refuses any other model.
It is plain JSON (``to_json``/``from_json``: a person can read and diff two plans); computed weights
(refits, a depth linear replacement) go beside it in ``save``/``load``.

On a meta-device model (no weight values) a plan knows how many units each layer loses, the
parameter counts and the fingerprint, but not which units: the pipeline's pre-flight check is such a
plan. Several requests are planned in :data:`~optipfair_train.pruning.axes.AXIS_ORDER` (depth, heads,
MLP width), each on the model as the steps before it leave it; for that the steps after the first are
planned on a copy of the model (a copy of its shapes only, on a meta-device model).

Example: see :func:`plan`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from .axes import AXES, AXIS_ORDER, Step, is_meta
from .calibration import as_batches
from .requests import Request

logger = logging.getLogger(__name__)

__all__ = ["PruningPlan", "plan", "model_fingerprint", "check_model", "meta_twin"]

PLAN_FORMAT = "optipfair-train pruning plan"
PLAN_NAME, TENSORS_NAME = "plan.json", "plan-tensors.safetensors"


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a plan depends on: family, widths, head counts, depth and how many prunings came before.

    Example:
        >>> model_fingerprint(model)["num_layers"]  # doctest: +SKIP
        4
    """
    adapter = get_adapter(model)
    return {
        "family": adapter.config.model_type,
        "hidden_size": adapter.hidden_size,
        "num_layers": adapter.num_layers,
        "intermediate_sizes": adapter.intermediate_sizes(),
        "head_counts": [list(adapter.head_counts(i)) for i in range(adapter.num_layers)],
        "pruning_history": len(getattr(adapter.config, "pruning_history", None) or []),
    }


def _first_mismatch(planned: dict[str, Any], found: dict[str, Any]) -> str | None:
    for key, want in planned.items():
        have = found.get(key)
        if have == want:
            continue
        if isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
            i = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
            return f"{key} of layer {i}: the plan was made for {want[i]}, the model has {have[i]}"
        return f"{key}: the plan was made for {want}, the model has {have}"
    return None


def check_model(model: torch.nn.Module) -> None:
    """Refuse a quantized model, and real weights holding NaN/Inf (naming the first such parameter)."""
    model = unwrap_model(model)
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "Cannot prune a quantized model: load it in float32/bfloat16 (for a GGUF, drop the "
            "quantizer flags after loading; see optipfair_train.models)."
        )
    for name, param in model.named_parameters():
        if param.device.type != "meta" and param.is_floating_point() and not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(
                f"Parameter {name} holds {bad} NaN/Inf value(s): every score computed through it would be "
                "meaningless. Reload the weights (or fix the training that produced them); nothing was pruned."
            )


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (wrappers, LoRA layers, tied weights included) whose tensors are on the meta
    device: shapes only, no memory. Cutting it shows what a cut would leave.

    Example:
        >>> count_parameters(meta_twin(model)) == count_parameters(model)  # doctest: +SKIP
        True
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or id(t) in memo:
                    continue
                empty = torch.empty_like(t, device="meta")
                memo[id(t)] = (
                    torch.nn.Parameter(empty, t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
                )
    return copy.deepcopy(model, memo)


@dataclass
class PruningPlan:
    """The steps of a plan (one per axis, in the order they are applied) and the model they are for.

    Example:
        >>> p = plan(model, [MLPWidthRequest(remove=8, method="L2")])  # doctest: +SKIP
        >>> PruningPlan.from_json(p.to_json()).kept_counts() == p.kept_counts()  # doctest: +SKIP
        True
    """

    fingerprint: dict[str, Any]
    steps: list[Step] = field(default_factory=list)

    @property
    def parameters_before(self) -> int:
        return self.steps[0].parameters_before if self.steps else 0

    @property
    def parameters_after(self) -> int:
        return self.steps[-1].parameters_after if self.steps else 0

    @property
    def shape_only(self) -> bool:
        return any(s.shape_only for s in self.steps)

    def kept_counts(self) -> dict[str, dict]:
        """Per axis, the units each layer keeps (what a meta-device plan and a real one share)."""
        return {s.kind: s.kept_counts() for s in self.steps}

    def summary(self) -> dict[str, Any]:
        """Everything but which units go and their scores: kept counts, parameter counts, fingerprint."""
        return {
            "fingerprint": self.fingerprint,
            "kept": self.kept_counts(),
            "parameters": [(s.parameters_before, s.parameters_after) for s in self.steps],
        }

    def to_dict(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            steps.append(
                {
                    "kind": s.kind,
                    "settings": s.settings,
                    "parameters_before": s.parameters_before,
                    "parameters_after": s.parameters_after,
                    "shape_only": s.shape_only,
                    "tensors": sorted(s.tensors),
                    "layers": {str(i): layer for i, layer in s.layers.items()},
                }
            )
        return {"format": PLAN_FORMAT, "version": 1, "fingerprint": self.fingerprint, "steps": steps}

    def to_json(self) -> str:
        """The plan as indented JSON, lists of numbers on one line (one line per layer's units or scores,
        so two plans diff line by line); computed tensors are named, not included (see :meth:`save`)."""
        text = json.dumps(self.to_dict(), indent=1)
        return re.sub(
            r"\[([-+\d.,\se]*?)\]",
            lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
            text,
        )

    @classmethod
    def from_json(cls, text: str, tensors: dict[str, torch.Tensor] | None = None) -> PruningPlan:
        """Read a plan back; ``tensors`` (``"<step>/<name>"``) supplies the computed weights it names."""
        data = json.loads(text)
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"Not a pruning plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r}).")
        steps = []
        for n, s in enumerate(data["steps"]):
            if s["kind"] not in AXES:
                raise ValueError(
                    f"Plan step {n} is for the axis {s['kind']!r}; known axes: {', '.join(AXES)}."
                )
            named = {k: (tensors or {}).get(f"{n}/{k}") for k in s["tensors"]}
            missing = [k for k, v in named.items() if v is None]
            if missing:
                raise ValueError(
                    f"Plan step {n} ({s['kind']}) needs the computed weights {', '.join(missing)}: load the plan "
                    f"with PruningPlan.load(folder), which reads them from {TENSORS_NAME}."
                )
            step = Step(
                s["kind"],
                s["settings"],
                {int(i): layer for i, layer in s["layers"].items()},
                s["parameters_before"],
                s["parameters_after"],
                s["shape_only"],
                named,
            )
            steps.append(step)
        return cls(data["fingerprint"], steps)

    def save(self, folder: str | Path) -> Path:
        """Write ``plan.json`` (and ``plan-tensors.safetensors`` when the plan computed weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}/{k}": v.contiguous() for n, s in enumerate(self.steps) for k, v in s.tensors.items()}
        if tensors:
            save_file(tensors, folder / TENSORS_NAME)
        (folder / PLAN_NAME).write_text(self.to_json())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> PruningPlan:
        """Read a plan written by :meth:`save`."""
        folder = Path(folder)
        tensors = load_file(folder / TENSORS_NAME) if (folder / TENSORS_NAME).is_file() else {}
        return cls.from_json((folder / PLAN_NAME).read_text(), tensors)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this plan was not made for, naming the first difference."""
        mismatch = _first_mismatch(self.fingerprint, model_fingerprint(model))
        if mismatch:
            raise ValueError(
                f"This pruning plan was made for another model ({mismatch}); nothing was pruned."
            )


def plan(
    model: torch.nn.Module,
    requests: Request | Sequence[Request],
    calibration: Iterable | None = None,
    *,
    show_progress: bool = False,
) -> PruningPlan:
    """Plan ``requests`` on ``model`` without changing it: which units go, refits, scores, parameter counts.

    ``calibration``: batches (dicts with ``input_ids`` and ``attention_mask``) for data-driven scorers and
    refits; a request made with ``calibrated=True`` needs them (others ignore them).
    Impossible requests (more units than a layer has, an axis the family lacks) and non-finite weights or
    scores are refused here, before anything changes.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, AutoModelForCausalLM
        >>> from optipfair_train.pruning import plan, apply, MLPWidthRequest, HeadRequest
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> p = plan(model, [MLPWidthRequest(remove=16, method="L2"), HeadRequest(remove=1, method="L2")])
        >>> [step.kind for step in p.steps], p.kept_counts()["mlp"]
        (['heads', 'mlp'], {0: 48, 1: 48})
        >>> p.parameters_before - p.parameters_after
        6144
        >>> events = apply(model, p)
        >>> model.config.intermediate_size, model.config.num_key_value_heads
        (48, 1)
    """
    requests = [requests] if not isinstance(requests, (list, tuple)) else list(requests)
    if not requests:
        raise ValueError("plan needs at least one request (MLPWidthRequest, HeadRequest, DepthRequest, ...).")
    for r in requests:
        if getattr(r, "kind", None) not in AXES or not isinstance(r, AXES[r.kind].request_type):
            raise ValueError(
                f"Not a pruning request: {r!r}; build one of {', '.join(a.request_type.__name__ for a in AXES.values())}."
            )
    kinds = [r.kind for r in requests]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"One request per axis in a plan; got {', '.join(kinds)}.")
    requests.sort(key=lambda r: AXIS_ORDER.index(r.kind))
    # token ids are checked against the vocabulary (the unwrapped model's, a PEFT model's too)
    vocab_size = get_adapter(model).model.get_input_embeddings().num_embeddings
    batches = as_batches(calibration, vocab_size) if calibration is not None else None
    meta = is_meta(model)
    for r in requests:  # a meta-device model reads no data: its data-driven steps are shapes only
        if getattr(r, "calibrated", False) and batches is None and not meta:
            raise ValueError(
                f"The {r.kind} request was made for calibration data (calibrated=True): pass calibration=..."
            )
    check_model(model)
    requests[0].check(model)
    result = PruningPlan(model_fingerprint(model))
    work = model
    for n, request in enumerate(requests):
        if n:  # the shapes the earlier steps leave decide what this one can do
            request.check(work)
        step = AXES[request.kind].plan(work, request, batches, show_progress)
        step.parameters_before = count_parameters(work)
        if work is model:  # never cut the caller's model: later steps are planned on a copy
            last = n == len(requests) - 1
            work = meta_twin(model) if last or meta else copy.deepcopy(model)
        AXES[request.kind].cut(work, step)
        step.parameters_after = count_parameters(work)
        result.steps.append(step)
    return result
