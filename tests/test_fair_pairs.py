"""The counterfactual-invariance fairness objective (heal/fair_pairs.py) and its use by the loss callback."""

from __future__ import annotations

import math

import pytest
import torch
from callbacks_helpers import NEUTRAL_TEXTS, Bigram, TextDataset, training_args
from conftest import make_tiny_model
from transformers import Trainer

from optipfair_train.bias import StereoSetItem
from optipfair_train.callbacks import FairnessLossCallback
from optipfair_train.heal.fair_loss import ItemCycle, fairness_gradients, fairness_loss
from optipfair_train.heal.fair_pairs import TargetSwap, aligned_positions, invariance_losses, replace_target


def _race(target: str, stereo: str, anti: str) -> StereoSetItem:
    return StereoSetItem("intrasentence", target, "race", "x BLANK", stereo, anti, "u")


RACE = [
    _race("Italian", "The Italian cooks.", "The Italian codes."),
    _race("Ethiopian", "An Ethiopian runs.", "An ethiopian sings."),
    _race("Peruvian", "My neighbour is kind.", "My neighbour is rude."),  # target absent: nothing swaps
]
GENDER = [
    StereoSetItem(
        "intrasentence", "mother", "gender", "x", "The mother is kind.", "The mother is cruel.", "u"
    ),
    StereoSetItem("intersentence", "sister", "gender", "My sister came", "She cried.", "She laughed.", "u"),
]


def test_replace_target_swaps_whole_words_in_any_case_and_keeps_the_first_letters_case():
    text = "The chess player won; Chess player fans and chess players-to-be cheered the CHESS PLAYER."
    assert replace_target(text, "chess player", "nurse") == (
        "The nurse won; Nurse fans and chess players-to-be cheered the Nurse."
    )
    assert (
        replace_target("Italians like Italian food", "Italian", "peruvian") == "Italians like Peruvian food"
    )


def test_pairs_swap_gender_exchange_other_targets_and_skip_what_does_not_change():
    swap = TargetSwap(RACE + GENDER, seed=0)
    groups = swap.pairs(RACE + GENDER, step=0)
    italian, ethiopian, absent, mother, sister = groups
    partner = italian[0][1].split()[1]
    assert partner in {"Ethiopian", "Peruvian"}  # another race target of the build items, never itself
    assert italian == [
        ("The Italian cooks.", f"The {partner} cooks."),
        ("The Italian codes.", f"The {partner} codes."),
    ]
    assert all(b.split()[1].lower() != "ethiopian" for _, b in ethiopian) and len(ethiopian) == 2
    assert absent == []
    assert mother == [
        ("The mother is kind.", "The father is kind."),
        ("The mother is cruel.", "The father is cruel."),
    ]
    assert sister == [("My sister came. She cried.", "My brother came. He cried."),
                      ("My sister came. She laughed.", "My brother came. He laughed.")]  # fmt: skip


def test_partners_are_a_function_of_seed_step_and_item():
    items = [
        _race(t, f"The {t} ate.", f"The {t} slept.")
        for t in ("Italian", "Ethiopian", "Peruvian", "Greek", "Thai")
    ]
    swap = TargetSwap(items, seed=0)
    assert TargetSwap(items, seed=0).pairs(items, step=3) == swap.pairs(items, step=3)  # a resumed run
    draws = {tuple(p[0][1] for p in swap.pairs(items, step=s)) for s in range(6)}
    assert len(draws) > 1  # partners change with the step
    assert swap.pairs(items[1:3], step=3) == swap.pairs(items, step=3)[1:3]  # a rank's share draws the same


def test_aligned_positions_are_the_common_tokens_after_the_first_difference():
    assert aligned_positions([1, 5, 7, 8, 9], [1, 6, 6, 7, 8, 9]) == [(2, 3), (3, 4), (4, 5)]
    assert aligned_positions([1, 2, 3, 4], [1, 2, 9, 4]) == [(3, 3)]
    assert aligned_positions([1, 2, 3], [1, 2, 3]) == []  # equal texts: nothing to compare


def _hand_symmetric_kl(rows: list[float], other: list[float]) -> float:
    def log_softmax(v):
        top = max(v)
        z = top + math.log(sum(math.exp(x - top) for x in v))
        return [x - z for x in v]

    p, q = log_softmax(rows), log_softmax(other)
    return 0.5 * sum(math.exp(a) * (a - b) + math.exp(b) * (b - a) for a, b in zip(p, q, strict=True))


def _ids(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_invariance_loss_equals_a_hand_computed_value(tokenizer):
    model = Bigram(len(tokenizer))
    table = model.table.tolist()
    groups = [[("he ran", "she ran"), ("his cat", "her cat")], [], [("a b", "a b")]]
    expected = []
    for group in groups:
        values = []
        for a_text, b_text in group:
            a, b = _ids(tokenizer, a_text), _ids(tokenizer, b_text)
            pos = aligned_positions(a, b)
            if pos:
                values.append(
                    sum(_hand_symmetric_kl(table[a[i - 1]], table[b[j - 1]]) for i, j in pos) / len(pos)
                )
        expected.append(sum(values) / len(values) if values else 0.0)
    got = invariance_losses(model, tokenizer, groups)
    assert got.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected[0] > 1e-3  # the bigram's rows after "e" and "r" differ: a real divergence


def test_a_model_that_ignores_the_swapped_word_has_zero_loss(tokenizer):
    model = Bigram(len(tokenizer))
    with torch.no_grad():  # "e" and "r" (the last letters of "he"/"she" vs "her") predict alike
        model.table[tokenizer.convert_tokens_to_ids("r")] = model.table[tokenizer.convert_tokens_to_ids("e")]
    assert invariance_losses(model, tokenizer, [[("he ran", "her ran")]]).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_gradients_of_shards_add_up_and_match_the_loss(tokenizer):
    model = make_tiny_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    items, swap = RACE + GENDER, TargetSwap(RACE + GENDER, seed=0)
    full, sums = fairness_gradients(
        model, tokenizer, items, params, len(items), "counterfactual", pairs=swap.pairs(items, 0)
    )
    shards = [
        fairness_gradients(model, tokenizer, items[r::2], params, len(items), "counterfactual",
                           pairs=swap.pairs(items[r::2], 0))
        for r in range(2)
    ]  # fmt: skip
    for g, a, b in zip(full, shards[0][0], shards[1][0], strict=True):
        torch.testing.assert_close(a + b, g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss = fairness_loss(model.eval(), tokenizer, items, objective="counterfactual")
    assert sums[0] / len(items) == pytest.approx(float(loss), rel=1e-5) and sums[0] > 0
    with pytest.raises(ValueError, match="one group of text pairs per item"):
        fairness_gradients(model, tokenizer, items, params, len(items), "counterfactual")


def test_callback_adds_the_counterfactual_gradient_and_logs_the_loss(tmp_path, tokenizer):
    weight = 3.0
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    reference.load_state_dict(model.state_dict())
    callback = FairnessLossCallback(
        GENDER, tokenizer, weight=weight, batch_size=2, seed=1, objective="counterfactual"
    )
    args = training_args(tmp_path / "run", max_steps=1, optim="sgd", learning_rate=0.05,
                         lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
    plain = make_tiny_model("llama")
    plain.load_state_dict(model.state_dict())
    trainers = [
        Trainer(model=m, args=args, train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS), callbacks=cbs)
        for m, cbs in ((model, [callback]), (plain, []))
    ]
    for trainer in trainers:
        trainer.train()
    reference.eval()
    loss = fairness_loss(reference, tokenizer, ItemCycle(GENDER, 2, 1).batch(0), "counterfactual")
    loss.backward()
    # SGD: the two runs differ by lr * weight * the fairness gradient at the starting weights
    for p, q, r in zip(model.parameters(), plain.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p - q, -0.05 * weight * r.grad, rtol=1e-3, atol=1e-6)
    assert any(r.grad.abs().max() > 1e-4 for r in reference.parameters())
    logged = [e for e in trainers[0].state.log_history if "fairness_loss" in e]
    assert logged and logged[0]["fairness_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert "fairness_gap" not in logged[0]  # a preference gap means nothing for this objective


def test_training_with_the_counterfactual_loss_shrinks_it(tmp_path, tokenizer):
    items = RACE[:2] + GENDER
    start = float(fairness_loss(make_tiny_model("llama").eval(), tokenizer, items, "counterfactual"))
    ends = {}
    for weight in (0.0, 50.0):
        model = make_tiny_model("llama")
        callback = FairnessLossCallback(
            items, tokenizer, weight=weight, batch_size=4, objective="counterfactual"
        )
        args = training_args(tmp_path / str(weight), max_steps=8, learning_rate=3e-3)
        Trainer(
            model=model, args=args, train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS), callbacks=[callback]
        ).train()
        with torch.no_grad():
            ends[weight] = float(fairness_loss(model.eval(), tokenizer, items, "counterfactual"))
    assert ends[50.0] < 0.5 * start and ends[50.0] < 0.5 * ends[0.0], (start, ends)
