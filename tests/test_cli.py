"""The command line: one vocabulary, defaults in help, mistakes refused before any model loads, a fast --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pipeline_helpers import ROOT

from optipfair_train import cli, names
from optipfair_train.cli_parser import build_parser

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


def test_top_level_help_and_prune_mistakes_import_no_torch():
    top = _no_torch("--help")
    assert top.returncode == 0 and "IMPORTED []" in top.stdout
    assert "``" not in top.stdout and "optipfair-train demo" in top.stdout  # plain text, a first command
    for command in ("demo", "prune", "analyze", "run", "probe", "eval", "search"):
        assert command in top.stdout
    bad = _no_torch("prune", "--pruning-percentage", "120", "--output-dir", "x")
    assert bad.returncode == 2 and "between 0 and 100" in bad.stderr
    no_target = _no_torch("prune", "--output-dir", "x")
    assert no_target.returncode == 2 and "prune needs a target: --pruning-percentage" in no_target.stderr
    assert "IMPORTED []" in no_target.stdout


# per command: what its --help must show (defaults included), a mistake argparse refuses, and its message
COMMAND_HELP = {
    "demo": (["(default: 20.0)", "(default: hybrid)", "(default: outputs/demo-pruned)"],
             ["--pruning-percentage", "0"], "between 0 and 100"),
    "prune": (["--output-dir", "(default: MLP_GLU)", "(default: 0.01)", "{last,first,custom,importance"],
              ["--pruning-type", "WIDTH"], "invalid choice: 'WIDTH'"),
    "analyze": (["(default: demo)", "(default: float32)"], ["--dtype", "int8"], "invalid choice: 'int8'"),
    "run": (["mlp_pruning_percentage (default: 20.0)", "zeroshot_tasks (default: 'arc_easy,hellaswag"],
            ["--config"], "expected one argument"),
    "probe": (["(default: first_middle_last)", "(default: attention_output,mlp_output)",
               "(default: mean_diff,heatmap,pca)", "(default: full)", "{full,shared}", "{png,pdf,svg,jpg}"],
              ["--model-path", "demo", "--output-dir", "x", "--components", "mlp_out"],
              "unknown component(s) ['mlp_out']"),
    "eval": (["(default: arc_easy,hellaswag,piqa,winogrande)", "(default: 200)", "arc_challenge"],
             ["demo", "--tasks", "arc_easy,nope"], "unknown task(s) ['nope']"),
    "search": (["(default: outputs/search)", "over hidden, mlp, heads, depth", "(default: 0)"],
               ["demo", "--fraction", "0.25", "--candidates", "mlp=0.5,width=0.5"],
               "Unknown budget axis 'width'; accepted: hidden, mlp, heads, depth"),
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMAND_HELP))
def test_command_help_and_argument_mistakes_import_no_torch(command):
    shown, mistake, message = COMMAND_HELP[command]
    text = _no_torch(command, "--help")
    assert text.returncode == 0 and "IMPORTED []" in text.stdout, text.stderr[-2000:]
    help_text = " ".join(text.stdout.split())  # argparse wraps long lines
    missing = [s for s in shown if s not in help_text]
    assert not missing, help_text
    assert "--output-path" not in help_text and "--method " not in help_text  # old spellings hidden
    wrong = _no_torch(command, *mistake)
    assert wrong.returncode == 2 and message in wrong.stderr and "IMPORTED []" in wrong.stdout, wrong


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


def test_the_parser_names_are_the_engines():
    from optipfair_train import pruning
    from optipfair_train.bias import behaviour, capture, figures, visualize
    from optipfair_train.pruning import reconstruction, scorers

    # one definition each, in the torch-free names module, imported by the engine
    assert pruning.PRUNING_TYPES is names.PRUNING_TYPES
    assert pruning.LAYER_SELECTION_METHODS is names.LAYER_SELECTION_METHODS
    assert reconstruction.DEFAULT_DAMPING is names.DEFAULT_DAMPING
    assert capture.ALL_COMPONENTS is names.ALL_COMPONENTS and behaviour.SCORE_METHODS is names.SCORE_METHODS
    assert visualize.VISUALIZATION_TYPES is names.VISUALIZATION_TYPES
    assert figures.FIGURE_FORMATS is names.FIGURE_FORMATS
    # the scorers the engine registers itself (tests may register more) are the ones the help lists
    builtin = [s.name for s in scorers._REGISTRY.values() if s.fn.__module__.startswith("optipfair_train.")]
    assert sorted(builtin) == sorted(names.BUILTIN_SCORERS)


def test_the_package_imports_its_names_on_first_use():
    code = "import sys, optipfair_train as o; assert 'torch' not in sys.modules; o.prune_model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import optipfair_train

        optipfair_train.nothing  # noqa: B018
