"""The ``optipfair-train`` argument parser: one vocabulary, defaults in every help, nothing heavy imported.

Flags are the library's argument names with dashes (``--neuron-selection-method``, ``--pruning-percentage``,
``--output-dir``); ``run`` takes the pipeline's config keys with dashes or underscores. Older spellings
(``--method``, ``--output-path``) still work and are left out of the help. Building the parser imports
neither torch nor transformers (the names it offers come from :mod:`.names`, the zero-shot tasks from
:mod:`.zeroshot.tasks`, the config keys from :mod:`.pipeline.config`), so every command's ``--help`` and
argument mistakes answer at once; only the chosen command's own arguments are built.

This module builds the parser and owns the shared flags (model, device, calibration data) and those of
``demo``, ``prune``, ``analyze`` and ``run``; the flags of ``probe``, ``eval`` and ``search`` are
:mod:`.cli_parser_measure` (importable from here too).

Example:
    >>> build_parser("prune").parse_args(["prune", "--pruning-percentage", "20", "--output-dir", "out"]).output_dir
    'out'
"""

from __future__ import annotations

import argparse

from .lazy import lazy_attributes
from .names import (
    BUILTIN_SCORERS,
    DEFAULT_DAMPING,
    DEFAULT_METHODS,
    DTYPES,
    LAYER_SELECTION_METHODS,
    PRUNING_TYPES,
)

__all__ = ["build_parser", "percentage"]

# the measuring commands' flags build on this module's shared ones: loaded on first use
__getattr__, __dir__ = lazy_attributes(
    __name__,
    dict.fromkeys(
        ("add_eval_arguments", "add_probe_arguments", "add_search_arguments"),
        f"{__package__}.cli_parser_measure",
    ),
)

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
        "than memory; implies --reconstruct, and --sequential for MLP/MLP_GLU/ATTENTION; HIDDEN reads the "
        "checkpoint twice)",
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
    from .cli_parser_measure import add_eval_arguments, add_probe_arguments, add_search_arguments

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
