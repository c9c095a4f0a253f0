"""prune_model end to end on every family: exactness, save/reload, depth + KV cache, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train import analyze, count_parameters, load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import UnsupportedModelError, get_adapter
from optipfair_train.pruning import as_batches, block_influence, plan_mlp_width

PROMPT = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12]])


def _logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_width_pruning_equals_zeroing_the_removed_neurons(family, calibration_batches):
    """The pruned model computes exactly what the original computes with removed neurons silenced."""
    model = make_tiny_model(family)
    plan = plan_mlp_width(  # the default scorer with a dataloader
        model, method="hybrid", pruning_percentage=30, batches=as_batches(calibration_batches)
    )
    reference = make_tiny_model(family)
    adapter = get_adapter(reference)
    with torch.no_grad():
        for i, keep in plan.items():
            removed = torch.ones(128, dtype=torch.bool)
            removed[keep] = False
            adapter.mlp(i).down.weight[:, removed] = 0
    prune_model(model, pruning_percentage=30, dataloader=calibration_batches, show_progress=False)
    assert get_adapter(model).intermediate_sizes() == [90] * 4
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_uniform_width_and_depth_reload_with_from_pretrained(
    family, calibration_batches, tmp_path, tokenizer
):
    model = make_tiny_model(family)
    model, stats = prune_model(
        model, pruning_percentage=20, dataloader=calibration_batches, show_progress=False, return_stats=True
    )
    prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=1,
        dataloader=calibration_batches,
        show_progress=False,
    )
    save_pruned_model(model, tmp_path, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    assert reloaded.config.num_hidden_layers == 3
    manifest = json.loads((tmp_path / "pruning_manifest.json").read_text())
    assert manifest["uniform"] and [layer["intermediate_size"] for layer in manifest["layers"]] == [103] * 3
    assert manifest["parameters"] == count_parameters(model)
    assert [e["pruning_type"] for e in manifest["history"]] == ["MLP_GLU", "DEPTH"]
    assert manifest["history"][0]["method"] == "hybrid"  # the default with a dataloader
    assert reloaded.config.pruning_history == manifest["history"]
    assert stats["original_parameters"] - stats["pruned_parameters"] == stats["reduction"] > 0
    assert stats["percentage_reduction"] == pytest.approx(
        100 * stats["reduction"] / stats["original_parameters"]
    )


@pytest.mark.parametrize("family", ["llama-tied", "qwen3", "gemma2"])
def test_per_layer_widths_reload_with_package_loader(family, calibration_batches, tmp_path):
    model = make_tiny_model(family)
    prune_model(
        model,
        pruning_percentage=50,
        dataloader=calibration_batches,
        layer_allocation="global",
        show_progress=False,
    )
    prune_model(
        model, neuron_selection_method="L2", pruning_percentage=10, layer_indices=[0], show_progress=False
    )
    sizes = get_adapter(model).intermediate_sizes()
    assert len(set(sizes)) > 1
    save_pruned_model(model, tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - plain from_pretrained cannot build per-layer widths
        AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert get_adapter(reloaded).intermediate_sizes() == sizes
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    # depth after per-layer widths keeps the record consistent
    prune_model(model, pruning_type="DEPTH", layer_indices=[1], show_progress=False)
    save_pruned_model(model, tmp_path / "depth")
    again = load_pruned_model(tmp_path / "depth")
    assert get_adapter(again).intermediate_sizes() == sizes[:1] + sizes[2:]
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)


def test_depth_selection_methods(calibration_batches):
    def removed(**kwargs):
        model = make_tiny_model("llama", num_hidden_layers=6)
        _, stats = prune_model(model, pruning_type="DEPTH", show_progress=False, return_stats=True, **kwargs)
        assert model.config.num_hidden_layers == 6 - len(stats["event"]["removed_layers"])
        return stats["event"]["removed_layers"]

    assert removed(num_layers_to_remove=2, layer_selection_method="last") == [4, 5]
    assert removed(num_layers_to_remove=2, layer_selection_method="first") == [0, 1]
    assert removed(layer_indices=[3, 1]) == [1, 3]
    assert removed(depth_pruning_percentage=50, layer_selection_method="last") == [3, 4, 5]


def _make_blocks_quiet(model, blocks):
    """Blocks whose attention and MLP outputs are zero are identities: influence 0."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for i in blocks:
            adapter.attention(i).o.weight.zero_()
            adapter.mlp(i).down.weight.zero_()


def test_importance_and_contiguous_find_planted_identity_blocks(calibration_batches):
    model = make_tiny_model("mistral", num_hidden_layers=6)
    _make_blocks_quiet(model, [1, 4])
    batches = as_batches(calibration_batches)
    influence = block_influence(model, batches)
    assert influence[1] == pytest.approx(0, abs=1e-6) and influence[4] == pytest.approx(0, abs=1e-6)
    assert influence.min() < influence[[0, 2, 3, 5]].min()
    _, stats = prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=2,
        dataloader=batches,
        show_progress=False,
        return_stats=True,
    )
    assert stats["event"]["removed_layers"] == [1, 4] and stats["event"]["method"] == "importance"

    model = make_tiny_model("qwen2", num_hidden_layers=6)
    _make_blocks_quiet(model, [2, 3])
    _, stats = prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=2,
        dataloader=batches,
        layer_selection_method="contiguous",
        show_progress=False,
        return_stats=True,
    )
    assert stats["event"]["removed_layers"] == [2, 3]


def test_block_influence_matches_manual_cosine(calibration_batches):
    model = make_tiny_model("llama")
    batch = as_batches(calibration_batches[:1])
    influence = block_influence(model, batch, span=2)
    with torch.no_grad():
        out = model(**batch[0], output_hidden_states=True)
    mask = batch[0]["attention_mask"].bool()
    h0, h2 = out.hidden_states[0][mask], out.hidden_states[2][mask]  # input of block 0, output of block 1
    manual = (1 - torch.nn.functional.cosine_similarity(h0, h2, dim=-1)).mean()
    assert influence.shape == (3,)
    assert influence[0].item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_generation_with_kv_cache_after_depth_pruning(family, calibration_batches):
    model = make_tiny_model(family, num_hidden_layers=5)
    prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=2,
        dataloader=calibration_batches,
        show_progress=False,
    )
    layer_idx = [get_adapter(model).attention(i).module.layer_idx for i in range(3)]
    assert layer_idx == [0, 1, 2]
    cached = model.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 20)
    assert torch.equal(cached, uncached)


def test_parameter_budget_reaches_target():
    model = make_tiny_model("llama")
    target = count_parameters(model) - 40_000
    _, stats = prune_model(
        model, target_parameters=target, neuron_selection_method="MAW", show_progress=False, return_stats=True
    )
    per_neuron_all_layers = 3 * 64 * 4
    assert target - per_neuron_all_layers < stats["pruned_parameters"] <= target


def test_default_method_warns_without_data(caplog):
    model = make_tiny_model("llama")
    with caplog.at_level("WARNING", logger="optipfair_train"):
        _, stats = prune_model(model, show_progress=False, return_stats=True)
    assert stats["event"]["method"] == "MAW" and stats["event"]["pruning_percentage"] == 10
    assert "weight-only" in caplog.text
    assert get_adapter(model).intermediate_sizes() == [116] * 4


def test_analyze_reports_distribution():
    model = make_tiny_model("llama")
    report = analyze(model)
    assert report["family"] == "llama" and report["num_layers"] == 4
    assert report["expansion_ratio"] == pytest.approx(200.0)
    assert (report["num_attention_heads"], report["num_key_value_heads"], report["head_dim"]) == (4, 2, 16)
    dist = report["parameter_distribution"]
    assert dist["mlp"]["parameters"] == 4 * 3 * 64 * 128
    assert (
        sum(d["parameters"] for d in dist.values()) == report["total_parameters"] == count_parameters(model)
    )
    assert dist["other"]["parameters"] == 0


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


BAD_INPUTS = [
    (dict(pruning_percentage=0), "strictly between 0 and 100"),
    (dict(pruning_percentage=100), "strictly between 0 and 100"),
    (dict(pruning_percentage=150), "strictly between 0 and 100"),
    (dict(expansion_rate=250), "would not shrink"),
    (dict(expansion_rate=0.5), "fewer than one neuron"),
    (dict(pruning_percentage=20, expansion_divisor=500), "larger than the width"),
    (dict(neuron_selection_method="XYZ"), "Unknown neuron selection method"),
    (dict(neuron_selection_method="activation"), "needs calibration data"),
    (dict(layer_indices=[7]), "out of range"),
    (dict(pruning_type="DEPTH", num_layers_to_remove=4), "at least one must stay"),
    (dict(pruning_type="DEPTH", layer_indices=[0, 1, 2, 3]), "Cannot remove all"),
    (dict(pruning_type="DEPTH", layer_indices=[9]), "out of range"),
    (
        dict(pruning_type="DEPTH", num_layers_to_remove=1, layer_selection_method="importance"),
        "calibration data",
    ),
    (
        dict(pruning_type="DEPTH", num_layers_to_remove=1, layer_selection_method="middle"),
        "Unknown layer_selection",
    ),
    (
        dict(pruning_type="DEPTH", pruning_percentage=10, num_layers_to_remove=1),
        "does not apply|do\\(es\\) not apply",
    ),
    (dict(pruning_type="HEADS"), "Unsupported pruning_type"),
    (dict(dataloader=[]), "empty"),
    (dict(dataloader=[torch.ones(2, 4, dtype=torch.long)]), "expected a dict"),
    (
        dict(
            dataloader=[{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}]
        ),
        "attention_mask shape",
    ),
    (dict(target_parameters=10**9), "not below"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_bad_input_is_refused_before_any_weight_changes(kwargs, match):
    model = make_tiny_model("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        prune_model(model, show_progress=False, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_hidden_layers == 4 and model.config.intermediate_size == 128
    assert getattr(model.config, "pruning_history", None) is None


def test_quantized_meta_peft_and_unsupported_models_are_refused():
    model = make_tiny_model("llama")
    model.is_quantized = True
    with pytest.raises(ValueError, match="quantized"):
        prune_model(model, show_progress=False)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(make_tiny_model("llama").config)
    with pytest.raises(ValueError, match="meta device"):
        prune_model(meta, show_progress=False)
    from transformers import GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(
        GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(UnsupportedModelError, match="Supported model types: .*llama.*qwen3"):
        prune_model(neox, show_progress=False)
