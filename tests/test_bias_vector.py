"""The bias vector (bias/bias_vector.py, callbacks/bias_vector.py): its estimate, its removal, its checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from callbacks_helpers import NEUTRAL_TEXTS, TextDataset, training_args
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM, Trainer

from optipfair_train.bias import StereoSetItem, fit_bias_vector, subtract_bias_vector
from optipfair_train.bias.bias_vector import check_bias_vector_settings, debias_with_bias_vector
from optipfair_train.callbacks import BiasVectorCallback
from optipfair_train.heal import add_lora
from optipfair_train.heal.fair_loss import preference_gaps

ITEMS = [
    StereoSetItem(
        "intrasentence",
        "nurse",
        "gender",
        "The nurse is BLANK.",
        "The nurse is kind.",
        "The nurse is rude.",
        "Blue.",
    ),
    StereoSetItem(
        "intrasentence",
        "cook",
        "profession",
        "A cook is BLANK.",
        "A cook is fat.",
        "A cook is thin.",
        "A sky.",
    ),
    StereoSetItem(
        "intersentence", "sister", "gender", "My sister came", "She cried.", "She laughed.", "Rocks fly."
    ),
]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _nll_gradients(model, tokenizer, option: int) -> dict[str, torch.Tensor]:
    """Gradient of the mean over ITEMS of the option sentence's mean token NLL, computed independently of
    the module (full log-softmax over every position, the option's tokens picked by hand)."""
    m = copy.deepcopy(model)
    losses = []
    for item in ITEMS:
        sentence = item.option(("stereotype", "anti-stereotype")[option])
        if item.task == "intrasentence":
            prefix, text = [tokenizer.bos_token_id], sentence
        else:
            prefix = [tokenizer.bos_token_id] + tokenizer(item.context + ".", add_special_tokens=False)[
                "input_ids"
            ]
            text = " " + sentence
        option_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + option_ids])
        logp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), dim=-1)
        picked = logp[torch.arange(len(prefix) - 1, ids.shape[1] - 1), torch.tensor(option_ids)]
        losses.append(-picked.mean())
    torch.stack(losses).mean().backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_vector_is_the_difference_of_the_two_fine_tunes_first_adam_step(tokenizer):
    model = make_tiny_model("llama")
    before = _params(model)
    lr = 1e-3
    vector = fit_bias_vector(model, tokenizer, ITEMS, epochs=1, learning_rate=lr, batch_size=len(ITEMS))
    assert all(
        torch.equal(p, before[n]) for n, p in model.named_parameters()
    )  # the model itself is untouched
    assert set(vector) == {n for n, _ in model.named_parameters()}
    # One AdamW step from zero state, no weight decay: the change is -lr * g / (|g| + eps).
    step = {
        o: {n: -lr * g / (g.abs() + 1e-8) for n, g in _nll_gradients(model, tokenizer, o).items()}
        for o in (0, 1)
    }
    for name, v in vector.items():
        torch.testing.assert_close(
            v, step[0][name] - step[1][name], rtol=0, atol=1e-5
        )  # |g| near eps: 1% of a step
    assert max(float(v.abs().max()) for v in vector.values()) > 1.5 * lr  # the options disagree somewhere


def test_subtracting_the_vector_lowers_the_stereotype_preference_on_its_items(tokenizer):
    model = make_tiny_model("llama")
    with torch.no_grad():
        gap_before = float(preference_gaps(model, tokenizer, ITEMS).mean())
    vector = fit_bias_vector(model, tokenizer, ITEMS, epochs=3, learning_rate=1e-3, batch_size=2)
    subtract_bias_vector(model, vector, strength=1.0)
    with torch.no_grad():
        gap_after = float(preference_gaps(model, tokenizer, ITEMS).mean())
    assert gap_after < gap_before - 0.05, (gap_before, gap_after)


def test_subtract_is_exact_records_itself_and_reloads(tmp_path, tokenizer):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _params(model)
    torch.manual_seed(1)
    vector = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    subtract_bias_vector(model, vector, strength=0.25)
    for name, p in model.named_parameters():  # tied weights are one parameter: changed once, not twice
        torch.testing.assert_close(p.detach(), before[name] - 0.25 * vector[name])
    assert model.config.debias_history[-1] == {"method": "bias_vector", "strength": 0.25}
    ids = torch.tensor([tokenizer("The nurse is kind.")["input_ids"]])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert reloaded.config.debias_history[-1]["method"] == "bias_vector"


@pytest.mark.parametrize("strength", [0, -0.5, 8.5, math.nan, True, "1"])
def test_bad_strength_is_refused_before_any_weight_changes(strength, tokenizer):
    model = make_tiny_model("llama")
    before = _params(model)
    vector = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 8\]"):
        subtract_bias_vector(model, vector, strength)
    with pytest.raises(ValueError, match="strength"):
        debias_with_bias_vector(model, tokenizer, ITEMS, strength)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 0}, "batch size must be an integer >= 1"),
        ({"learning_rate": 0.0}, "learning rate must be a positive number"),
        ({"learning_rate": math.inf}, "learning rate must be a positive number"),
    ],
)
def test_bad_fit_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        check_bias_vector_settings(make_tiny_model("llama"), 0.5, **settings)


def test_no_items_and_adapters_are_refused(tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="needs StereoSet build items; none were given"):
        fit_bias_vector(model, tokenizer, [])
    peft_model = add_lora(copy.deepcopy(model), r=2, alpha=4)
    with pytest.raises(ValueError, match="merge them first"):
        fit_bias_vector(peft_model, tokenizer, ITEMS)


def test_a_vector_of_another_model_is_refused_before_any_weight_changes():
    model = make_tiny_model("llama")
    before = _params(model)
    vector = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    first = next(iter(vector))
    wrong_shape = {**vector, first: torch.ones(3)}
    with pytest.raises(ValueError, match=f"{first} has shape"):
        subtract_bias_vector(model, wrong_shape, 0.5)
    missing = {n: v for n, v in vector.items() if n != first}
    with pytest.raises(ValueError, match="does not match this model's parameters"):
        subtract_bias_vector(model, missing, 0.5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _trained(tokenizer, tmp_path, callbacks, model=None):
    model = model if model is not None else make_tiny_model("llama")
    data = TextDataset(tokenizer, NEUTRAL_TEXTS, length=24)
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data, callbacks=callbacks
    )
    trainer.train()
    return trainer.model


def test_the_callback_subtracts_the_trained_models_vector_when_training_ends(tokenizer, tmp_path):
    plain = _trained(tokenizer, tmp_path / "plain", [])
    callback = BiasVectorCallback(
        ITEMS, tokenizer, strength=0.5, epochs=1, learning_rate=1e-3, batch_size=2, seed=3
    )
    debiased = _trained(tokenizer, tmp_path / "mode", [callback])
    expected = copy.deepcopy(plain)
    subtract_bias_vector(
        expected,
        fit_bias_vector(plain, tokenizer, ITEMS, epochs=1, learning_rate=1e-3, batch_size=2, seed=3),
        0.5,
    )
    got = dict(debiased.named_parameters())
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)
    assert debiased.config.debias_history[-1] == {"method": "bias_vector", "strength": 0.5}


def test_the_callback_refuses_adapters_and_bad_settings_before_the_first_step(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="none were given"):
        BiasVectorCallback([], tokenizer, strength=0.5)
    peft_model = add_lora(make_tiny_model("llama"), r=2, alpha=4)
    before = _params(peft_model)
    with pytest.raises(ValueError, match="merge them first"):
        _trained(
            tokenizer, tmp_path / "peft", [BiasVectorCallback(ITEMS, tokenizer, strength=0.5)], peft_model
        )
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())
    with pytest.raises(ValueError, match="strength must be a number"):
        _trained(tokenizer, tmp_path / "strength", [BiasVectorCallback(ITEMS, tokenizer, strength=-1.0)])
