"""Activation capture: keys and shapes per family, selection, mask-aware streaming, hook removal."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, PLAIN_FAMILY_NAMES, make_tiny_model

from optipfair_train.bias import (
    ALL_COMPONENTS,
    NeuronStats,
    available_layer_keys,
    capture_activations,
    encode_texts,
    select_layer_keys,
    store_activations,
)

TEXTS = ["The white man walked home.", "The Asian woman walked home slowly."]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops on an oversubscribed 2-core machine are far faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILY_NAMES + PLAIN_FAMILY_NAMES)
def test_capture_keys_and_shapes_per_family(family, tokenizer):
    tiny_model = make_tiny_model(family)
    keys = available_layer_keys(tiny_model, ALL_COMPONENTS)
    glu = family in FAMILY_NAMES
    assert len(keys) == (len(ALL_COMPONENTS) - (not glu)) * 4
    assert any(k.startswith("gate_proj") for k in keys) == glu
    batch = encode_texts(tokenizer, TEXTS)
    masks = {}
    with capture_activations(tiny_model, keys, lambda k, x, m: masks.__setitem__(k, m)), torch.no_grad():
        tiny_model(**batch.model_inputs())
    assert set(masks) == set(keys) and all(torch.equal(m, batch.attention_mask) for m in masks.values())

    acts = store_activations(tiny_model, batch.model_inputs(), keys)
    seq = batch.input_ids.shape[1]
    for key in keys:
        wide = key.startswith(("gate_proj", "up_proj", "down_proj_input"))
        assert acts[key].shape == (2, seq, 128 if wide else 64), key
        assert torch.isfinite(acts[key]).all()
    # Right padding leaves the shorter text's activations unchanged.
    alone = store_activations(tiny_model, encode_texts(tokenizer, TEXTS[:1]).model_inputs(), keys)
    n = len(batch.token_ids[0])
    for key in keys:
        torch.testing.assert_close(acts[key][:1, :n], alone[key], atol=1e-4, rtol=1e-4)


def test_layer_selection_and_clear_errors(tokenizer):
    model = make_tiny_model("llama")
    assert select_layer_keys(model, "first_middle_last", "mlp_output") == [
        "mlp_output_layer_0",
        "mlp_output_layer_2",
        "mlp_output_layer_3",
    ]
    assert select_layer_keys(model, [1], ["gate_proj", "up_proj"]) == ["gate_proj_layer_1", "up_proj_layer_1"]
    assert len(select_layer_keys(model, "all")) == 6 * 4
    with pytest.raises(ValueError, match="out of range"):
        select_layer_keys(model, [4])
    with pytest.raises(ValueError, match="Unknown component"):
        select_layer_keys(model, "all", "mlp")
    with pytest.raises(KeyError, match="Available keys: .*mlp_output_layer_3"):
        with capture_activations(model, ["mlp_output_layer_9"], lambda *a: None):
            pass


def test_hooks_removed_after_an_exception(tokenizer):
    model = make_tiny_model("qwen2")
    before = _hook_count(model)
    keys = available_layer_keys(model, ALL_COMPONENTS)
    batch = encode_texts(tokenizer, TEXTS)

    def failing_reducer(key, x, mask):
        raise RuntimeError("reducer failed")

    with pytest.raises(RuntimeError, match="reducer failed"):
        with capture_activations(model, keys, failing_reducer), torch.no_grad():
            model(**batch.model_inputs())
    assert _hook_count(model) == before

    with pytest.raises(ValueError, match="in the block"):
        with capture_activations(model, keys, lambda *a: None):
            assert _hook_count(model) == before + len(keys) + 1
            raise ValueError("in the block")
    assert _hook_count(model) == before


def test_streaming_neuron_stats_ignore_padding(tokenizer):
    model = make_tiny_model("mistral")
    key = "down_proj_input_layer_1"
    batch = encode_texts(tokenizer, TEXTS)
    stats = NeuronStats(num_groups=2)
    with capture_activations(model, [key], stats), torch.no_grad():
        stats.group_ids = torch.tensor([0, 1])
        model(**batch.model_inputs())
    for g, text in enumerate(TEXTS):
        alone = store_activations(model, encode_texts(tokenizer, [text]).model_inputs(), [key])[key][0]
        assert stats.count[key][g] == alone.shape[0]
        torch.testing.assert_close(stats.mean(key)[g], alone.mean(0), atol=1e-4, rtol=1e-4)


def test_capture_through_a_lora_wrapper_sees_the_lora_output(tokenizer):
    from peft import LoraConfig, get_peft_model

    from optipfair_train.arch import get_adapter

    model = get_peft_model(
        make_tiny_model("llama"), LoraConfig(r=4, target_modules=["up_proj"], init_lora_weights=False)
    )
    wrapper = get_adapter(model).mlp(0).up  # the LoRA layer around the base Linear
    seen = {}
    handle = wrapper.register_forward_hook(
        lambda mod, args, out: seen.update(out=out, base=mod.base_layer(args[0]))
    )
    batch = encode_texts(tokenizer, TEXTS)
    got = {}
    try:
        with capture_activations(model, ["up_proj_layer_0"], lambda k, x, m: got.update(x=x, m=m)):
            with torch.no_grad():
                model(**batch.model_inputs())
    finally:
        handle.remove()
    torch.testing.assert_close(got["x"], seen["out"])  # includes the LoRA delta...
    assert not torch.allclose(got["x"], seen["base"], atol=1e-3)  # ...which is not zero here
    assert torch.equal(got["m"], batch.attention_mask)
