"""Pre-flight check of a run: every round's pruning planned against the model's shapes, before any
folder is written, so a setting that only a later round would trip over is refused up front.

Each round's requests (:func:`~optipfair_train.pipeline.rounds.round_requests`; for a parameter
budget, the exact unit counts :func:`~optipfair_train.pruning.budget_requests` finds) are planned and applied
with the engine's own :func:`~optipfair_train.pruning.plan` / :func:`~optipfair_train.pruning.apply` on
a shape-only twin of the model (parameters on PyTorch's ``meta`` device: no memory, no arithmetic;
which units go is not decided there, how many is), round after round, so each round sees the shapes
the real round will see.

Example:
    >>> preflight(model, base, load_config("configs/demo.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..analysis import count_parameters
from ..arch import unwrap_model
from ..bias.stereoset_data import StereoSetItem
from ..pruning import apply, plan
from ..pruning.plan import meta_twin
from ..pruning.reconstruction import check_undamped_tokens
from ..pruning.refit_options import CONFIG_KEYS
from .config import LORA_METHODS, PipelineConfig
from .rounds import is_budget, round_requests

__all__ = ["preflight"]

# which setting asks for each kind of request (named in the error)
_SETTING = {"depth": "num_layers_to_remove", "heads": "attention_pruning_percentage"}
# the fairness scorer's inputs arrive with the tokenizer; the shapes do not depend on them
_STAND_IN = "(shapes only)"
_STAND_IN_ITEM = StereoSetItem("intersentence", _STAND_IN, _STAND_IN, _STAND_IN, "a", "b", "c")


def preflight(model: torch.nn.Module, base: dict[str, int], config: PipelineConfig) -> list[int]:
    """Refuse, with the setting at fault, what the model cannot do in some round; prune nothing.

    Returns the parameter count each round will leave (the dry run's shapes are the real ones).

    ``base`` holds the model's ``width``, ``kv_heads`` and ``parameters`` (as ``round_requests`` takes).

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
    if p.reconstruct:  # the engine's rule, on the tokens the run will read (padding not known yet)
        check_undamped_tokens(
            config.data.num_calibration_samples * config.data.calibration_seq_len,
            base["width"],
            p.damping,
            setting=CONFIG_KEYS.setting("damping", 0),
            counted="calibration tokens (num_calibration_samples x calibration_seq_len)",
            at_most=True,
        )
    twin = meta_twin(unwrap_model(model))
    planned = []
    width_setting = "target_parameters" if p.target_parameters else "mlp_pruning_percentage"
    budget = "target_fraction" if p.target_fraction else "target_parameters"
    for k in range(1, p.num_rounds + 1):
        stand_ins = dict(bias_pairs=[_STAND_IN], tokenizer=_STAND_IN, bias_items=[_STAND_IN_ITEM])
        try:
            requests = round_requests(twin, base, config, k, **stand_ins)
        except ValueError as err:
            if not is_budget(p):
                raise
            raise ValueError(
                f"{budget}={getattr(p, budget)} with budget_shares={p.budget_shares!r} cannot be carried out "
                f"in round {k} of {p.num_rounds}: {err}"
            ) from err
        for request in requests:
            setting = budget if is_budget(p) else _SETTING.get(request.kind, width_setting)
            try:
                apply(twin, plan(twin, request))
            except ValueError as err:
                raise ValueError(
                    f"{setting}={getattr(p, setting)} cannot be carried out in round {k} of {p.num_rounds}: "
                    f"{err}"
                ) from err
        planned.append(count_parameters(twin))
    return planned


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
