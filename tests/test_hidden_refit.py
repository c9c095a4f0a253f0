"""The refit of the projections that read a pruned residual stream (pruning/hidden_refit.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from test_hidden import DROP, _batch, _logits, _zeroed_model

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning.hidden import HiddenPlan, apply_hidden
from optipfair_train.pruning.hidden_refit import apply_hidden_refit, plan_hidden_refit

KEEP = torch.tensor([c for c in range(64) if c not in DROP])
SOURCE = [0, 5, 12, 20, 33, 44, 52, 61]  # DROP[k] carries 2 x SOURCE[k] at every position


def _copied_model(family: str):
    """Channels DROP are copies (x2) of kept channels everywhere in the stream: the kept ones predict them."""
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, DROP] = 2 * embedding[:, SOURCE]
        for i in range(adapter.num_layers):
            for linear in (adapter.attention(i).o, adapter.mlp(i).down):
                linear.weight[DROP] = 2 * linear.weight[SOURCE]
    return model


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma-untied", "gemma2"])
def test_refit_keeps_channels_that_carry_nothing_exact(case, calibration_batches):
    model = _zeroed_model(case)
    batch = _batch()
    before = _logits(model, batch)
    prune_model(
        model,
        pruning_type="HIDDEN",
        pruning_percentage=12.5,
        dataloader=calibration_batches,
        reconstruct=True,
        damping=1e-4,  # layer 0 sees as many distinct inputs as characters: its Gram is singular
    )
    assert model.config.pruning_history[-1]["reconstruct"] is True
    torch.testing.assert_close(_logits(model, batch), before, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_refit_is_the_ridge_solution_on_the_pruned_norm_output(family, calibration_batches):
    # independent of the refit's algebra: record layer 0's norm input h (the embedding, unchanged on the kept
    # channels by pruning), run the PRUNED norm module on h[:, keep] and solve the ridge problem directly
    model = _copied_model(family)
    adapter = get_adapter(model)
    norm = adapter.block_norms(0)[0][0]
    inputs = []
    handle = norm.register_forward_hook(lambda m, args, out: inputs.append((args[0], out)))
    with torch.no_grad():
        for b in calibration_batches:
            model(**b)
    handle.remove()
    masks = [b["attention_mask"].reshape(-1).bool() for b in calibration_batches]
    h = torch.cat([i.reshape(-1, 64)[m] for (i, _), m in zip(inputs, masks, strict=True)]).double()
    x = torch.cat([o.reshape(-1, 64)[m] for (_, o), m in zip(inputs, masks, strict=True)]).double()
    w_v = adapter.attention(0).v.weight.detach().double().clone()

    plan = HiddenPlan(KEEP, 64)
    refits = plan_hidden_refit(model, plan, calibration_batches, damping=0.01)
    apply_hidden(model, plan)
    with torch.no_grad():
        x_new = norm(h[:, KEEP].float()).double()
    gram = x_new.t() @ x_new
    lam = 0.01 * float(gram.diagonal().mean())
    expected = torch.linalg.solve(
        gram + lam * torch.eye(56, dtype=torch.float64), x_new.t() @ (x @ w_v.t()) + lam * w_v[:, KEEP].t()
    ).t()
    torch.testing.assert_close(refits["layer 0 attention"][2], expected, atol=1e-6, rtol=1e-5)
    apply_hidden_refit(model, refits)
    torch.testing.assert_close(adapter.attention(0).v.weight.double(), expected, atol=1e-5, rtol=1e-5)


def test_refit_recovers_channels_the_kept_ones_predict(calibration_batches):
    model = _copied_model("llama")
    batch = _batch()
    before = _logits(model, batch)
    plan = HiddenPlan(KEEP, 64)  # remove the copies
    errors = {}
    for refit in (False, True):
        pruned = copy.deepcopy(model)
        refits = plan_hidden_refit(pruned, plan, calibration_batches, damping=1e-4) if refit else {}
        apply_hidden(pruned, plan)
        apply_hidden_refit(pruned, refits)
        errors[refit] = (_logits(pruned, batch) - before).pow(2).mean().item()
    # measured 4.56 -> 0.157; not zero: the per-token RMS rescaling r_t of the kept channels cannot be
    # undone exactly by a fixed matrix
    assert errors[True] < 0.2 * errors[False], errors


def test_refit_refuses_bad_damping_before_any_change(calibration_batches):
    model = make_tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        prune_model(
            model, pruning_type="HIDDEN", reconstruct=True, damping=-1, dataloader=calibration_batches
        )
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(model, pruning_type="HIDDEN", reconstruct=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_refit_solved_a_few_rows_at_a_time_equals_solving_all_rows(monkeypatch, calibration_batches):
    from optipfair_train.pruning import hidden_refit

    model = make_tiny_model("llama")  # untied: the head (104 rows) is refit too
    plan = HiddenPlan(KEEP, 64)
    whole = plan_hidden_refit(model, plan, calibration_batches, 0.01)
    monkeypatch.setattr(hidden_refit, "REFIT_ROWS", 7)  # 104 head rows in 15 blocks, the last of 6
    blocks = plan_hidden_refit(model, plan, calibration_batches, 0.01)
    assert whole.keys() == blocks.keys() and "head" in whole
    for name in whole:
        for a, b in zip(whole[name], blocks[name], strict=True):
            assert a.shape == b.shape and a.dtype == torch.float64
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
