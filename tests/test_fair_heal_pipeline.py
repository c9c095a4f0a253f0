"""The healing-time fairness settings of the pipeline: fairness_loss_*, counterfactual_augmentation and
bias_vector_*."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import assert_same_model, run_cli, tiny_run_settings, write_assets, write_config
from transformers import TrainerCallback

from optipfair_train import load_pruned_model
from optipfair_train.bias import (
    StereoSetItem,
    fit_bias_vector,
    read_stereoset_jsonl,
    split_items,
    subtract_bias_vector,
)
from optipfair_train.cli import main
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.healing import fairness_build_items

TYPES = ("gender", "race", "profession", "religion")


def _items(n: int) -> list[dict]:
    return [
        {
            "type": "intrasentence",
            "target": f"Person {i}",  # named in its sentences: the counterfactual objective swaps it
            "bias_type": TYPES[i % 4],
            "context": f"Person {i} is BLANK.",
            "stereotype": f"Person {i} is she.",
            "anti-stereotype": f"Person {i} is he.",
            "unrelated": f"Person {i} is blue.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_assets(tmp_path_factory.mktemp("fair-heal-assets"))
    (root / "stereoset.jsonl").write_text("\n".join(json.dumps(r) for r in _items(24)) + "\n")
    (root / "gendered.txt").write_text(("He met his sister.\n\nThe river is long.\n\n" * 40).strip() + "\n")
    return root


def _fair(assets: Path, **overrides) -> dict:
    """One round, LoRA, 4 steps, the fairness loss on the tiny StereoSet file."""
    return dict(
        num_rounds=1, num_layers_to_remove=0, stereoset_data=str(assets / "stereoset.jsonl"),
        stereoset_sample_size=6, fairness_loss_weight=5.0, fairness_loss_items=8, fairness_loss_batch=3,
    ) | overrides  # fmt: skip


BAD = {
    "fairness_loss_weight=-1": ({"fairness_loss_weight": -1.0}, "fairness_loss_weight must be >= 0"),
    "fairness_loss_weight=nan": ({"fairness_loss_weight": float("nan")}, "fairness_loss_weight must be a finite"),
    "fairness_loss_items=0": ({"fairness_loss_items": 0}, "fairness_loss_items must be at least 1, got 0"),
    "fairness_loss_objective=sum": (
        {"fairness_loss_objective": "sum"},
        "fairness_loss_objective must be one of items, mean, counterfactual, got 'sum'",
    ),
    "fairness_loss_batch=0": ({"fairness_loss_batch": 0}, "fairness_loss_batch must be at least 1, got 0"),
    "no stereoset_data": ({"stereoset_data": ""}, "fairness_loss_weight > 0 trains on StereoSet build items: set stereoset_data"),
    "heal_method none": ({"heal_method": "none"}, "fairness_loss_weight > 0 acts during healing"),
    "CDA on teacher text": (
        {"fairness_loss_weight": 0.0, "counterfactual_augmentation": True, "heal_data": "teacher"},
        "counterfactual_augmentation: true swaps genders in plain healing text",
    ),
    "CDA with sft": (
        {"fairness_loss_weight": 0.0, "counterfactual_augmentation": True, "heal_method": "sft"},
        "counterfactual_augmentation: true swaps genders in plain healing text",
    ),
    "bias_vector_strength=9": (
        {"fairness_loss_weight": 0.0, "bias_vector_strength": 9.0}, "bias_vector_strength must be in [0, 8] (0 = off)"
    ),
    "bias_vector_items=0": ({"bias_vector_items": 0}, "bias_vector_items must be at least 1, got 0"),
    "bias_vector_learning_rate=0": (
        {"bias_vector_learning_rate": 0.0}, "bias_vector_learning_rate must be a positive number"
    ),
    "bias vector without stereoset_data": (
        {"fairness_loss_weight": 0.0, "bias_vector_strength": 0.5, "stereoset_data": ""},
        "bias_vector_strength > 0 fits the vector on StereoSet build items: set stereoset_data",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD))
def test_bad_fairness_settings_are_refused_before_any_folder(name, assets, tmp_path, capsys):
    overrides, message = BAD[name]
    out = tmp_path / "run"
    config = write_config(assets, out, **_fair(assets, **overrides))
    assert main(["run", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_fairness_items_come_from_the_build_half_only(assets):
    source = str(assets / "stereoset.jsonl")
    build, held_out = split_items(read_stereoset_jsonl(source), seed=3)
    items = fairness_build_items(source, seed=3, count=8)
    assert len(items) == 8 and set(items) <= set(build) and not set(items) & set(held_out)
    assert fairness_build_items(source, seed=3, count=8) == items  # stable under the seed
    assert set(fairness_build_items(source, seed=3, count=100)) == set(
        build
    )  # never more than the build half


class _LogSpy(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize(
    ("objective", "method"), [("items", "lora"), ("counterfactual", "lora"), ("counterfactual", "kd")]
)  # LoRA: the counterfactual anchor is the adapters' base; kd: a copy taken before healing
def test_a_pipeline_round_trains_with_the_fairness_loss_on_build_items(assets, tmp_path, objective, method):
    settings = tiny_run_settings(
        assets, tmp_path / "run", **_fair(assets), fairness_loss_objective=objective, heal_method=method
    )
    config = load_config(None, [x for k, v in settings.items() for x in (f"--{k}", str(v))])
    spy = _LogSpy()
    run = PruneThenHeal(config, callbacks=[spy])
    run.run()
    logged = [entry for entry in spy.logs if "fairness_loss" in entry]
    assert len(logged) == config.heal.heal_steps  # every step logs (logging_steps=1)
    assert all(entry["fairness_loss"] > 0 for entry in logged)
    # the preference gap is logged by the option-gap objectives only
    assert all(("fairness_gap" in entry) == (objective == "items") for entry in logged)
    build, held_out = split_items(read_stereoset_jsonl(assets / "stereoset.jsonl"), seed=config.run.seed)
    assert len(run.fairness_items) == 8 and set(run.fairness_items) <= set(build)
    assert all(isinstance(item, StereoSetItem) for item in run.fairness_items)


def test_counterfactual_augmentation_adds_the_swapped_text(assets, tmp_path):
    texts = {}
    for flag in (False, True):
        settings = tiny_run_settings(
            assets, tmp_path / "run", heal_data=str(assets / "gendered.txt"), counterfactual_augmentation=flag
        )
        config = load_config(None, [x for k, v in settings.items() for x in (f"--{k}", str(v))])
        run = PruneThenHeal(config)
        _, tokenizer = load_model_and_tokenizer(str(assets / "model"))
        run._load_data(tokenizer)
        texts[flag] = tokenizer.decode(run.heal_dataset[0]["input_ids"])
        assert len(run.heal_dataset) == config.heal.sequences_per_round()  # the same budget either way
    assert "She met her brother." not in texts[False] and "He met his sister." in texts[False]
    assert "She met her brother." in texts[True] and "He met his sister." in texts[True]


def _killed_and_resumed(assets: Path, tmp_path: Path, settings: dict, crash_at: str) -> dict[str, bool]:
    """Run ``settings`` uninterrupted, then killed at ``crash_at`` and rerun; asserts the same final model
    and returns what the killed run had left (a heal checkpoint, no round model)."""
    reference_out = tmp_path / "reference"
    PruneThenHeal(load_config(write_config(assets, reference_out, **settings))).run()
    reference = {n: t.clone() for n, t in load_pruned_model(reference_out / "final").state_dict().items()}
    out = tmp_path / "run"
    config = write_config(assets, out, **settings)
    killed = run_cli(config, crash_at=crash_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checks = {
        "checkpoint": (out / "round-1" / "heal" / "checkpoint-2").is_dir(),
        "no round model": not (out / "round-1" / "model").exists(),
    }
    resumed = run_cli(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_model(out / "final", reference)
    return checks


@pytest.mark.slow
def test_a_killed_fairness_run_resumes_to_the_uninterrupted_model(assets, tmp_path):
    """SIGKILL after healing step 3 (checkpoint-2 complete), rerun: the same final model."""
    assert _killed_and_resumed(assets, tmp_path, _fair(assets), "heal-step:3")["checkpoint"]


def _vector(assets: Path, **overrides) -> dict:
    """One round, LoRA, 4 steps, then the bias vector (one pass over 8 build items) at strength 0.5."""
    return dict(
        num_rounds=1, num_layers_to_remove=0, stereoset_data=str(assets / "stereoset.jsonl"),
        stereoset_sample_size=6, bias_vector_strength=0.5, bias_vector_items=8, bias_vector_epochs=1,
        bias_vector_learning_rate=1e-3,
    ) | overrides  # fmt: skip


def test_a_pipeline_round_subtracts_the_bias_vector_of_its_healed_model(assets, tmp_path):
    finals = {}
    for strength in (0.0, 0.5):
        out = tmp_path / f"run-{strength}"
        settings = tiny_run_settings(assets, out, **_vector(assets, bias_vector_strength=strength))
        config = load_config(None, [x for k, v in settings.items() for x in (f"--{k}", str(v))])
        PruneThenHeal(config).run()
        finals[strength] = load_pruned_model(out / "final")
    _, tokenizer = load_model_and_tokenizer(str(assets / "model"))
    items = fairness_build_items(str(assets / "stereoset.jsonl"), seed=config.run.seed, count=8)
    expected = finals[0.0]  # the same run without the mode, minus its own vector (round 1: seed + 1)
    vector = fit_bias_vector(
        expected, tokenizer, items, epochs=1, learning_rate=1e-3, seed=config.run.seed + 1
    )
    subtract_bias_vector(expected, vector, 0.5)
    got = dict(finals[0.5].named_parameters())
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)
    assert finals[0.5].config.debias_history[-1] == {"method": "bias_vector", "strength": 0.5}


@pytest.mark.slow
def test_a_run_killed_after_the_bias_vector_resumes_to_the_uninterrupted_model(assets, tmp_path):
    """SIGKILL once the vector is subtracted in memory (nothing of the round saved), rerun: the same model."""
    assert _killed_and_resumed(assets, tmp_path, _vector(assets), "bias-vector")["no round model"]
