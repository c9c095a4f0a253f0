"""Attention-head pruning with grouped-query attention."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train import load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import as_batches
from optipfair_train.pruning.heads import apply_head_plan, head_scores, plan_attention_heads

IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12, 40, 41]])
HEAD_DIM = 16


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _silence_query_heads(model, removed: dict[int, list[int]]):
    """Zero the o_proj columns of removed query heads: the reference the pruned model must equal."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer, heads in removed.items():
            for h in heads:
                adapter.attention(layer).o.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0


@pytest.mark.parametrize("granularity", ["group", "query"])
def test_head_pruning_equals_silencing_the_removed_heads(family, granularity, calibration_batches):
    # 8 query heads, 4 KV heads (groups of 2); hidden 64 with head_dim 16 for all families
    model = make_tiny_model(family, num_attention_heads=8, num_key_value_heads=4)
    reference = copy.deepcopy(model)
    batches = as_batches(calibration_batches)
    plan = plan_attention_heads(
        model, pruning_percentage=50, method="activation", granularity=granularity, batches=batches
    )
    removed = {i: sorted(set(range(8)) - set(p.query_heads.tolist())) for i, p in plan.items()}
    _silence_query_heads(reference, removed)
    apply_head_plan(model, plan)
    attention = get_adapter(model).attention(0)
    if granularity == "group":
        assert attention.k.weight.shape == (2 * HEAD_DIM, 64) and attention.q.weight.shape == (
            4 * HEAD_DIM,
            64,
        )
        assert model.config.num_key_value_heads == 2 and attention.module.num_key_value_groups == 2
    else:
        assert attention.k.weight.shape == (4 * HEAD_DIM, 64) and attention.q.weight.shape == (
            4 * HEAD_DIM,
            64,
        )
        assert model.config.num_key_value_heads == 4 and attention.module.num_key_value_groups == 1
    assert attention.o.weight.shape == (64, 4 * HEAD_DIM) and model.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_group_plan_keeps_query_heads_of_kept_groups():
    model = make_tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    plan = plan_attention_heads(model, pruning_percentage=50, method="L2")
    for p in plan.values():
        assert len(p.kv_heads) == 2
        assert p.query_heads.tolist() == [h for g in p.kv_heads.tolist() for h in (2 * g, 2 * g + 1)]


def test_l2_group_scores_match_hand_computation():
    model = make_tiny_model("llama")  # 4 query heads, 2 KV heads
    parts = get_adapter(model).attention(1)
    scores = head_scores(model, "L2", layer_indices=[1])[1]
    q, k, v, o = (m.weight.detach() for m in (parts.q, parts.k, parts.v, parts.o))
    for g in range(2):
        expected = sum(
            q[h * 16 : (h + 1) * 16].norm() + o[:, h * 16 : (h + 1) * 16].norm() for h in (2 * g, 2 * g + 1)
        )
        expected += k[g * 16 : (g + 1) * 16].norm() + v[g * 16 : (g + 1) * 16].norm()
        assert scores[g].item() == pytest.approx(expected.item(), rel=1e-5)


def test_activation_scores_remove_a_silent_group(calibration_batches):
    model = make_tiny_model("qwen2", num_attention_heads=8, num_key_value_heads=4)
    _silence_query_heads(model, {i: [4, 5] for i in range(4)})  # group 2 contributes nothing
    _, stats = prune_model(
        model,
        pruning_type="ATTENTION",
        pruning_percentage=25,
        dataloader=calibration_batches,
        show_progress=False,
        return_stats=True,
    )
    assert stats["event"]["method"] == "activation"
    assert all(kv == [0, 1, 3] for kv in stats["event"]["kept_kv_heads"].values())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("percentage, heads, plain_reload", [(50, (4, 2), True), (25, (6, 3), False)])
def test_head_pruning_reloads_and_generates_with_cache(
    family, percentage, heads, plain_reload, tmp_path, calibration_batches
):
    model = make_tiny_model(family, num_attention_heads=8, num_key_value_heads=4)
    prune_model(
        model,
        pruning_type="ATTENTION",
        pruning_percentage=percentage,
        dataloader=calibration_batches,
        show_progress=False,
    )
    save_pruned_model(model, tmp_path)
    if plain_reload:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == heads
    else:
        # 64 is not a multiple of 6 heads: transformers refuses such a config, the package loader builds it
        reloaded = load_pruned_model(tmp_path)
        assert reloaded.config.layer_num_attention_heads == [heads[0]] * 4
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_per_layer_heads_and_widths_reload_with_package_loader(tmp_path, calibration_batches):
    model = make_tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    prune_model(
        model, pruning_type="ATTENTION", pruning_percentage=50, layer_indices=[0, 2], show_progress=False
    )
    prune_model(
        model,
        pruning_type="ATTENTION",
        pruning_percentage=50,
        head_granularity="query",
        layer_indices=[1],
        show_progress=False,
    )
    prune_model(
        model,
        pruning_percentage=30,
        dataloader=calibration_batches,
        layer_allocation="global",
        show_progress=False,
    )
    save_pruned_model(model, tmp_path)
    reloaded = load_pruned_model(tmp_path)
    assert reloaded.config.layer_num_attention_heads == [4, 4, 4, 8]
    assert reloaded.config.layer_num_key_value_heads == [2, 4, 2, 4]
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pruning_percentage=10), "removes no group.*smallest step is 50.0%"),
        (dict(pruning_percentage=100), "strictly between 0 and 100"),
        (dict(neuron_selection_method="MAW"), "MLP neurons only"),
        (dict(neuron_selection_method="activation"), "needs calibration data"),
        (dict(pruning_percentage=50, head_granularity="kv"), "granularity must be"),
        (dict(pruning_percentage=50, layer_indices=[4]), "layer index 4 out of range"),
        (dict(expansion_rate=100), "does not apply|do\\(es\\) not apply"),
    ],
)
def test_bad_head_pruning_input_is_refused_untouched(kwargs, match):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_model(model, pruning_type="ATTENTION", show_progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == 4


def test_heads_that_do_not_divide_into_groups_are_refused():
    model = make_tiny_model("llama", num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="do not divide into equal groups"):
        prune_model(model, pruning_type="ATTENTION", pruning_percentage=50, show_progress=False)
