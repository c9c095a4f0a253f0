"""Configuration of the prune-then-heal pipeline: dataclasses with help text, read from YAML + flags.

YAML keys and command-line flags are the same names (``pruning_percentage: 20`` in YAML is
``--pruning_percentage 20`` on the command line); flags given after ``--config`` override the file.
Unknown keys are refused with the list of accepted ones.

Example:
    >>> config = load_config("configs/demo.yaml", ["--num_rounds", "1"])  # doctest: +SKIP
    >>> config.heal.method  # doctest: +SKIP
    'lora'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

__all__ = [
    "ModelConfig",
    "DataConfig",
    "PruningConfig",
    "HealConfig",
    "RunConfig",
    "PipelineConfig",
    "load_config",
    "config_keys",
]


def _help(text: str, default: Any) -> Any:
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    model_path: str = _help("'demo' (SmolLM2-135M-Instruct, offline), a local folder or a hub name", "demo")
    dtype: str = _help("float32, bfloat16 or float16", "float32")


@dataclass
class DataConfig:
    calibration_data: str = _help(
        "text for importance statistics: 'demo', a file, or a datasets name", "demo"
    )
    heal_data: str = _help(
        "healing text: 'demo', a file, or a datasets name; for sft/sft_lora also instruction data "
        "(.jsonl/.json or datasets with 'messages' or 'prompt'/'completion')",
        "demo",
    )
    eval_data: str = _help("held-out text for perplexity; never the calibration or healing text", "demo")
    num_calibration_samples: int = _help("calibration sequences", 8)
    calibration_seq_len: int = _help("tokens per calibration sequence", 256)
    heal_seq_len: int = _help("tokens per healing sequence (sft: the maximum length)", 256)
    eval_tokens: int = _help("tokens scored for perplexity (fixed across rounds)", 4096)
    eval_seq_len: int = _help("tokens per perplexity window", 512)
    bias_pairs: str = _help("'default', 'crows-pairs:PATH', a .jsonl/.csv file or a datasets name", "default")
    behaviour_pairs: str = _help(
        "sentence pairs for the behavioural score ('' to skip), e.g. crows-pairs:PATH", ""
    )
    behaviour_sample_size: int = _help("pairs scored for the behavioural score each round", 200)


@dataclass
class PruningConfig:
    # One round by default: at an equal healing budget (24k LoRA tokens, MLP -30%, demo model) one-shot
    # ended at perplexity 44.6 vs 52.8 for three rounds (docs/benchmarks.md, "Iterative vs one-shot").
    num_rounds: int = _help(
        "rounds of prune -> heal -> evaluate; each removes an equal share of the target", 1
    )
    mlp_pruning_percentage: float = _help(
        "final share of MLP neurons removed (of the original width); 0 = none", 20.0
    )
    neuron_selection_method: str = _help(
        "neuron scorer: activation, taylor, fairness, MAW, VOW, PON, L2, random", "activation"
    )
    attention_pruning_percentage: float = _help("final share of KV groups removed; 0 = none", 0.0)
    num_layers_to_remove: int = _help("final number of blocks removed; 0 = none", 0)
    layer_selection_method: str = _help(
        "block selection: importance, contiguous, taylor, last, first", "importance"
    )
    target_parameters: int = _help(
        "alternatively: prune MLP width until at most this many parameters; 0 = off", 0
    )
    fairness_weight: float = _help("weight of the bias gap with neuron_selection_method=fairness", 0.2)


@dataclass
class HealConfig:
    heal_method: str = _help(
        "lora, kd (distillation from the unpruned model), kd_lora, sft / sft_lora (TRL SFTTrainer on "
        "heal_data), or none",
        "lora",
    )
    heal_steps: int = _help("optimizer steps of healing per round", 40)
    learning_rate: float = _help("peak learning rate of healing", 2e-4)
    per_device_batch_size: int = _help("sequences per device per step", 4)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    lora_r: int = _help("LoRA rank", 16)
    lora_alpha: int = _help("LoRA alpha", 32)
    lora_target_modules: list[str] = _help(
        "modules that get LoRA adapters",
        lambda: ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"],
    )
    teacher_model_path: str = _help("distillation teacher; '' = the unpruned model itself", "")
    kd_temperature: float = _help("distillation temperature", 2.0)
    kd_alpha: float = _help("weight of the distillation loss (1 - kd_alpha on cross-entropy)", 0.9)
    nan_retries: int = _help("times a round whose healing loss became NaN/inf is retried", 2)
    nan_lr_factor: float = _help("learning-rate multiplier for each retry", 0.5)


@dataclass
class RunConfig:
    output_dir: str = _help("where rounds, checkpoints and the final model go", "outputs/prune-heal")
    seed: int = _help("seed of data order, LoRA init and sampling", 0)
    report_to: str = _help(
        "wandb, tensorboard or none; W&B runs offline unless WANDB_MODE says otherwise", "wandb"
    )
    run_name: str = _help("W&B run name", "prune-heal")
    save_steps: int = _help("healing checkpoint interval (steps), for resume", 10)
    show_progress: bool = _help("progress bars", True)


HEAL_METHODS = ("lora", "kd", "kd_lora", "sft", "sft_lora", "none")
LORA_METHODS = ("lora", "kd_lora", "sft_lora")
SECTIONS = (ModelConfig, DataConfig, PruningConfig, HealConfig, RunConfig)


@dataclass
class PipelineConfig:
    """All settings of one :class:`~optipfair_train.pipeline.PruneThenHeal` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def config_keys() -> list[str]:
    """Every accepted YAML key / flag name."""
    return [f.name for section in SECTIONS for f in dataclasses.fields(section)]


def _as_flags(values: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *[str(v).lower() if isinstance(v, bool) else str(v) for v in items]]
    return flags


def load_config(path: str | Path | None = None, args: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (flat keys) and apply command-line flags on top; validate everything.

    Example:
        >>> load_config(None, ["--heal_method", "none"]).heal.heal_method
        'none'
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values at the top level.")
        unknown = sorted(set(values) - set(config_keys()))
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {', '.join(unknown)}. Accepted keys: {', '.join(config_keys())}."
            )
    parser = HfArgumentParser(SECTIONS)
    try:
        parsed = parser.parse_args_into_dataclasses(
            _as_flags(values) + list(args or []), look_for_args_file=False
        )
    except (SystemExit, ValueError) as err:  # argparse exits on a bad flag; make it an error to handle
        raise ValueError(
            f"Invalid configuration flags {args!r}; accepted: --{', --'.join(config_keys())}."
        ) from err
    config = PipelineConfig(*parsed)
    validate(config)
    return config


def validate(config: PipelineConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    p, h = config.pruning, config.heal
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
    if not (
        p.mlp_pruning_percentage
        or p.attention_pruning_percentage
        or p.num_layers_to_remove
        or p.target_parameters
    ):
        raise ValueError(
            "Nothing to prune: set mlp_pruning_percentage, attention_pruning_percentage, "
            "num_layers_to_remove or target_parameters."
        )
    methods = HEAL_METHODS
    if h.heal_method not in methods:
        raise ValueError(f"heal_method must be one of {', '.join(methods)}, got {h.heal_method!r}.")
    if h.heal_method != "none" and (h.heal_steps < 1 or h.learning_rate <= 0):
        raise ValueError("heal_steps must be >= 1 and learning_rate > 0 when healing.")
    if not 0 <= h.kd_alpha <= 1 or h.kd_temperature <= 0:
        raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0.")
    if config.run.report_to not in ("wandb", "tensorboard", "none"):
        raise ValueError(f"report_to must be wandb, tensorboard or none, got {config.run.report_to!r}.")
