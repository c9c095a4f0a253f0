"""Fairness-aware importance: a planted bias neuron is found and pruned first."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning.fairness import combine_fairness, neuron_bias_gap

PAIRS = [
    ("The Zed doctor said hello.", "The Bob doctor said hello."),
    ("A Zed worker went home.", "A Tim worker went home."),
    ("Zed people like music.", "Old people like music."),
    ("My Zed friend is here.", "My best friend is here."),
]
PLANTED_LAYER, PLANTED_NEURON, DIM = 1, 37, 5


def _plant_bias_neuron(model, tokenizer):
    """Hidden dimension DIM carries only the token 'Z'; neuron 37 of layer 1 reads only that dimension."""
    adapter = get_adapter(model)
    z = tokenizer.convert_tokens_to_ids("Z")
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, DIM] = 0
        embed[z, DIM] = 8.0
        for i in range(adapter.num_layers):  # nothing else writes into DIM
            adapter.attention(i).o.weight[DIM] = 0
            adapter.mlp(i).down.weight[DIM] = 0
        mlp = adapter.mlp(PLANTED_LAYER)
        for linear in (mlp.gate, mlp.up):
            linear.weight[PLANTED_NEURON] = 0
            linear.weight[PLANTED_NEURON, DIM] = 6.0


def test_planted_bias_neuron_has_the_largest_gap_and_is_pruned_first(tokenizer, calibration_batches):
    model = make_tiny_model("llama")
    _plant_bias_neuron(model, tokenizer)
    gaps = neuron_bias_gap(model, tokenizer, PAIRS, batch_size=3)
    assert set(gaps) == {0, 1, 2, 3} and gaps[1].shape == (128,)
    assert int(gaps[PLANTED_LAYER].argmax()) == PLANTED_NEURON
    assert gaps[PLANTED_LAYER][PLANTED_NEURON] > 3 * gaps[PLANTED_LAYER].topk(2).values[1]

    _, stats = prune_model(
        model,
        neuron_selection_method="fairness",
        pruning_percentage=1,
        bias_pairs=PAIRS,
        tokenizer=tokenizer,
        fairness_weight=1.0,
        dataloader=calibration_batches,
        layer_indices=[PLANTED_LAYER],
        show_progress=False,
        return_stats=True,
    )
    assert stats["event"]["method"] == "fairness" and stats["event"]["fairness_weight"] == 1.0
    # one neuron (1% of 128) was removed, and it is the planted one: its input weights are gone
    mlp = get_adapter(model).mlp(PLANTED_LAYER)
    assert mlp.intermediate_size == 127
    assert not (mlp.gate.weight[:, DIM] == 6.0).any()


def test_quality_only_weight_keeps_the_planted_neuron(tokenizer, calibration_batches):
    model = make_tiny_model("llama")
    _plant_bias_neuron(model, tokenizer)
    prune_model(
        model,
        neuron_selection_method="fairness",
        pruning_percentage=1,
        bias_pairs=PAIRS,
        tokenizer=tokenizer,
        fairness_weight=0.0,
        layer_indices=[PLANTED_LAYER],
        show_progress=False,
    )
    assert (get_adapter(model).mlp(PLANTED_LAYER).gate.weight[:, DIM] == 6.0).any()


def test_gap_handles_prompts_of_different_lengths(tokenizer):
    model = make_tiny_model("qwen2")
    gaps = neuron_bias_gap(
        model, tokenizer, [("A short one.", "A much, much longer prompt here."), ("x", "y")]
    )
    assert all(torch.isfinite(g).all() and (g > 0).any() for g in gaps.values())


def test_pooled_gap_equals_manual_per_pair_computation(tokenizer):
    model = make_tiny_model("mistral")
    gaps = neuron_bias_gap(model, tokenizer, PAIRS[:2], batch_size=1)
    captured = []
    handle = get_adapter(model).mlp(2).down.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    with torch.no_grad():
        for pair in PAIRS[:2]:
            for text in pair:
                model(**tokenizer([text], return_tensors="pt"))
    handle.remove()
    manual = sum((captured[2 * k].mean(0) - captured[2 * k + 1].mean(0)).abs() for k in range(2)) / 2
    torch.testing.assert_close(gaps[2], manual, rtol=1e-4, atol=1e-6)


def test_combine_and_errors(tokenizer):
    assert torch.allclose(
        combine_fairness(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]), 0.8), torch.tensor([0.2, 0.8])
    )
    with pytest.raises(ValueError, match="between 0 and 1"):
        combine_fairness(torch.ones(2), torch.ones(2), 1.5)
    with pytest.raises(ValueError, match="needs bias_pairs"):
        prune_model(
            make_tiny_model("llama"),
            neuron_selection_method="fairness",
            pruning_percentage=10,
            show_progress=False,
        )


def test_quality_term_is_the_hybrid_rank_with_calibration_and_maw_without(tokenizer, calibration_batches):
    from optipfair_train.pruning.width import neuron_scores

    model = make_tiny_model("llama")
    common = dict(bias_pairs=PAIRS, tokenizer=tokenizer, fairness_weight=0.0)

    def ranks(scores):  # the rank within the layer, scaled to [0, 1]
        return {i: s.argsort().argsort().float() / (len(s) - 1) for i, s in scores.items()}

    with_data = neuron_scores(model, "fairness", batches=calibration_batches, **common)
    hybrid = ranks(neuron_scores(model, "hybrid", batches=calibration_batches))
    without = neuron_scores(model, "fairness", **common)
    maw = ranks(neuron_scores(model, "MAW"))
    for i in with_data:
        torch.testing.assert_close(with_data[i], hybrid[i])
        torch.testing.assert_close(without[i], maw[i])
    assert any(not torch.equal(with_data[i], without[i]) for i in with_data)
