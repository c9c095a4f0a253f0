"""LoRA-aware surgery and optimizer-state surgery."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import apply_width_plan, plan_mlp_width
from optipfair_train.pruning.surgery import check_optimizer_state, prune_mlp_neurons, slice_optimizer_state

IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12], [9, 9, 30, 31, 32, 70, 71, 4]])


def _lora_model(family="llama", **lora):
    model = make_tiny_model(family)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
        init_lora_weights=False,
        **lora,
    )
    torch.manual_seed(1)
    return get_peft_model(model, config)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_aware_prune_equals_prune_after_merge(family, calibration_batches):
    peft_model = _lora_model(family)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    plan = plan_mlp_width(peft_model, method="activation", pruning_percentage=25, batches=calibration_batches)
    apply_width_plan(peft_model, plan)
    apply_width_plan(merged, plan)
    lora_gate = peft_model.base_model.model.model.layers[0].mlp.gate_proj
    assert lora_gate.lora_B["default"].weight.shape == (96, 4)
    assert peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (4, 96)
    torch.testing.assert_close(_logits(peft_model), _logits(merged), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(peft_model.merge_and_unload()), _logits(merged), rtol=1e-5, atol=1e-5)


def test_prune_model_accepts_peft_model_and_keeps_lora_trainable(calibration_batches):
    peft_model = _lora_model()
    prune_model(peft_model, pruning_percentage=50, dataloader=calibration_batches, show_progress=False)
    assert get_adapter(peft_model).intermediate_sizes() == [64] * 4
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_dora_column_slice_is_refused():
    peft_model = _lora_model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        prune_mlp_neurons(get_adapter(peft_model).mlp(0), torch.arange(10))


def _train_step(model, optimizer):
    optimizer.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_surgery_step_equals_fresh_optimizer_with_hand_sliced_state(fused):
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    _train_step(model, optimizer)
    _train_step(model, optimizer)

    reference = copy.deepcopy(model)
    saved_state = {name: copy.deepcopy(optimizer.state[p]) for name, p in model.named_parameters()}

    keep = torch.tensor([0, 5, 7, 20, 21, 100, 127])
    slices = prune_mlp_neurons(get_adapter(model).mlp(1), keep)
    slice_optimizer_state(optimizer, slices)
    for name, p in model.named_parameters():
        for key, value in optimizer.state[p].items():
            if value.dim() > 0:
                assert value.shape == p.shape, (name, key)

    # the reference: same cut on the weights, a freshly built optimizer, state cut by hand
    ref_mlp = get_adapter(reference).mlp(1)
    prune_mlp_neurons(ref_mlp, keep)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=fused)
    hand = {
        "model.layers.1.mlp.gate_proj.weight": 0,
        "model.layers.1.mlp.up_proj.weight": 0,
        "model.layers.1.mlp.down_proj.weight": 1,
    }
    for name, p in reference.named_parameters():
        state = copy.deepcopy(saved_state[name])
        if name in hand:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].index_select(hand[name], keep)
        ref_opt.state[p] = state

    assert optimizer.state[get_adapter(model).mlp(1).up.weight]["step"] == 2
    _train_step(model, optimizer)
    _train_step(reference, ref_opt)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_check_optimizer_state_catches_unsliced_state():
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer)
    prune_mlp_neurons(get_adapter(model).mlp(0), torch.arange(10))
    with pytest.raises(RuntimeError, match="exp_avg.*not sliced"):
        check_optimizer_state(optimizer)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pruning_type="MLP_GLU", pruning_percentage=25),
        dict(pruning_type="ATTENTION", pruning_percentage=50),
        dict(pruning_type="DEPTH", num_layers_to_remove=1),
    ],
)
def test_prune_model_with_optimizer_keeps_training_consistent(kwargs, calibration_batches):
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _train_step(model, optimizer)
    before = {id(p) for p in model.parameters()}
    prune_model(model, dataloader=calibration_batches, optimizer=optimizer, show_progress=False, **kwargs)
    params = list(model.parameters())
    assert {id(p) for p in params} <= before  # the same Parameter objects, none new
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in params}  # removed blocks left the optimizer
    for p in params:
        for value in optimizer.state[p].values():
            if value.dim() > 0:
                assert value.shape == p.shape
    snapshot = [p.detach().clone() for p in params]
    _train_step(model, optimizer)
    assert all(not torch.equal(a, p) for a, p in zip(snapshot, params, strict=True) if p.requires_grad)
