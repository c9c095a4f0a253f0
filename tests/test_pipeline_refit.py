"""The pipeline's refit settings (reconstruct / damping / sequential, replace_with_linear) reach the
same pruning code as the one-shot API: a pipeline round equals ``prune_model`` on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_run_settings, write_assets
from transformers import AutoModelForCausalLM

from optipfair_train import load_pruned_model, prune_model
from optipfair_train.data import calibration_dataloader, load_texts
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pipeline import PruneThenHeal, load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("refit-assets"))


def _run(assets: Path, out: Path, **overrides) -> dict:
    chosen = {"num_rounds": 1, "num_layers_to_remove": 0, "heal_method": "none", **overrides}
    settings = tiny_run_settings(assets, out, **chosen)
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    return PruneThenHeal(load_config(None, flags)).run()


def _one_shot(assets: Path, **kwargs) -> torch.nn.Module:
    model, tokenizer = load_model_and_tokenizer(str(assets / "model"))
    texts = load_texts(str(assets / "text.txt"), split="calibration")
    batches = list(calibration_dataloader(tokenizer, texts, num_samples=2, seq_len=64))
    return prune_model(model, dataloader=batches, show_progress=False, **kwargs)


# the sequential round in the slow set (sequential refits: tests/test_reconstruction.py)
@pytest.mark.parametrize("sequential", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_refit_round_equals_the_one_shot_refit(assets, tmp_path, sequential):
    method = "activation" if sequential else "hybrid"
    result = _run(
        assets, tmp_path / "run", reconstruct=True, damping=0.05, sequential=sequential,
        neuron_selection_method=method,
    )  # fmt: skip
    (event,) = result["rounds"][0]["events"]
    assert (event["reconstruct"], event["damping"], event["sequential"]) == (True, 0.05, sequential)

    pruned = load_pruned_model(tmp_path / "run" / "round-1" / "pruned").state_dict()
    common = dict(pruning_type="MLP_GLU", pruning_percentage=30, neuron_selection_method=method)
    refit = _one_shot(assets, reconstruct=True, damping=0.05, sequential=sequential, **common).state_dict()
    plain = _one_shot(assets, **common).state_dict()
    for name, tensor in refit.items():
        torch.testing.assert_close(pruned[name], tensor, rtol=0, atol=1e-6, msg=name)
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(pruned[down], plain[down])  # the refit changed the kept columns


@pytest.mark.slow  # fast: tests/test_depth_replace.py
def test_depth_with_a_linear_replacement_reloads_as_a_plain_model(assets, tmp_path):
    result = _run(
        assets, tmp_path / "run", mlp_pruning_percentage=0, num_layers_to_remove=2,
        layer_selection_method="contiguous", replace_with_linear=True,
    )  # fmt: skip
    (event,) = result["rounds"][0]["events"]
    assert event["pruning_type"] == "DEPTH" and "linear_replacement" in event
    assert event["removed_layers"][0] >= 1  # the map folds into the block before the run

    reloaded = AutoModelForCausalLM.from_pretrained(result["final_dir"]).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.randint(3, 60, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids).logits, result["model"].eval()(ids).logits, rtol=0, atol=1e-5
        )
