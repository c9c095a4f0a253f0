"""Refit of the kept down_proj / o_proj columns and sequential calibration, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter, weight_out_in
from optipfair_train.pruning import as_batches, plan_mlp_width
from optipfair_train.pruning.heads import HeadPlan, apply_head_plan, head_columns
from optipfair_train.pruning.reconstruction import apply_refits, collect_grams, plan_refits, refit_columns
from optipfair_train.pruning.width import apply_width_plan

IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12], [9, 9, 30, 31, 32, 70, 71, 4]])


def _batches(n=4, rows=4, seq=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return as_batches([{"input_ids": torch.randint(3, 100, (rows, seq), generator=g)} for _ in range(n)])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _duplicate_neurons(model, pairs):
    """Make neuron ``j`` compute exactly what neuron ``i`` computes, for every ``(j, i)`` in ``pairs``."""
    with torch.no_grad():
        for layer in model.model.layers:
            for j, i in pairs:
                layer.mlp.gate_proj.weight[j] = layer.mlp.gate_proj.weight[i]
                layer.mlp.up_proj.weight[j] = layer.mlp.up_proj.weight[i]


def test_refit_derivation_on_synthetic_inputs():
    """The closed form is the minimiser: zero gradient of the ridge objective, exact when x_R = M x_S."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    x = torch.randn(8, 200, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 6])
    removed = torch.tensor([1, 4, 7])
    x_exact = x.clone()
    x_exact[removed] = torch.randn(3, 5, generator=g, dtype=torch.float64) @ x[keep]
    w_fit = refit_columns(w, x_exact @ x_exact.T, keep, damping=0.0)
    torch.testing.assert_close(w_fit @ x_exact[keep], w @ x_exact, rtol=1e-9, atol=1e-9)

    damping = 0.1
    gram = x @ x.T
    lam = damping * gram[keep][:, keep].diagonal().mean()
    w_fit = refit_columns(w, gram, keep, damping)
    grad = -(w @ x - w_fit @ x[keep]) @ x[keep].T + lam * (w_fit - w[:, keep])
    assert grad.abs().max() < 1e-8


def test_nothing_pruned_returns_original_weights():
    model = make_tiny_model("llama")
    batches = _batches()
    grams = collect_grams(model, batches, "mlp", [0, 1])
    everything = torch.arange(128)
    refits = plan_refits(model, "mlp", {0: everything, 1: everything}, grams, damping=0.0)
    for i in (0, 1):
        assert torch.equal(refits[i].float(), model.model.layers[i].mlp.down_proj.weight)


def test_removed_neurons_that_duplicate_kept_ones_are_reproduced_exactly():
    """Neurons 96..127 copy 0..31: removing them and refitting (damping 0) keeps the logits."""
    model = make_tiny_model("llama")
    _duplicate_neurons(model, [(96 + k, k) for k in range(32)])
    before = _logits(model)
    batches = _batches()
    keep = torch.arange(96)
    plan = dict.fromkeys(range(4), keep)
    refits = plan_refits(model, "mlp", plan, collect_grams(model, batches, "mlp", plan), damping=0.0)
    plain = copy.deepcopy(model)
    apply_width_plan(plain, plan)
    apply_width_plan(model, plan)
    apply_refits(model, "mlp", refits)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    assert (_logits(plain) - before).abs().max() > 1e-2  # the cut alone does change the output


def test_padding_changes_nothing():
    model = make_tiny_model("llama")
    batches = _batches(n=2)
    padded = []
    for b in batches:
        ids = torch.cat([b["input_ids"], torch.randint(3, 100, (4, 7))], dim=1)
        mask = torch.cat([b["attention_mask"], torch.zeros(4, 7, dtype=torch.long)], dim=1)
        ids = torch.cat([ids, torch.randint(3, 100, (1, 71))])  # plus a row of padding only
        mask = torch.cat([mask, torch.zeros(1, 71, dtype=torch.long)])
        padded.append({"input_ids": ids, "attention_mask": mask})
    keep = {0: torch.arange(0, 128, 2)}
    plain = plan_refits(model, "mlp", keep, collect_grams(model, batches, "mlp", [0]), 0.01)
    with_padding = plan_refits(model, "mlp", keep, collect_grams(model, padded, "mlp", [0]), 0.01)
    torch.testing.assert_close(with_padding[0], plain[0], rtol=1e-6, atol=1e-7)


def test_sequential_equals_a_hand_written_two_layer_reference():
    model = make_tiny_model("llama", num_hidden_layers=2)
    batches = _batches()
    damping = 0.05

    def activation_keep(m, layer, gram, k=96):
        down = m.model.layers[layer].mlp.down_proj.weight
        scores = gram.diagonal().float().sqrt() * down.norm(dim=0)
        return scores.topk(k).indices.sort().values

    # layer 0: its inputs do not depend on any pruning
    reference = copy.deepcopy(model)
    gram0 = collect_grams(reference, batches, "mlp", [0])[0]
    keep0 = activation_keep(reference, 0, gram0)
    refit0 = refit_columns(reference.model.layers[0].mlp.down_proj.weight, gram0, keep0, damping)
    apply_width_plan(reference, {0: keep0})
    apply_refits(reference, "mlp", {0: refit0})
    # layer 1: statistics of the unpruned layer 1 on the outputs of the pruned, refit layer 0
    gram1 = collect_grams(reference, batches, "mlp", [1])[1]
    keep1 = activation_keep(reference, 1, gram1)
    refit1 = refit_columns(reference.model.layers[1].mlp.down_proj.weight, gram1, keep1, damping)
    gate1 = reference.model.layers[1].mlp.gate_proj.weight[keep1]

    prune_model(
        model, "MLP_GLU", pruning_percentage=25, dataloader=batches, reconstruct=True, damping=damping,
        sequential=True, show_progress=False,
    )
    kept = model.config.pruning_history[-1]
    assert kept["sequential"] is True and kept["damping"] == damping
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, refit0.float())
    torch.testing.assert_close(model.model.layers[1].mlp.gate_proj.weight, gate1)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, refit1.float(), rtol=1e-5, atol=1e-6)
    # non-sequential calibration picks layer 1 from the unpruned prefix: a different system
    direct = collect_grams(make_tiny_model("llama", num_hidden_layers=2), batches, "mlp", [1])[1]
    assert not torch.allclose(direct, gram1)


def test_rank_deficient_statistics_without_damping_fail_before_any_change():
    model = make_tiny_model("llama")
    _duplicate_neurons(model, [(64 + k, k) for k in range(64)])  # every neuron has a twin: kept pairs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 0 mlp refit.*singular.*damping"):
        prune_model(
            model, "MLP_GLU", pruning_percentage=25, dataloader=_batches(), reconstruct=True, damping=0.0,
            show_progress=False,
        )
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.intermediate_size == 128


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reconstruct=True), "needs calibration data: pass dataloader="),
        (dict(pruning_type="DEPTH", num_layers_to_remove=1, reconstruct=True, dataloader="b"), "nothing to refit"),
        (dict(sequential=True, dataloader="b"), "pass reconstruct=True"),
        (dict(reconstruct=True, damping=-1, dataloader="b"), "damping must be a number >= 0"),
        (dict(reconstruct=True, damping=0, dataloader="few"), "at least as many real calibration tokens"),
        (
            dict(reconstruct=True, sequential=True, neuron_selection_method="taylor", dataloader="b"),
            "sequential=False",
        ),
    ],
)
def test_bad_reconstruct_arguments_fail_before_any_change(kwargs, message):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = {"b": _batches(n=1), "few": _batches(n=1, rows=1, seq=20)}
    if "dataloader" in kwargs:
        kwargs = dict(kwargs, dataloader=data[kwargs["dataloader"]])
    kwargs.setdefault("pruning_type", "MLP_GLU")
    with pytest.raises(ValueError, match=message):
        prune_model(model, show_progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sequential_refuses_mixed_attention_layer_types():
    model = make_tiny_model("gemma2")
    with pytest.raises(ValueError, match="same attention mask"):
        prune_model(model, "MLP_GLU", dataloader=_batches(n=1), reconstruct=True, sequential=True)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("pruning_type", ["MLP_GLU", "ATTENTION"])
def test_refit_model_reloads_and_keeps_optimizer_state_shapes(tmp_path, pruning_type, sequential):
    model = make_tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    kwargs = dict(pruning_percentage=50) if pruning_type == "ATTENTION" else dict(pruning_percentage=25)
    cut = copy.deepcopy(model)
    prune_model(cut, pruning_type, dataloader=_batches(), show_progress=False, **kwargs)
    prune_model(
        model, pruning_type, dataloader=_batches(), reconstruct=True, sequential=sequential,
        optimizer=optimizer, show_progress=False, **kwargs,
    )
    module = "down_proj" if pruning_type == "MLP_GLU" else "o_proj"
    refit = dict(model.named_parameters())[f"model.layers.1.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}.weight"]
    plain = dict(cut.named_parameters())[f"model.layers.1.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}.weight"]
    assert refit.shape == plain.shape and not torch.allclose(refit, plain)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state[p].values():
                if value.dim() > 0:
                    assert value.shape == p.shape
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_o_proj_refit_reproduces_a_duplicated_kv_group_exactly():
    """GQA (4 query heads, 2 KV heads): group 1 copies group 0, so removing it and refitting keeps the logits."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight[32:] = attn.q_proj.weight[:32]
            attn.k_proj.weight[16:] = attn.k_proj.weight[:16]
            attn.v_proj.weight[16:] = attn.v_proj.weight[:16]
    before = _logits(model)
    plan = {i: HeadPlan(query_heads=torch.tensor([0, 1]), kv_heads=torch.tensor([0])) for i in range(4)}
    columns = {i: head_columns(p.query_heads, 16) for i, p in plan.items()}
    grams = collect_grams(model, _batches(), "attention", columns)
    refits = plan_refits(model, "attention", columns, grams, damping=0.0)
    apply_head_plan(model, plan)
    apply_refits(model, "attention", refits)
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (64, 32)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_lora_refit_moves_into_the_base_weight():
    """Effective kept weight (base + scale * B @ A[:, S]) equals the refit of the effective weight."""
    model = make_tiny_model("llama")
    torch.manual_seed(1)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "o_proj"], init_lora_weights=False)
    )
    merged = copy.deepcopy(lora).merge_and_unload()
    batches = _batches()
    plan = plan_mlp_width(merged, method="activation", pruning_percentage=25, batches=batches)
    expected = plan_refits(merged, "mlp", plan, collect_grams(merged, batches, "mlp", plan), 0.01)
    a_before = lora.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.clone()

    refits = plan_refits(lora, "mlp", plan, collect_grams(lora, batches, "mlp", plan), 0.01)
    apply_width_plan(lora, plan)
    apply_refits(lora, "mlp", refits)
    apply_width_plan(merged, plan)
    apply_refits(merged, "mlp", expected)

    down = lora.base_model.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(down.lora_A["default"].weight, a_before[:, plan[0]])
    effective = down.base_layer.weight + down.scaling["default"] * down.lora_B["default"].weight @ down.lora_A["default"].weight
    torch.testing.assert_close(effective, merged.model.layers[0].mlp.down_proj.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(lora), _logits(merged), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi"])
def test_plain_mlp_refit_of_fc2_is_exact_for_duplicated_neurons(family):
    """fc2 / GPT-2's Conv1D c_proj: neurons 96..127 copy 0..31 (fc1 rows and biases), removing them is exact."""
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    with torch.no_grad():
        for i in range(adapter.num_layers):
            up = adapter.mlp(i).up
            weight_out_in(up)[96:] = weight_out_in(up)[:32]
            up.bias[96:] = up.bias[:32]
    before = _logits(model)
    plan = dict.fromkeys(range(adapter.num_layers), torch.arange(96))
    refits = plan_refits(model, "mlp", plan, collect_grams(model, _batches(), "mlp", plan), damping=0.0)
    apply_width_plan(model, plan)
    apply_refits(model, "mlp", refits)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2", "mistral"])
def test_sequential_refit_runs_and_reloads_on_other_families(tmp_path, family):
    model = make_tiny_model(family)
    pruning_type = "MLP" if family in ("gpt2", "opt") else "MLP_GLU"
    prune_model(
        model, pruning_type, pruning_percentage=25, dataloader=_batches(), reconstruct=True, sequential=True,
        show_progress=False,
    )
    assert get_adapter(model).intermediate_sizes() == [96] * 4
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_sequential_refit_of_a_lora_model_equals_the_merged_model():
    """L2 scores read gate/up only (no adapter there), so both choose the same neurons; the refit weights agree."""
    model = make_tiny_model("llama")
    torch.manual_seed(1)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights=False)
    )
    merged = copy.deepcopy(lora).merge_and_unload()
    for m in (lora, merged):
        prune_model(
            m, "MLP_GLU", neuron_selection_method="L2", pruning_percentage=25, dataloader=_batches(),
            reconstruct=True, sequential=True, show_progress=False,
        )
    for i in range(4):
        down = lora.base_model.model.model.layers[i].mlp.down_proj
        assert down.lora_A["default"].weight.shape == (4, 96) and down.base_layer.weight.shape == (64, 96)
    torch.testing.assert_close(_logits(lora), _logits(merged), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        copy.deepcopy(lora).merge_and_unload().model.layers[3].mlp.down_proj.weight,
        merged.model.layers[3].mlp.down_proj.weight, rtol=1e-5, atol=1e-5,
    )


def test_pruning_callback_refits_inside_training(tmp_path, tokenizer):
    from callbacks_helpers import NEUTRAL_TEXTS, TextDataset, training_args
    from transformers import Trainer

    from optipfair_train.callbacks import PruningCallback

    with pytest.raises(ValueError, match="pass dataloader"):
        PruningCallback(target=20, step=2, neuron_selection_method="MAW", prune_kwargs={"reconstruct": True})
    model = make_tiny_model("llama")
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=4),
        train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS, repeat=2), processing_class=tokenizer,
    )
    trainer.add_callback(
        PruningCallback(
            trainer, target=25, step=2, start_step=2, num_events=1, neuron_selection_method="activation",
            dataloader=_batches(), prune_kwargs={"reconstruct": True, "damping": 0.01},
        )
    )
    trainer.train()
    event = model.config.pruning_history[-1]
    assert event["reconstruct"] is True and event["damping"] == 0.01
    assert get_adapter(model).intermediate_sizes() == [96] * 4


@pytest.mark.parametrize("pruning_type, percentage", [("MLP_GLU", 25), ("ATTENTION", 50)])
def test_sequential_on_one_layer_equals_non_sequential(pruning_type, percentage):
    """With only layer 2 pruned its inputs are the unpruned prefix's either way: same heads/neurons, same refit."""
    models = [make_tiny_model("llama"), make_tiny_model("llama")]
    for model, sequential in zip(models, (False, True), strict=True):
        prune_model(
            model, pruning_type, pruning_percentage=percentage, dataloader=_batches(), layer_indices=[2],
            neuron_selection_method="activation",  # the defaults differ: hybrid, but activation when sequential
            reconstruct=True, sequential=sequential, show_progress=False,
        )
    a, b = (dict(m.named_parameters()) for m in models)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert models[0].model.layers[2].self_attn.o_proj.weight.shape[1] == (32 if pruning_type == "ATTENTION" else 64)
