"""Pre-flight check of a run: every round's pruning dry-run against the model's shapes, before any
folder is written, so a setting that only a later round would trip over is refused up front.

The dry run prunes a shape-only twin of the model (parameters on PyTorch's ``meta`` device: no memory,
no arithmetic) with the same plan functions the engine uses, round after round, so the round plan
(:func:`~optipfair_train.pipeline.rounds.round_prunings`) sees the shapes each real round will see.

Example:
    >>> preflight(model, base, load_config("configs/demo.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from ..pruning.heads import HeadPlan, apply_head_plan
from ..pruning.surgery import remove_layers
from ..pruning.targets import layers_to_remove_count
from ..pruning.width import apply_width_plan, plan_mlp_width
from .config import LORA_METHODS, PipelineConfig
from .rounds import round_prunings

__all__ = ["preflight"]

# which setting asks for each kind of pruning step (named in the error)
_SETTING = {"DEPTH": "num_layers_to_remove", "ATTENTION": "attention_pruning_percentage"}


def preflight(model: torch.nn.Module, base: dict[str, int], config: PipelineConfig) -> list[int]:
    """Refuse, with the setting at fault, what the model cannot do in some round; prune nothing.

    Returns the parameter count each round will leave (the dry run's shapes are the real ones).

    ``base`` holds the model's ``width``, ``kv_heads`` and ``parameters`` (as ``round_prunings`` takes).

    Example:
        >>> preflight(model, base, load_config(None, ["--num_layers_to_remove", "30"]))  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: num_layers_to_remove=30 cannot be carried out in round 1 of 1: Cannot remove 30 of 30 ...
    """
    p = config.pruning
    if p.target_parameters and p.target_parameters >= base["parameters"]:
        raise ValueError(
            f"target_parameters {p.target_parameters:,} is already reached: the model "
            f"has {base['parameters']:,} parameters."
        )
    _check_lora_targets(model, config)
    tokens = config.data.num_calibration_samples * config.data.calibration_seq_len
    if p.reconstruct and p.damping == 0 and tokens < base["width"]:
        raise ValueError(
            f"reconstruct with damping: 0 needs at least as many calibration tokens as kept neurons (up to "
            f"{base['width']}); num_calibration_samples x calibration_seq_len = {tokens}. Give more "
            "calibration data or damping > 0."
        )
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(unwrap_model(model).config))
    planned = []
    for k in range(1, p.num_rounds + 1):
        for step in round_prunings(twin, base, config, k):
            kind = step["pruning_type"]
            width_setting = "target_parameters" if p.target_parameters else "mlp_pruning_percentage"
            setting = _SETTING.get(kind, width_setting)
            try:
                _prune_shapes(twin, step)
            except ValueError as err:
                raise ValueError(
                    f"{setting}={getattr(p, setting)} cannot be carried out in round {k} of {p.num_rounds}: "
                    f"{err}"
                ) from err
        planned.append(count_parameters(twin))
    return planned


def _prune_shapes(twin: torch.nn.Module, step: dict[str, Any]) -> None:
    """Apply one ``prune_model`` step's shape change to the meta twin (which units go does not matter)."""
    adapter = get_adapter(twin)
    kind = step["pruning_type"]
    if kind == "DEPTH":
        n = layers_to_remove_count(adapter.num_layers, step["num_layers_to_remove"], None)
        remove_layers(adapter, list(range(adapter.num_layers - n, adapter.num_layers)))
    elif kind == "ATTENTION":
        n_q, n_kv, _ = adapter.head_counts(0)
        kept = n_kv - int(step["pruning_percentage"] / 100 * n_kv + 1e-9)
        if n_q % n_kv or not 0 < kept < n_kv:
            raise ValueError(f"{n_kv} key/value groups of {n_q} query heads cannot lose {n_kv - kept}.")
        group = n_q // n_kv
        plan = HeadPlan(torch.arange(kept * group), torch.arange(kept))
        apply_head_plan(twin, dict.fromkeys(range(adapter.num_layers), plan))
    else:  # the engine's own width planning; weight norms of meta tensors cost nothing
        plan = plan_mlp_width(
            twin,
            method="L2",
            pruning_percentage=step.get("pruning_percentage"),
            target_parameters=step.get("target_parameters"),
        )
        apply_width_plan(twin, {i: torch.arange(len(kept)) for i, kept in plan.items()})


def _check_lora_targets(model: torch.nn.Module, config: PipelineConfig) -> None:
    h = config.heal
    if h.heal_method not in LORA_METHODS:
        return
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    }
    missing = [name for name in h.lora_target_modules if name not in linear]
    if missing:
        raise ValueError(
            f"lora_target_modules {', '.join(missing)} name no linear layer of the model; "
            f"it has {', '.join(sorted(linear))}."
        )
