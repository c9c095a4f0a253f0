"""What `optipfair-train run` refuses before writing anything, what it does with damaged files, and that
a finished run is left alone when rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import wandb
from pipeline_helpers import (
    PoisonOnce,
    assert_same_model,
    leftovers,
    run_cli,
    run_poisoned,
    write_assets,
    write_config,
)

from optipfair_train import load_pruned_model
from optipfair_train.cli import main
from optipfair_train.pipeline import PruneThenHeal, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("checks-assets"))


def _refused(capsys, config: Path, *flags: str) -> str:
    """Run the CLI in this process; it must fail with exit code 2; returns its error message."""
    assert main(["run", "--config", str(config), *flags]) == 2
    return capsys.readouterr().err


# setting -> what the message must say; the tiny model has 4 layers, width 128, 2 KV groups, 161,344 params
BAD_SETTINGS = {
    "layer_selection_method=bogus": (
        {"layer_selection_method": "bogus"},
        "layer_selection_method must be one of last, first, importance, contiguous, taylor, got 'bogus'",
    ),
    # round 1 removes 2 of 4 blocks, round 2 would remove the last 2
    "num_layers_to_remove=4": (
        {"num_layers_to_remove": 4},
        "num_layers_to_remove=4 cannot be carried out in round 2 of 2: Cannot remove 2 of 2 layers",
    ),
    # round 1's goal (90,672) is reachable, round 2's (20,000) is not
    "target_parameters=20000": (
        {"mlp_pruning_percentage": 0, "target_parameters": 20_000},
        "target_parameters=20000 cannot be carried out in round 2 of 2: target_parameters 20,000 cannot be "
        "reached",
    ),
    "neuron_selection_method=bogus": (
        {"neuron_selection_method": "bogus"},
        "neuron_selection_method: Unknown neuron selection method 'bogus'. Available: MAW",
    ),
    "damping=-1": ({"reconstruct": True, "damping": -1}, "damping must be a number >= 0"),
    "sequential without reconstruct": (
        {"sequential": True},
        "sequential: true applies to the refit: set reconstruct: true as well",
    ),
    "sequential with taylor": (
        {"reconstruct": True, "sequential": True, "neuron_selection_method": "taylor"},
        "sequential=True scores each layer from its own calibration statistics; the 'taylor' scorer needs more",
    ),
    "replace_with_linear with importance": (
        {"replace_with_linear": True},
        "set layer_selection_method: contiguous (got 'importance')",
    ),
    # 1 x 64 calibration tokens for up to 128 kept neurons: the undamped refit is singular
    "damping=0 on too few tokens": (
        {"reconstruct": True, "damping": 0, "num_calibration_samples": 1},
        "reconstruct with damping: 0 needs at least as many calibration tokens (num_calibration_samples x "
        "calibration_seq_len) as kept inputs (up to 128); got 64",
    ),
    "budget_shares=width=1": (
        {
            "mlp_pruning_percentage": 0,
            "num_layers_to_remove": 0,
            "target_fraction": 0.3,
            "budget_shares": "width=1",
        },
        "budget_shares: Unknown budget axis 'width'; accepted: hidden, mlp, heads, depth",
    ),
    "target_fraction beside per-axis settings": (
        {"target_fraction": 0.3},
        "A parameter budget sets every axis's count itself: set mlp_pruning_percentage, num_layers_to_remove to 0",
    ),
    "budget_shares=search": (
        {
            "mlp_pruning_percentage": 0,
            "num_layers_to_remove": 0,
            "target_fraction": 0.3,
            "budget_shares": "search",
        },
        "budget_shares: search is not run inside the pipeline; run `optipfair-train search MODEL --fraction F`",
    ),
    "budget_shares without a target": (
        {"mlp_pruning_percentage": 0, "num_layers_to_remove": 0, "budget_shares": "mlp=1"},
        "budget_shares spends a budget: set target_parameters or target_fraction as well",
    ),
    # one of the 2 KV groups per layer is 2 query heads + 1 key/value head of 16 channels on a width of 64:
    # (32 + 16 + 16 + 32) x 64 x 4 layers = 24,576 parameters; round 1's goal is 40,336 fewer
    "target_fraction beyond the heads": (
        {
            "mlp_pruning_percentage": 0,
            "num_layers_to_remove": 0,
            "target_fraction": 0.5,
            "budget_shares": "heads=1",
        },
        "target_fraction=0.5 with budget_shares='heads=1' cannot be carried out in round 1 of 2: Target 121,008 "
        "parameters is below the smallest model heads can leave (136,768 of 161,344",
    ),
    "lora_r=0": ({"lora_r": 0}, "lora_r must be at least 1, got 0"),
    "lora_target_modules": (
        {"lora_target_modules": ["q_proj", "qkv"]},
        "lora_target_modules qkv name no linear layer of the model; it has down_proj, gate_proj",
    ),
    "nan_retries=-1": ({"nan_retries": -1}, "nan_retries must be at least 0, got -1"),
    "eval_seq_len=0": ({"eval_seq_len": 0}, "eval_seq_len must be at least 1, got 0"),
    "heal_steps=abc": ({"heal_steps": "abc"}, "heal_steps must be an integer, got 'abc' (str)"),
    "learning_rate=[1]": ({"learning_rate": [1]}, "learning_rate must be a number, got [1] (list)"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_setting_is_refused_before_any_folder(name, assets, tmp_path, capsys):
    overrides, message = BAD_SETTINGS[name]
    out = tmp_path / "run"
    config = write_config(assets, out, **overrides)
    error = _refused(capsys, config)
    assert message in error
    if "(str)" in message or "(list)" in message:
        assert str(config) in error  # the file is named
    assert not out.exists()


def test_dry_run_plans_exactly_the_shapes_the_rounds_reach(assets, tmp_path):
    """The pre-flight twin (meta device) is pruned to the same sizes as the real model, round by round."""
    from optipfair_train.models import load_model_and_tokenizer
    from optipfair_train.pipeline.validate import preflight

    config = load_config(
        write_config(assets, tmp_path / "plan", heal_method="none", attention_pruning_percentage=50)
    )
    model, _ = load_model_and_tokenizer(config.model.model_path)
    base = {"width": 128, "kv_heads": 2, "parameters": 161_344}
    planned = preflight(model, base, config)
    result = PruneThenHeal(config).run()
    assert planned == [r["pruned"]["parameters"] for r in result["rounds"]]
    kinds = [[e["pruning_type"] for e in r["events"]] for r in result["rounds"]]
    assert kinds == [["MLP_GLU"], ["DEPTH", "ATTENTION", "MLP_GLU"]]  # every kind was planned


def _budget_preflight(assets, out):
    from optipfair_train.models import load_model_and_tokenizer
    from optipfair_train.pipeline.validate import preflight

    settings = dict(mlp_pruning_percentage=0, num_layers_to_remove=0, target_fraction=0.3)
    config = load_config(
        write_config(assets, out, heal_method="none", budget_shares="hidden=0.5,mlp=0.5", **settings)
    )
    model, _ = load_model_and_tokenizer(config.model.model_path)
    return config, preflight(model, {"width": 128, "kv_heads": 2, "parameters": 161_344}, config)


def test_budget_preflight_plans_each_round_within_its_share_of_the_target(assets, tmp_path):
    _, planned = _budget_preflight(assets, tmp_path / "budget")
    target = int(161_344 * 0.7)
    assert planned[0] <= 161_344 - (161_344 - target) // 2 and planned[1] <= target
    # one neuron per layer (4 x 3 x 64 parameters at most) fewer would miss: the planner is tight
    assert planned[1] + 4 * 3 * 64 > target


@pytest.mark.slow
def test_budget_rounds_reach_the_target_with_the_planned_shapes(assets, tmp_path):
    """A budget across hidden and MLP width, two rounds: the pre-flight's counts are the real ones, each
    round ends at or below its share of the way, the last at or below the target."""
    config, planned = _budget_preflight(assets, tmp_path / "budget")
    result = PruneThenHeal(config).run()
    assert planned == [r["pruned"]["parameters"] for r in result["rounds"]]
    target = int(161_344 * 0.7)
    assert planned[0] <= 161_344 - (161_344 - target) // 2 and planned[1] <= target
    assert [[e["pruning_type"] for e in r["events"]] for r in result["rounds"]] == [["MLP_GLU", "HIDDEN"]] * 2
    assert load_pruned_model(tmp_path / "budget" / "final").num_parameters() == planned[1]


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("num_rounds: 2\nheal_steps: [4\nlora_r: 8\n")
    assert f"{config}:3:7: YAML syntax error: expected ',' or ']'" in _refused(capsys, config)


def test_bad_flag_type_names_the_flag_and_type(assets, tmp_path, capsys):
    out = tmp_path / "run"
    error = _refused(capsys, write_config(assets, out), "--heal_steps", "four")
    assert "argument --heal_steps/--heal-steps: invalid int value: 'four'" in error
    assert not out.exists()


def test_run_without_config_says_how_to_run_the_demo(capsys):
    assert main(["run"]) == 2
    assert "optipfair-train run --config configs/demo.yaml" in capsys.readouterr().err


def test_finished_run_is_a_no_op_on_rerun(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "done"
    config = write_config(
        assets, out, num_rounds=1, heal_method="none", num_layers_to_remove=0, report_to="wandb"
    )
    PruneThenHeal(load_config(config)).run()
    wandb.finish()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    before = _snapshot(out)

    rerun = run_cli(config)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "holds a finished run with these settings; nothing was redone" in rerun.stdout
    assert _snapshot(out) == before  # nothing rewritten, no second W&B run


def _snapshot(out: Path) -> tuple[dict, list]:
    """Modification times of the run's files, and the names under wandb/ (whose own service may still
    append to this process's log files)."""
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if "wandb" not in p.relative_to(out).parts}
    return files, sorted(out.joinpath("wandb").rglob("*"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("checks-reference") / "run"
    PruneThenHeal(load_config(write_config(assets, out))).run()
    return {name: t.clone() for name, t in load_pruned_model(out / "final").state_dict().items()}


@pytest.fixture(scope="module")
def killed_in_round_2(assets, tmp_path_factory):
    """A run killed after step 3 of round 2's healing (round 1 finished, checkpoint-2 of round 2 complete)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = run_cli(write_config(assets, out), crash_at="heal-step:7")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "round-2" / "heal" / "checkpoint-2").is_dir() and not (out / "round-2" / "model").exists()
    return out


def _copy_run(source: Path, tmp_path: Path, assets: Path) -> Path:
    """A copy of the run in ``source`` with its config (the same settings but output_dir) beside it."""
    out = tmp_path / "run"
    shutil.copytree(source, out)
    write_config(assets, out)
    return out


@pytest.mark.parametrize(
    "damage",  # one damaged file in the default suite, the others in the slow set
    [
        pytest.param("state.json", marks=pytest.mark.slow),
        pytest.param("round-2/pruned/events.json", marks=pytest.mark.slow),
        "round-2/pruned/model.safetensors",
    ],
)
def test_damaged_file_is_an_error_naming_it(damage, assets, killed_in_round_2, tmp_path):
    out = _copy_run(killed_in_round_2, tmp_path, assets)
    path = out / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rerun = run_cli(out.with_name("run.yaml"))
    assert rerun.returncode == 2, rerun.stderr[-2000:]
    assert f"error: {path}" in rerun.stderr and "Traceback" not in rerun.stderr
    assert not (out / "final").exists()


@pytest.mark.parametrize(
    "damage",
    [pytest.param("delete scheduler.pt", marks=pytest.mark.slow), "truncate adapter_model.safetensors"],
)
def test_damaged_checkpoint_is_reported_and_healing_restarts(
    damage, assets, killed_in_round_2, reference, tmp_path
):
    out = _copy_run(killed_in_round_2, tmp_path, assets)
    action, name = damage.split()
    path = out / "round-2" / "heal" / "checkpoint-2" / name
    if action == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    rerun = run_cli(out.with_name("run.yaml"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Not resuming from {path.parent}: {path}" in rerun.stderr
    assert_same_model(out / "final", reference)  # healed again from round-2/pruned, the same steps
    assert leftovers(out) == []


@pytest.mark.slow  # a SIGKILL crash point (tests/test_pipeline.py kills one in the default suite)
def test_kill_during_a_nan_retry_resumes_the_retry_at_its_learning_rate(assets, tmp_path):
    """Attempt 1 (lr halved after a NaN in attempt 0) is killed after its checkpoint-2; the rerun goes on
    with attempt 1 at the halved rate, as the uninterrupted run does."""
    settings = dict(num_rounds=1, num_layers_to_remove=0, learning_rate=1e-3, nan_lr_factor=0.5)
    reference = PruneThenHeal(
        load_config(write_config(assets, tmp_path / "straight", **settings)), callbacks=[PoisonOnce()]
    ).run()
    assert reference["rounds"][0]["learning_rate"] == pytest.approx(5e-4)

    out = tmp_path / "killed"
    config = write_config(assets, out, **settings)
    killed = run_poisoned(config, crash_at="heal-step:6")  # attempt 0: steps 1-3; attempt 1: 1-3
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert state["retry"] == {"round": 1, "attempt": 1, "learning_rate": pytest.approx(5e-4)}
    assert (out / "round-1" / "heal" / "checkpoint-2" / "optipfair-complete.json").is_file()

    resumed = run_cli(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert state["rounds"][0]["learning_rate"] == pytest.approx(5e-4) and "retry" not in state
    assert_same_model(out / "final", reference["model"].state_dict())
