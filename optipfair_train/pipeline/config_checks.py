"""The rules on the pipeline's settings: names, ranges and combinations that cannot work.

:func:`validate` refuses them before any model is loaded; ``load_config`` applies it to every config
it returns. What depends on the model's shapes is :func:`optipfair_train.pipeline.validate.preflight`.
The settings themselves (sections, defaults, help text, reading YAML and flags) are
:mod:`optipfair_train.pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..names import DTYPES, FAIRNESS_LOSS_OBJECTIVES, LAYER_SELECTION_METHODS, MAX_BIAS_VECTOR_STRENGTH
from .config import HEAL_METHODS, LORA_METHODS, TEACHER_TEXT, PipelineConfig, PruningConfig, fairness_heads

__all__ = ["validate"]


def _check_positive(section: Any, names: tuple[str, ...], minimum: float = 1) -> None:
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum:g}, got {value}.")


def _check_refit(p: PruningConfig) -> None:
    """The refit settings, by the requests' own rules (worded with this file's keys)."""
    from ..pruning.refit_options import CONFIG_KEYS, RefitOptions, check_refit_target
    from ..pruning.sequential import check_sequential_scorer  # imported late, as in validate

    refit = RefitOptions(reconstruct=p.reconstruct, damping=p.damping, sequential=p.sequential)
    refit.check_refit(calibrated=True, wording=CONFIG_KEYS)  # the pipeline always has calibration data
    widths = bool(
        p.mlp_pruning_percentage or p.attention_pruning_percentage or p.target_parameters or p.target_fraction
    )
    check_refit_target(p.reconstruct, p.sequential, refits=widths, wording=CONFIG_KEYS)
    # the pipeline's own rules: depth pruning's settings are separate keys, and its block selection is
    # one of several methods, of which only contiguous always removes one run
    if p.replace_with_linear and not p.num_layers_to_remove:
        raise ValueError("replace_with_linear: true applies to depth pruning: set num_layers_to_remove.")
    if p.replace_with_linear and p.layer_selection_method != "contiguous":
        raise ValueError(
            "replace_with_linear: true replaces one run of consecutive blocks: set "
            f"layer_selection_method: contiguous (got {p.layer_selection_method!r})."
        )
    if p.sequential:
        check_sequential_scorer(p.neuron_selection_method)  # the rule the width request applies


def _check_fairness_loss(config: PipelineConfig) -> None:
    """The fairness settings of healing: the loss on StereoSet build items, the bias vector subtracted after
    it, and counterfactual text."""
    h, d = config.heal, config.data
    if h.fairness_loss_weight < 0:
        raise ValueError(f"fairness_loss_weight must be >= 0 (0 = off), got {h.fairness_loss_weight}.")
    _check_positive(h, ("fairness_loss_items", "fairness_loss_batch"))
    if h.fairness_loss_objective not in FAIRNESS_LOSS_OBJECTIVES:
        raise ValueError(
            f"fairness_loss_objective must be one of {', '.join(FAIRNESS_LOSS_OBJECTIVES)}, got "
            f"{h.fairness_loss_objective!r}."
        )
    if h.fairness_loss_weight > 0 and not d.stereoset_data:
        raise ValueError(
            "fairness_loss_weight > 0 trains on StereoSet build items: set stereoset_data (e.g. 'default')."
        )
    if h.fairness_loss_weight > 0 and h.heal_method == "none":
        raise ValueError(
            "fairness_loss_weight > 0 acts during healing: choose a heal_method other than none."
        )
    if not 0 <= h.bias_vector_strength <= MAX_BIAS_VECTOR_STRENGTH:
        raise ValueError(
            f"bias_vector_strength must be in [0, {MAX_BIAS_VECTOR_STRENGTH:g}] (0 = off), got {h.bias_vector_strength}."
        )
    _check_positive(h, ("bias_vector_items", "bias_vector_epochs"))
    if not (h.bias_vector_learning_rate > 0 and math.isfinite(h.bias_vector_learning_rate)):
        raise ValueError(
            f"bias_vector_learning_rate must be a positive number, got {h.bias_vector_learning_rate}."
        )
    if h.bias_vector_strength > 0 and not d.stereoset_data:
        raise ValueError(
            "bias_vector_strength > 0 fits the vector on StereoSet build items: set stereoset_data (e.g. 'default')."
        )
    if h.counterfactual_augmentation and (
        h.heal_method in ("none", "sft", "sft_lora") or d.heal_data == TEACHER_TEXT
    ):
        raise ValueError(
            "counterfactual_augmentation: true swaps genders in plain healing text: it needs heal_method "
            f"lora, kd or kd_lora and a heal_data other than {TEACHER_TEXT!r} (got heal_method "
            f"{h.heal_method!r}, heal_data {d.heal_data!r})."
        )


def validate(config: PipelineConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded (names, ranges, combinations).

    What depends on the model's shapes (every round's pruning) is checked by
    :func:`optipfair_train.pipeline.validate.preflight` once the model is loaded, before any folder.

    Example:
        >>> from optipfair_train.pipeline.config import load_config
        >>> validate(load_config(None, ["--lora_r", "8"]))
    """
    from ..pruning import get_scorer
    from .rounds import check_budget

    p, h, d = config.pruning, config.heal, config.data
    for section in (config.model, d, p, h, config.run):  # inf / nan pass every range check below
        for name, value in dataclasses.asdict(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}.")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config.model.dtype!r}.")
    _check_positive(
        d,
        (
            "num_calibration_samples",
            "calibration_seq_len",
            "heal_seq_len",
            "eval_tokens",
            "eval_seq_len",
            "behaviour_sample_size",
            "stereoset_sample_size",
            "zeroshot_sample_size",
        ),
    )
    if p.num_rounds < 1:
        raise ValueError(f"num_rounds must be at least 1, got {p.num_rounds}.")
    for name in ("mlp_pruning_percentage", "attention_pruning_percentage"):
        value = getattr(p, name)
        if not 0 <= value < 100:
            raise ValueError(f"{name} must be in [0, 100), got {value}.")
    if p.num_layers_to_remove < 0 or p.target_parameters < 0:
        raise ValueError("num_layers_to_remove and target_parameters must not be negative.")
    if p.target_parameters and p.mlp_pruning_percentage:
        raise ValueError("Give mlp_pruning_percentage or target_parameters, not both.")
    check_budget(p)
    if not (
        p.mlp_pruning_percentage
        or p.attention_pruning_percentage
        or p.num_layers_to_remove
        or p.target_parameters
        or p.target_fraction
    ):
        raise ValueError(
            "Nothing to prune: set mlp_pruning_percentage, attention_pruning_percentage, "
            "num_layers_to_remove, target_parameters or target_fraction."
        )
    try:
        get_scorer(p.neuron_selection_method)
    except ValueError as err:
        raise ValueError(f"neuron_selection_method: {err}") from err
    layer_methods = [m for m in LAYER_SELECTION_METHODS if m != "custom"]  # custom needs indices
    if p.layer_selection_method not in layer_methods:
        raise ValueError(
            f"layer_selection_method must be one of {', '.join(layer_methods)}, "
            f"got {p.layer_selection_method!r}."
        )
    if not 0 <= p.fairness_weight <= 1:
        raise ValueError(f"fairness_weight must be in [0, 1], got {p.fairness_weight}.")
    if p.fairness_lambda < 0:
        raise ValueError(f"fairness_lambda must be >= 0, got {p.fairness_lambda}.")
    _check_positive(p, ("fairness_items",))
    _check_positive(p, ("fairness_shortlist",), minimum=0)
    if fairness_heads(config) and not d.stereoset_data:
        raise ValueError(
            "neuron_selection_method=fairness with attention_pruning_percentage scores heads on StereoSet "
            "build items: set stereoset_data (e.g. 'default'), or use another method for the heads."
        )
    _check_refit(p)
    methods = HEAL_METHODS
    if h.heal_method not in methods:
        raise ValueError(f"heal_method must be one of {', '.join(methods)}, got {h.heal_method!r}.")
    if h.heal_method != "none" and (h.heal_steps < 1 or h.learning_rate <= 0):
        raise ValueError("heal_steps must be >= 1 and learning_rate > 0 when healing.")
    _check_positive(h, ("per_device_batch_size", "gradient_accumulation_steps"))
    _check_positive(config.run, ("save_steps",))
    if h.heal_method in LORA_METHODS:
        _check_positive(h, ("lora_r", "lora_alpha"))
        if not h.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module for LoRA healing.")
    if not 0 <= h.kd_alpha <= 1 or h.kd_temperature <= 0:
        raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0.")
    _check_positive(h, ("nan_retries", "kd_top_k"), minimum=0)
    if config.data.heal_data == TEACHER_TEXT and h.heal_method in ("sft", "sft_lora"):
        raise ValueError(
            f"heal_data: {TEACHER_TEXT!r} is plain text for lora/kd/kd_lora; sft/sft_lora need instruction "
            "data (a .jsonl/.json file or a datasets name with 'messages' or 'prompt'/'completion')."
        )
    _check_fairness_loss(config)
    if not 0 < h.nan_lr_factor <= 1:
        raise ValueError(f"nan_lr_factor must be in (0, 1], got {h.nan_lr_factor}.")
    if config.run.report_to not in ("wandb", "tensorboard", "none"):
        raise ValueError(f"report_to must be wandb, tensorboard or none, got {config.run.report_to!r}.")
