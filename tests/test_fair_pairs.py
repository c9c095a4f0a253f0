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
from optipfair_train.heal import add_lora
from optipfair_train.heal.fair_loss import ItemCycle, fairness_gradients, fairness_loss
from optipfair_train.heal.fair_pairs import (
    TargetSwap,
    aligned_positions,
    anchor_for,
    invariance_losses,
    replace_target,
)


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


def _softmax(v: list[float]) -> list[float]:
    top = max(v)
    e = [math.exp(x - top) for x in v]
    return [x / sum(e) for x in e]


def _hand_anchored(
    model_rows: tuple[list[float], list[float]], anchor_rows: tuple[list[float], list[float]]
) -> float:
    """(KL(r || p) + KL(r || q)) / 2 with r the mean of the anchor's two distributions, in plain floats."""
    r = [(x + y) / 2 for x, y in zip(*(_softmax(a) for a in anchor_rows), strict=True)]
    return sum(
        0.5 * sum(t * (math.log(t) - math.log(m)) for t, m in zip(r, _softmax(rows), strict=True))
        for rows in model_rows
    )


def _ids(tokenizer, text):
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_invariance_loss_equals_a_hand_computed_value(tokenizer):
    model, reference = Bigram(len(tokenizer), seed=0), Bigram(len(tokenizer), seed=1)
    table, ref = model.table.tolist(), reference.table.tolist()
    groups = [[("he ran", "her ran"), ("his cat", "her cat")], [], [("a b", "a b")]]
    expected = []
    for group in groups:
        values = []
        for a_text, b_text in group:
            a, b = _ids(tokenizer, a_text), _ids(tokenizer, b_text)
            pos = aligned_positions(a, b)
            if pos:
                terms = [
                    _hand_anchored((table[a[i - 1]], table[b[j - 1]]), (ref[a[i - 1]], ref[b[j - 1]]))
                    for i, j in pos
                ]
                values.append(sum(terms) / len(terms))
        expected.append(sum(values) / len(values) if values else 0.0)
    got = invariance_losses(model, tokenizer, groups, anchor_for(model, reference))
    assert got.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected[0] > 1e-3


def test_zero_only_for_a_model_blind_to_the_swap_that_predicts_the_anchors_average(tokenizer):
    reference = Bigram(len(tokenizer), seed=1)
    b, d = (tokenizer.convert_tokens_to_ids(c) for c in "bd")  # "ab xy" vs "cd xy": b and d precede " "
    with torch.no_grad():
        average = 0.5 * (torch.softmax(reference.table[b], -1) + torch.softmax(reference.table[d], -1))
    pairs = [[("ab xy", "cd xy")]]
    blind = Bigram(len(tokenizer), seed=1)
    with torch.no_grad():
        blind.table[b] = blind.table[d] = average.log()
    assert invariance_losses(blind, tokenizer, pairs, anchor_for(blind, reference)).item() == pytest.approx(
        0, abs=1e-6
    )
    ignores_context = Bigram(len(tokenizer), seed=1)
    with torch.no_grad():  # the same on both sides, but not what the anchor predicted: not a zero
        ignores_context.table[b] = ignores_context.table[d] = 0.0
    loss = invariance_losses(ignores_context, tokenizer, pairs, anchor_for(ignores_context, reference))
    assert loss.item() > 0.01
    same_as_anchor = Bigram(len(tokenizer), seed=1)  # the anchor itself still tells the two apart
    assert (
        invariance_losses(same_as_anchor, tokenizer, pairs, anchor_for(same_as_anchor, reference)).item()
        > 1e-3
    )


def test_the_anchor_is_the_reference_or_a_peft_models_base(tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="pass reference= .* PEFT"):
        anchor_for(model)
    peft = add_lora(make_tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the output
    ids = torch.tensor([[1, 5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), peft.disable_adapter():
        base = peft(input_ids=ids, attention_mask=mask).logits
    adapted = peft(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(anchor_for(peft)(ids, mask), base)


def _frozen(model):
    copy = make_tiny_model("llama")
    copy.load_state_dict(model.state_dict())
    return copy.eval().requires_grad_(False)


def test_gradients_of_shards_add_up_and_match_the_loss(tokenizer):
    model = make_tiny_model("llama")
    anchor = anchor_for(model, _frozen(model))
    with torch.no_grad():  # move away from the anchor so the loss is not at its start value
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = [p for p in model.parameters() if p.requires_grad]
    items, swap = RACE + GENDER, TargetSwap(RACE + GENDER, seed=0)

    def grads(share):
        return fairness_gradients(model, tokenizer, share, params, len(items), "counterfactual",
                                  pairs=swap.pairs(share, 0), anchor=anchor)  # fmt: skip

    full, sums = grads(items)
    shards = [grads(items[r::2]) for r in range(2)]
    for g, a, b in zip(full, shards[0][0], shards[1][0], strict=True):
        torch.testing.assert_close(a + b, g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss = invariance_losses(model.eval(), tokenizer, swap.pairs(items, 0), anchor).sum()
    assert sums[0] == pytest.approx(float(loss), rel=1e-5) and sums[0] > 0
    with pytest.raises(ValueError, match="one group of text pairs per item and an anchor"):
        fairness_gradients(
            model, tokenizer, items, params, len(items), "counterfactual", pairs=swap.pairs(items, 0)
        )


def _trainer(tmp_path, tokenizer, model, callbacks, **args):
    args = training_args(tmp_path, **({"max_steps": 1} | args))
    return Trainer(
        model=model, args=args, train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS), callbacks=callbacks
    )


def test_callback_adds_the_counterfactual_gradient_and_logs_the_loss(tmp_path, tokenizer):
    weight, lr = 3.0, 0.05
    model = make_tiny_model("llama")
    start, plain = _frozen(model), make_tiny_model("llama")
    plain.load_state_dict(model.state_dict())
    callback = FairnessLossCallback(
        GENDER,
        tokenizer,
        weight=weight,
        batch_size=2,
        seed=1,
        objective="counterfactual",
        reference=_frozen(model),
    )
    sgd = dict(optim="sgd", learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = _trainer(tmp_path / "a", tokenizer, model, [callback], **sgd)
    trainer.train()
    _trainer(tmp_path / "b", tokenizer, plain, [], **sgd).train()
    # the manual loss: step 0's items, the starting weights, anchored on the same starting model
    reference = _frozen(start).requires_grad_(True)
    loss = fairness_loss(
        reference, tokenizer, ItemCycle(GENDER, 2, 1).batch(0), "counterfactual", reference=start
    )
    loss.backward()
    # SGD: the two runs differ by lr * weight * the fairness gradient at the starting weights
    for p, q, r in zip(model.parameters(), plain.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p - q, -lr * weight * r.grad, rtol=1e-3, atol=1e-6)
    assert any(r.grad.abs().max() > 1e-4 for r in reference.parameters())
    logged = [e for e in trainer.state.log_history if "fairness_loss" in e]
    assert logged and logged[0]["fairness_loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert "fairness_gap" not in logged[0]  # a preference gap means nothing for this objective


def test_a_full_model_without_a_reference_is_refused_before_the_first_step(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = FairnessLossCallback(GENDER, tokenizer, weight=1.0, objective="counterfactual")
    with pytest.raises(ValueError, match="pass reference="):
        _trainer(tmp_path, tokenizer, model, [callback]).train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_training_with_the_counterfactual_loss_shrinks_it(tmp_path, tokenizer):
    items = RACE[:2] + GENDER
    anchor_model = _frozen(make_tiny_model("llama"))
    start = float(fairness_loss(anchor_model, tokenizer, items, "counterfactual", reference=anchor_model))
    ends = {}
    for weight in (0.0, 50.0):
        model = _frozen(anchor_model).train().requires_grad_(True)
        callback = FairnessLossCallback(
            items, tokenizer, weight=weight, batch_size=4, objective="counterfactual", reference=anchor_model
        )
        _trainer(
            tmp_path / str(weight), tokenizer, model, [callback], max_steps=8, learning_rate=3e-3
        ).train()
        with torch.no_grad():
            ends[weight] = float(
                fairness_loss(model.eval(), tokenizer, items, "counterfactual", reference=anchor_model)
            )
    assert ends[50.0] < 0.5 * start and ends[50.0] < 0.5 * ends[0.0], (start, ends)
