"""The rotated basis of the hidden axis (pruning/hidden_rotation.py, method 'pca')."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model
from test_hidden import CASES, DROP, _batch, _logits, _zeroed_model
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import save_pruned_model
from optipfair_train.pruning.hidden import HiddenPlan, apply_hidden, plan_hidden
from optipfair_train.pruning.hidden_rotation import rotate_stream

UNTIED = ["llama", "llama-biases", "mistral", "qwen2", "qwen3", "gemma-untied"]


def _random_rotation(d: int = 64, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q


@pytest.mark.parametrize("case", UNTIED)
def test_a_rotation_folded_into_the_weights_keeps_logits(case):
    family, overrides = CASES[case]
    model = make_tiny_model(family, **overrides)
    with torch.no_grad():  # non-trivial norm scales, so the folding matters
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(0.5 if "gemma" in case else 1.0, 0.3)
    batch = _batch()
    before = _logits(model, batch)
    rotate_stream(get_adapter(model), _random_rotation())
    torch.testing.assert_close(_logits(model, batch), before, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-biases", "qwen3", "gemma-untied"])
def test_pca_finds_a_hidden_subspace_and_cuts_it_exactly(case, tmp_path):
    # channels DROP are zero, then a random rotation spreads the stream over all 64 coordinates: no channel is
    # removable any more, but the stream spans 56 directions, which the principal components recover
    model = _zeroed_model(case)
    rotate_stream(get_adapter(model), _random_rotation())
    batch = _batch()
    before = _logits(model, batch)
    assert (model.get_input_embeddings().weight[:, DROP].abs() > 1e-3).any()
    plan = plan_hidden(model, keep=56, method="pca", batches=[batch])
    assert plan.scores[56:].abs().max() < 1e-8 * plan.scores[0]  # eight directions carry nothing
    apply_hidden(model, plan)
    torch.testing.assert_close(_logits(model, batch), before, atol=1e-4, rtol=1e-5)
    save_pruned_model(model, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(plain, batch), _logits(model, batch), atol=1e-6, rtol=1e-6)


def test_pca_through_prune_model_records_the_rotation():
    model = make_tiny_model("llama")
    _, stats = prune_model(
        model,
        pruning_type="HIDDEN",
        pruning_percentage=25,
        neuron_selection_method="pca",
        dataloader=[_batch()],
        return_stats=True,
    )
    assert model.config.hidden_size == 48
    assert stats["event"]["method"] == "pca" and stats["event"]["rotated"] is True


def test_rotation_is_refused_where_it_cannot_be_exact_before_any_change():
    batch = [_batch()]
    cases = [
        (make_tiny_model("llama-tied"), {}, "untied LM head"),
        (make_tiny_model("gemma2", tie_word_embeddings=False), {}, "post-norms"),
    ]
    lora = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    cases.append((lora, {}, "merge LoRA"))
    for model, kwargs, message in cases:
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=message):
            plan_hidden(model, keep=48, method="pca", batches=batch, **kwargs)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model = make_tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    plan = plan_hidden(model, keep=48, method="pca", batches=batch)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer state cannot be carried over"):
        apply_hidden(model, plan, optimizer=optimizer)
    with pytest.raises(ValueError, match="orthogonal"):
        apply_hidden(model, HiddenPlan(torch.arange(48), 64, rotation=2 * torch.eye(64)))
    with pytest.raises(ValueError, match="not available with method 'pca'"):
        prune_model(
            model, pruning_type="HIDDEN", neuron_selection_method="pca", dataloader=batch, reconstruct=True
        )
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
