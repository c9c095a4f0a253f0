"""First-order Taylor importance against a hand-computed reference."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import as_batches
from optipfair_train.pruning.taylor import TaylorImportance, taylor_importance


def _reference(model, batches):
    """Per-batch |sum(w * g)| by hand, for MLP neurons, query heads and blocks."""
    adapter = get_adapter(model)
    neurons = {i: torch.zeros(128, dtype=torch.float64) for i in range(4)}
    heads = {i: torch.zeros(4, dtype=torch.float64) for i in range(4)}
    blocks = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        model.zero_grad()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        for i in range(4):
            mlp, att = adapter.mlp(i), adapter.attention(i)
            wg = lambda m: (m.weight * m.weight.grad).double()  # noqa: E731
            n = wg(mlp.gate).sum(1) + wg(mlp.up).sum(1) + wg(mlp.down).sum(0)
            h = torch.stack(
                [
                    wg(att.q)[16 * k : 16 * (k + 1)].sum() + wg(att.o)[:, 16 * k : 16 * (k + 1)].sum()
                    for k in range(4)
                ]
            )
            neurons[i] += n.abs()
            heads[i] += h.abs()
            blocks[i] += (n.sum() + h.sum()).abs()
    model.zero_grad()
    return neurons, heads, blocks


def test_taylor_scores_equal_hand_computed_reference(calibration_batches):
    model = make_tiny_model("llama")
    batches = as_batches(calibration_batches[:2])
    taylor = taylor_importance(model, batches)
    neurons, heads, blocks = _reference(model, batches)
    assert taylor.batches == 2
    for i in range(4):
        torch.testing.assert_close(taylor.neuron_scores()[i].double(), neurons[i], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(taylor.head_scores()[i].double(), heads[i], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(taylor.block_scores().double(), blocks, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_accumulating_from_a_training_loop_equals_one_shot(calibration_batches):
    model = make_tiny_model("qwen2")
    batches = as_batches(calibration_batches)
    one_shot = taylor_importance(model, batches)
    from_loop = TaylorImportance(model)
    for batch in batches:
        model.zero_grad()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        assert from_loop.accumulate()
    for i in range(4):
        torch.testing.assert_close(
            from_loop.neuron_scores()[i], one_shot.neuron_scores()[i], rtol=1e-5, atol=1e-8
        )
    plan_a = prune_model(
        make_tiny_model("qwen2"),
        neuron_selection_method="taylor",
        pruning_percentage=30,
        dataloader=calibration_batches,
        show_progress=False,
        return_stats=True,
    )[1]
    plan_b = prune_model(
        make_tiny_model("qwen2"),
        neuron_selection_method="taylor",
        pruning_percentage=30,
        gradient_importance=from_loop,
        show_progress=False,
        return_stats=True,
    )[1]
    assert plan_a["event"]["intermediate_sizes"] == plan_b["event"]["intermediate_sizes"] == [90] * 4


def test_taylor_removes_a_neuron_that_does_not_affect_the_loss(calibration_batches):
    model = make_tiny_model("llama")
    with torch.no_grad():  # neuron 7 of layer 0 reads nothing: w * g is zero on all its weights
        get_adapter(model).mlp(0).gate.weight[7] = 0
        get_adapter(model).mlp(0).up.weight[7] = 0
        get_adapter(model).mlp(0).down.weight[:, 7] = 0
    scores = taylor_importance(model, as_batches(calibration_batches)).neuron_scores()[0]
    assert scores[7] == 0 and scores.argmin() == 7


def test_taylor_for_heads_and_blocks(calibration_batches):
    model = make_tiny_model("mistral")
    _, stats = prune_model(
        model,
        pruning_type="ATTENTION",
        neuron_selection_method="taylor",
        pruning_percentage=50,
        dataloader=calibration_batches,
        show_progress=False,
        return_stats=True,
    )
    assert model.config.num_key_value_heads == 1 and stats["event"]["method"] == "taylor"
    model = make_tiny_model("mistral")
    _, stats = prune_model(
        model,
        pruning_type="DEPTH",
        layer_selection_method="taylor",
        num_layers_to_remove=1,
        dataloader=calibration_batches,
        show_progress=False,
        return_stats=True,
    )
    expected = (
        taylor_importance(make_tiny_model("mistral"), as_batches(calibration_batches)).block_scores().argmin()
    )
    assert stats["event"]["removed_layers"] == [int(expected)]


def test_frozen_weights_give_no_gradient_importance():
    model = make_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.lm_head.parameters():
        p.requires_grad_(True)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    taylor = TaylorImportance(model)
    assert not taylor.accumulate()
    with pytest.raises(ValueError, match="no MLP gradients"):
        prune_model(
            model,
            neuron_selection_method="taylor",
            pruning_percentage=20,
            gradient_importance=taylor,
            show_progress=False,
        )
