"""Plain (non-GLU) MLP families: GPT-2 (Conv1D), OPT (projections on the layer), Phi."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PLAIN_FAMILY_NAMES, make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train import analyze, load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import get_adapter, weight_out_in
from optipfair_train.pruning import as_batches, plan_mlp_width
from optipfair_train.pruning.heads import apply_head_plan, plan_attention_heads
from optipfair_train.pruning.surgery import prune_mlp_neurons, slice_optimizer_state

IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12, 40, 41]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(params=PLAIN_FAMILY_NAMES)
def plain_family(request):
    return request.param


@pytest.mark.parametrize("method", ["activation", "MAW", "L2", "taylor"])
def test_pruned_plain_mlp_equals_zeroing_removed_neurons(plain_family, method, calibration_batches):
    model = make_tiny_model(plain_family)
    reference = copy.deepcopy(model)
    batches = as_batches(calibration_batches)
    plan = plan_mlp_width(model, method=method, pruning_percentage=25, batches=batches)
    with torch.no_grad():
        for i, keep in plan.items():
            removed = torch.ones(128, dtype=torch.bool)
            removed[keep] = False
            weight_out_in(get_adapter(reference).mlp(i).down)[:, removed] = 0
    _, stats = prune_model(
        model,
        pruning_type="MLP",
        neuron_selection_method=method,
        pruning_percentage=25,
        dataloader=calibration_batches,
        show_progress=False,
        return_stats=True,
    )
    assert get_adapter(model).intermediate_sizes() == [96] * 4
    assert stats["event"]["intermediate_sizes"] == [96] * 4
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_maw_on_plain_mlp_reads_fc1_rows(plain_family):
    model = make_tiny_model(plain_family)
    up = weight_out_in(get_adapter(model).mlp(0).up).detach()
    expected = (up.max(dim=1).values + up.min(dim=1).values.abs()).topk(64).indices.sort().values
    plan = plan_mlp_width(model, method="MAW", pruning_percentage=50, layer_indices=[0])
    assert plan[0].tolist() == expected.tolist()


def test_plain_families_reload_uniform_and_per_layer(plain_family, calibration_batches, tmp_path):
    model = make_tiny_model(plain_family)
    prune_model(
        model, pruning_type="MLP", pruning_percentage=25, dataloader=calibration_batches, show_progress=False
    )
    prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=1,
        dataloader=calibration_batches,
        show_progress=False,
    )
    save_pruned_model(model, tmp_path / "uniform")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    prune_model(
        model,
        pruning_type="MLP",
        neuron_selection_method="L2",
        pruning_percentage=50,
        layer_indices=[1],
        show_progress=False,
    )
    save_pruned_model(model, tmp_path / "per-layer")
    reloaded = load_pruned_model(tmp_path / "per-layer")
    assert get_adapter(reloaded).intermediate_sizes() == [96, 48, 96]
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    assert analyze(reloaded)["intermediate_sizes"] == [96, 48, 96]


def test_mlp_glu_name_on_plain_family_points_to_mlp():
    with pytest.raises(ValueError, match="pruning_type='MLP'"):
        prune_model(make_tiny_model("gpt2"), pruning_percentage=10, show_progress=False)


def test_conv1d_optimizer_state_is_sliced_on_the_right_axis():
    model = make_tiny_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    slices = prune_mlp_neurons(get_adapter(model).mlp(0), torch.arange(0, 128, 2))
    slice_optimizer_state(optimizer, slices)
    c_fc = get_adapter(model).mlp(0).up
    assert c_fc.weight.shape == (64, 64) and optimizer.state[c_fc.weight]["exp_avg"].shape == (64, 64)
    assert c_fc.nf == 64 and c_fc.bias.shape == (64,)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("family", ["opt", "phi"])
def test_head_pruning_on_plain_families(family, calibration_batches):
    model = make_tiny_model(family)
    reference = copy.deepcopy(model)
    plan = plan_attention_heads(
        model, pruning_percentage=50, method="activation", batches=as_batches(calibration_batches)
    )
    with torch.no_grad():
        for i, p in plan.items():
            for h in set(range(4)) - set(p.query_heads.tolist()):
                get_adapter(reference).attention(i).o.weight[:, 16 * h : 16 * (h + 1)] = 0
    apply_head_plan(model, plan)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_head_pruning_refuses_fused_qkv():
    with pytest.raises(ValueError, match="fuses them"):
        prune_model(
            make_tiny_model("gpt2"), pruning_type="ATTENTION", pruning_percentage=50, show_progress=False
        )
