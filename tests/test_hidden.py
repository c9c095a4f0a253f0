"""Hidden-dimension pruning: exact removal of channels that carry nothing, reload, LoRA, optimizer, refusals."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.analysis import count_parameters
from optipfair_train.arch import UnsupportedModelError, get_adapter
from optipfair_train.pruning import load_pruned_model, save_pruned_model
from optipfair_train.pruning.hidden import HiddenPlan, apply_hidden, plan_hidden

DROP = [3, 10, 17, 30, 41, 50, 60, 63]  # 8 of 64 channels: 56 kept, a multiple of the 4 heads
CASES = {  # family, overrides: tied and untied heads, GQA (all), biases, post-norms (gemma2)
    "llama": ("llama", {}),
    "llama-tied": ("llama-tied", {}),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma-untied": ("gemma", dict(tie_word_embeddings=False)),
    "gemma2": ("gemma2", {}),
}


def _batch():
    texts = ["Pruning removes channels.", "A", "Paris is the capital of France."]
    return dict(make_char_tokenizer()(texts, padding=True, return_tensors="pt"))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def _zeroed_model(case: str, **extra):
    """A model whose residual channels ``DROP`` are zero at every position, with non-trivial norm scales.

    A large ``rms_norm_eps`` makes the epsilon correction matter (a wrong one changes logits by ~7).
    """
    family, overrides = CASES[case]
    model = make_tiny_model(family, rms_norm_eps=0.3, **overrides, **extra)
    adapter = get_adapter(model)
    torch.manual_seed(3)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, DROP] = 0
        for i in range(adapter.num_layers):
            for linear in (adapter.attention(i).o, adapter.mlp(i).down):
                linear.weight[DROP] = 0
                if linear.bias is not None:
                    linear.bias.normal_(0, 0.2)
                    linear.bias[DROP] = 0
        norms = [n for i in range(adapter.num_layers) for part in adapter.block_norms(i) for n in part]
        for norm in norms + [adapter.final_norm()]:
            norm.weight.normal_(0.5 if adapter.family.norm_plus_one else 1.0, 0.3)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_removing_channels_that_carry_nothing_keeps_logits_and_reloads(case, tmp_path):
    model = _zeroed_model(case)
    batch = _batch()
    before = _logits(model, batch)
    _, stats = prune_model(
        model, pruning_type="HIDDEN", pruning_percentage=12.5, dataloader=[batch], return_stats=True
    )
    # activation scores of zero channels are zero: exactly DROP is removed
    assert stats["event"]["kept_channels"] == [c for c in range(64) if c not in DROP]
    assert model.config.hidden_size == 56 and model.config.head_dim == 16
    after = _logits(model, batch)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-5)

    save_pruned_model(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(plain, batch), after, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(load_pruned_model(tmp_path), batch), after, atol=1e-6, rtol=1e-6)
    manifest = json.loads((tmp_path / "pruning_manifest.json").read_text())
    assert manifest["hidden_size"] == 56
    assert manifest["history"][-1]["pruning_type"] == "HIDDEN"
    assert plain.config.pruning_history[-1]["hidden_size_before"] == 64


def test_parameter_count_drops_by_every_tensor_that_touches_the_stream():
    model = _zeroed_model("llama-biases")  # untied head, o_proj/down_proj biases
    before = count_parameters(model)
    apply_hidden(model, HiddenPlan(torch.tensor([c for c in range(64) if c not in DROP]), 64))
    # per channel: embedding + head (104 each); per block q/k/v inputs (64 + 16*2*2), o rows + bias (64 + 1),
    # gate/up inputs (128 * 2), down rows + bias (128 + 1), 2 norms; final norm 1
    per_block = 64 + 64 + 65 + 256 + 129 + 2
    assert before - count_parameters(model) == len(DROP) * (104 * 2 + 4 * per_block + 1)
    assert model.lm_head.in_features == 56 and model.model.embed_tokens.embedding_dim == 56


def test_tied_head_stays_tied():
    model = _zeroed_model("llama-tied")
    apply_hidden(model, plan_hidden(model, keep=56, batches=[_batch()]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (104, 56)


def _hand_model(pad_row):
    """hidden 8, two heads: every real token embeds to ``A``, blocks add nothing (zero o/down)."""
    model = make_tiny_model("llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    adapter = get_adapter(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = torch.tensor(A)
        model.model.embed_tokens.weight[0] = torch.tensor(pad_row)  # the pad token
        for i in range(adapter.num_layers):
            adapter.attention(i).o.weight.zero_()
            adapter.mlp(i).down.weight.zero_()
    return model


A = [3.0, -8.0, 1.0, 5.0, -2.0, 7.0, 0.5, 4.0]
PAD = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, 0.0]


@pytest.mark.parametrize("method", ["activation", "activation_l2"])
def test_selected_channels_by_hand_and_padding_is_masked(method):
    # norm outputs are A / rms(A) at every real token: the 4 largest |A| are channels 1, 5, 3, 7.
    # Were the padded tokens counted, channel 6 (100 / rms(PAD) = 2.83 per pad token vs 7 / rms(A) = 1.53
    # per real token for channel 5) would be kept.
    batch = _batch()
    assert (batch["attention_mask"] == 0).sum() > batch["attention_mask"].sum() / 3
    plan = plan_hidden(_hand_model(PAD), keep=4, batches=[batch], method=method)
    assert plan.keep.tolist() == [1, 3, 5, 7]


def test_weight_only_fallback_uses_embedding_column_norms_and_warns(caplog):
    # column norms: channel 6 sqrt(103 * 0.25 + 100^2) = 100.1 > channel 1 sqrt(103) * 8 = 81.2 >
    # channel 5 71.0 > channel 3 50.7 > channel 7 40.6
    with caplog.at_level(logging.WARNING, logger="optipfair_train.pruning.hidden"):
        plan = plan_hidden(_hand_model(PAD), keep=4)
    assert plan.method == "L2" and plan.keep.tolist() == [1, 3, 5, 6]
    assert "column norms" in caplog.text


def _lora(model):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    return get_peft_model(model, config)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # q/k biases; q/k outputs rescaled for q_norm/k_norm
def test_lora_layers_are_sliced_like_the_merged_model(family):
    batch = _batch()
    peft_model = _lora(make_tiny_model(family, rms_norm_eps=0.3))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    plan = plan_hidden(peft_model, keep=48, batches=[batch])
    apply_hidden(peft_model, plan)
    apply_hidden(merged, plan)
    layer = peft_model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (4, 48)
    assert layer.mlp.down_proj.lora_B["default"].weight.shape == (48, 4)
    torch.testing.assert_close(_logits(peft_model, batch), _logits(merged, batch), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        _logits(peft_model.merge_and_unload(), batch), _logits(merged, batch), atol=1e-4, rtol=1e-5
    )


def _train_step(model, optimizer, batch):
    optimizer.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("case", ["llama-tied", "gemma2"])
def test_optimizer_state_is_sliced_and_the_next_step_runs(case):
    batch = _batch()
    model = make_tiny_model(CASES[case][0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _train_step(model, optimizer, batch)
    q = get_adapter(model).attention(1).q
    embedding = model.get_input_embeddings().weight
    q_state, embedding_state = (
        optimizer.state[q.weight]["exp_avg"].clone(),
        optimizer.state[embedding]["exp_avg"],
    )
    keep = torch.tensor([c for c in range(64) if c not in DROP])
    prune_model(
        model, pruning_type="HIDDEN", pruning_percentage=12.5, dataloader=[batch], optimizer=optimizer
    )
    kept = torch.tensor(model.config.pruning_history[-1]["kept_channels"])
    for p in model.parameters():
        for value in optimizer.state[p].values():
            assert value.dim() == 0 or value.shape == p.shape
    torch.testing.assert_close(optimizer.state[q.weight]["exp_avg"], q_state[:, kept], rtol=0, atol=0)
    assert optimizer.state[embedding]["exp_avg"].shape == (104, 56) != embedding_state.shape
    assert len(keep) == len(kept)
    snapshot = q.weight.detach().clone()
    _train_step(model, optimizer, batch)
    assert not torch.equal(snapshot, q.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pruning_percentage=0), "strictly between 0 and 100"),
        (dict(pruning_percentage=100), "strictly between 0 and 100"),
        (dict(pruning_percentage=-5), "strictly between 0 and 100"),
        (dict(pruning_percentage="10"), "must be a number"),
        (dict(pruning_percentage=99, divisor=4), "keeps 0 of 64"),
        (dict(pruning_percentage=10, divisor=0), "divisor must be a positive integer"),
        (dict(keep=0), r"keep must be .* \[1, 63\]"),
        (dict(keep=64), r"keep must be .* \[1, 63\]"),
        (dict(keep=62), r"multiple of num_attention_heads \(4\)"),
        (dict(keep=48, method="activation"), "reads calibration data"),
        (dict(keep=48, method="magnitude"), "activation, activation_l2, L2"),
    ],
)
def test_bad_requests_are_refused_before_any_change(kwargs, message):
    model = make_tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        plan_hidden(model, **kwargs)
    assert model.config.hidden_size == 64
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_plans_and_families_are_refused_before_any_change():
    model = make_tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    bad_plans = [
        (HiddenPlan(torch.arange(48), 96), "made for hidden size 96"),
        (HiddenPlan(torch.tensor([0, 0, 1, 2]), 64), "distinct indices"),
        (HiddenPlan(torch.arange(62), 64), "multiple of num_attention_heads"),
        (HiddenPlan(torch.arange(64), 64), "between 1 and 63"),
    ]
    for plan, message in bad_plans:
        with pytest.raises(ValueError, match=message):
            apply_hidden(model, plan)
    with pytest.raises(ValueError, match="layer_indices does not apply"):
        prune_model(model, pruning_type="HIDDEN", layer_indices=[0])
    with pytest.raises(ValueError, match="not available for HIDDEN"):
        prune_model(model, pruning_type="HIDDEN", reconstruct=True, sequential=True, dataloader=[_batch()])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedModelError, match="RMSNorm families .*llama.*gemma2.*gpt2 uses LayerNorm"):
        plan_hidden(make_tiny_model("gpt2"), keep=32)


def test_cli_prunes_the_hidden_dimension(tmp_path, capsys):
    from optipfair_train.cli import main

    source = tmp_path / "source"
    make_tiny_model("llama-tied").save_pretrained(source)
    make_char_tokenizer().save_pretrained(source)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(20)))
    args = ["prune", "--model-path", str(source), "--calibration-data", str(text), "--no-progress"]
    args += ["--calibration-seq-len", "32", "--pruning-type", "HIDDEN", "--pruning-percentage", "25"]
    assert main([*args, "--output-path", str(tmp_path / "out")]) == 0
    assert "Pruned parameters" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.hidden_size == 48 and model.model.norm.weight.shape == (48,)
    assert model.config.pruning_history[-1]["method"] == "activation"


def test_hidden_then_per_layer_widths_and_heads_reload_with_load_pruned_model(tmp_path, calibration_batches):
    model = make_tiny_model("qwen2")
    prune_model(model, pruning_type="HIDDEN", pruning_percentage=25, dataloader=calibration_batches)
    prune_model(model, pruning_percentage=30, layer_allocation="global", dataloader=calibration_batches)
    prune_model(
        model,
        pruning_type="ATTENTION",
        pruning_percentage=50,
        layer_indices=[1],
        dataloader=calibration_batches,
    )
    assert model.config.hidden_size == 48 and len(set(get_adapter(model).intermediate_sizes())) > 1
    batch = _batch()
    save_pruned_model(model, tmp_path)
    reloaded = load_pruned_model(tmp_path)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)
    assert [e["pruning_type"] for e in reloaded.config.pruning_history] == ["HIDDEN", "MLP_GLU", "ATTENTION"]
