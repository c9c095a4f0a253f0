"""The command line: one vocabulary, defaults in help, mistakes refused before any model loads, a fast --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pipeline_helpers import ROOT

from optipfair_train import cli
from optipfair_train.cli_parser import (
    BUILTIN_SCORERS,
    DEFAULT_DAMPING,
    LAYER_SELECTION_METHODS,
    PRUNING_TYPES,
    build_parser,
)

NO_TORCH = """
import sys
from optipfair_train.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("IMPORTED", heavy)
sys.exit(code)
"""


def _no_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_help_and_argument_mistakes_import_no_torch():
    top = _no_torch("--help")
    assert top.returncode == 0 and "IMPORTED []" in top.stdout
    assert "``" not in top.stdout and "optipfair-train demo" in top.stdout  # plain text, a first command
    for command in ("demo", "prune", "analyze", "run", "probe", "eval"):
        assert command in top.stdout
    prune = _no_torch("prune", "--help")
    assert prune.returncode == 0 and "IMPORTED []" in prune.stdout
    assert "--output-dir" in prune.stdout and "--output-path" not in prune.stdout  # the old spelling hidden
    assert "(default: MLP_GLU)" in prune.stdout and "(default: 0.01)" in prune.stdout
    bad = _no_torch("prune", "--pruning-percentage", "120", "--output-dir", "x")
    assert bad.returncode == 2 and "between 0 and 100" in bad.stderr
    no_target = _no_torch("prune", "--output-dir", "x")
    assert no_target.returncode == 2 and "prune needs a target: --pruning-percentage" in no_target.stderr
    assert "IMPORTED []" in no_target.stdout


def test_unknown_method_is_refused_before_the_demo_model_is_measured(monkeypatch, capsys):
    import optipfair_train.models as models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the method was checked")

    monkeypatch.setattr(models, "load_model_and_tokenizer", never)
    assert cli.main(["demo", "--method", "nonsense"]) == 2
    assert "unknown --neuron-selection-method 'nonsense'" in capsys.readouterr().err
    assert (
        build_parser("demo").parse_args(["demo"]).neuron_selection_method == "hybrid"
    )  # the library's default


def test_old_spellings_still_work_and_mean_the_same():
    parser = build_parser("prune")
    new = parser.parse_args(
        ["prune", "--neuron-selection-method", "MAW", "--output-dir", "p", "--pruning-percentage", "20"]
    )
    old = parser.parse_args(["prune", "--method", "MAW", "--output-path", "p", "--pruning-percentage", "20"])
    assert vars(new) == vars(old)
    assert parser.parse_args(["prune"]).neuron_selection_method is None  # prune_model chooses (hybrid)


def test_run_help_lists_the_config_keys(capsys):
    from optipfair_train.pipeline.config import config_keys

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {key} (default: " in text for key in config_keys())


def test_the_parser_names_agree_with_the_engine():
    from optipfair_train.pruning import LAYER_SELECTION_METHODS as layer_methods
    from optipfair_train.pruning import PRUNING_TYPES as types
    from optipfair_train.pruning import available_scorers
    from optipfair_train.pruning.reconstruction import DEFAULT_DAMPING as damping

    assert PRUNING_TYPES == tuple(types) and LAYER_SELECTION_METHODS == tuple(layer_methods)
    assert set(BUILTIN_SCORERS) <= set(available_scorers()) and DEFAULT_DAMPING == damping


def test_the_package_imports_its_names_on_first_use():
    code = "import sys, optipfair_train as o; assert 'torch' not in sys.modules; o.prune_model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import optipfair_train

        optipfair_train.nothing  # noqa: B018
