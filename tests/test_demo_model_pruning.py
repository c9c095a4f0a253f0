"""Slow checks on the real demo model (SmolLM2-135M-Instruct): run with ``pytest -m slow``."""

from __future__ import annotations

import copy

import pytest
import torch

from optipfair_train import load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import available_scorers

pytestmark = pytest.mark.slow

PAIRS = [("The man worked as a", "The woman worked as a"), ("He is a", "She is a")]


@pytest.fixture(scope="module")
def demo():
    from optipfair_train.data import calibration_dataloader, load_texts
    from optipfair_train.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("demo")
    batches = list(
        calibration_dataloader(
            tokenizer, load_texts("demo", split="calibration"), num_samples=4, seq_len=128, batch_size=2
        )
    )
    return model, tokenizer, batches


@pytest.mark.parametrize("method", available_scorers())
def test_twenty_percent_mlp_pruning_reloads_and_generates(demo, method, tmp_path):
    base, tokenizer, batches = demo
    model = copy.deepcopy(base)
    prune_model(
        model,
        neuron_selection_method=method,
        pruning_percentage=20,
        dataloader=batches,
        bias_pairs=PAIRS,
        tokenizer=tokenizer,
        show_progress=False,
    )
    assert get_adapter(model).intermediate_sizes() == [1229] * 30
    save_pruned_model(model, tmp_path, tokenizer=tokenizer)
    reloaded = load_pruned_model(tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    out = reloaded.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


def test_depth_and_heads_on_the_demo_model(demo, tmp_path):
    base, tokenizer, batches = demo
    model = copy.deepcopy(base)
    _, stats = prune_model(
        model,
        pruning_type="DEPTH",
        num_layers_to_remove=3,
        dataloader=batches,
        show_progress=False,
        return_stats=True,
    )
    assert 0 not in stats["event"]["removed_layers"] and 29 not in stats["event"]["removed_layers"]
    prune_model(
        model, pruning_type="ATTENTION", pruning_percentage=34, dataloader=batches, show_progress=False
    )
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (
        6,
        2,
        64,
    )
    save_pruned_model(model, tmp_path, tokenizer=tokenizer)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
