"""The healing-time fairness loss (heal/fair_loss.py) and FairnessLossCallback (callbacks/fairness_loss.py)."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from callbacks_helpers import NEUTRAL_TEXTS, Bigram, TextDataset, training_args
from conftest import make_tiny_model
from transformers import Trainer, TrainerCallback

from optipfair_train.bias import StereoSetItem
from optipfair_train.callbacks import FairnessLossCallback
from optipfair_train.heal.fair_loss import (
    ItemCycle,
    check_fairness_loss_settings,
    fairness_gradients,
    fairness_loss,
    preference_gaps,
)


def _item(
    target: str, stereo: str, anti: str, task: str = "intrasentence", context: str = ""
) -> StereoSetItem:
    context = context or f"The {target} is BLANK."
    return StereoSetItem(task, target, "gender", context, stereo, anti, f"The {target} is blue.")


ITEMS = [
    _item("nurse", "The nurse is she.", "The nurse is he."),
    _item("engineer", "The engineer is he.", "The engineer is she."),
    _item("cook", "The cook was a woman.", "The cook was a man."),
    _item("boss", "He leads.", "She leads.", task="intersentence", context="The boss spoke"),
    _item("pilot", "The pilot is male.", "The pilot is female."),
    _item("teacher", "The teacher is she.", "The teacher is he."),
]


def _hand_mean_log_prob(table: torch.Tensor, ids: list[int], first_scored: int) -> float:
    """Mean over scored tokens of log softmax(table[previous])[token], in plain Python floats."""
    rows = table.tolist()
    values = []
    for t in range(first_scored, len(ids)):
        row = rows[ids[t - 1]]
        top = max(row)
        values.append(row[ids[t]] - (top + math.log(sum(math.exp(v - top) for v in row))))
    return sum(values) / len(values)


def _char_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(c) for c in text]


def test_loss_equals_a_hand_computed_value(tokenizer):
    model = Bigram(len(tokenizer))
    bos = tokenizer.bos_token_id
    gaps = []
    for item in ITEMS:
        if item.task == "intrasentence":  # BOS + the whole sentence, every sentence token scored
            means = [
                _hand_mean_log_prob(model.table, [bos, *_char_ids(tokenizer, s)], 1)
                for s in item.options()[:2]
            ]
        else:  # BOS + context with a final "." + " " + option: only the option's tokens scored
            head = [bos, *_char_ids(tokenizer, item.context + ".")]
            means = [
                _hand_mean_log_prob(model.table, head + _char_ids(tokenizer, " " + s), len(head))
                for s in item.options()[:2]
            ]
        gaps.append(means[0] - means[1])
    expected = sum(g * g for g in gaps) / len(gaps)
    d = preference_gaps(model, tokenizer, ITEMS)
    assert d.tolist() == pytest.approx(gaps, abs=1e-6)  # the model computes in float32
    assert fairness_loss(model, tokenizer, ITEMS).item() == pytest.approx(expected, rel=1e-4)
    mean = sum(gaps) / len(gaps)
    assert fairness_loss(model, tokenizer, ITEMS, objective="mean").item() == pytest.approx(mean**2, rel=1e-4)
    assert min(abs(g) for g in gaps) > 1e-3  # the items are not trivially indifferent


def test_shards_of_a_batch_add_up_to_the_batch_gradient(tokenizer):
    """What each DDP rank computes on its share (items rank::world) sums to the whole batch's gradient."""
    model = make_tiny_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    for objective in ("items", "mean"):
        full, (squares, gaps, signed) = fairness_gradients(
            model, tokenizer, ITEMS, params, len(ITEMS), objective
        )
        shards = [
            fairness_gradients(model, tokenizer, ITEMS[r::2], params, len(ITEMS), objective) for r in range(2)
        ]
        for g, a, b in zip(full, shards[0][0], shards[1][0], strict=True):
            torch.testing.assert_close(a + b, g, rtol=1e-5, atol=1e-7)
        summed = [x + y for x, y in zip(shards[0][1], shards[1][1], strict=True)]
        assert summed == pytest.approx([squares, gaps, signed])
    with torch.no_grad():
        d = preference_gaps(model.eval(), tokenizer, ITEMS)
    assert squares == pytest.approx(float(d.pow(2).sum())) and gaps == pytest.approx(float(d.abs().sum()))
    assert signed == pytest.approx(float(d.sum()))


def test_item_cycle_is_a_function_of_the_step_and_covers_every_item_each_pass():
    cycle = ItemCycle(list(range(10)), batch_size=4, seed=3)
    stream = [x for step in range(5) for x in cycle.batch(step)]  # 20 positions: two passes
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each pass
    fresh = ItemCycle(list(range(10)), batch_size=4, seed=3)
    assert fresh.batch(3) == cycle.batch(3)  # a resumed run at step 3 draws the same items
    assert ItemCycle(list(range(10)), batch_size=4, seed=4).batch(0) != cycle.batch(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight=-1.0), "weight must be a finite number >= 0"),
        (dict(weight=float("nan")), "weight must be a finite number >= 0"),
        (dict(weight=float("inf")), "weight must be a finite number >= 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(items=[]), "needs StereoSet items"),
        (dict(items=["The nurse is she."]), "must be StereoSetItem objects"),
        (dict(objective="sum"), "objective must be one of items, mean, counterfactual, got 'sum'"),
    ],
)
def test_bad_settings_are_refused_before_training(tokenizer, kwargs, message):
    settings = dict(items=ITEMS, weight=1.0, batch_size=2, objective="items") | kwargs
    with pytest.raises(ValueError, match=message):
        FairnessLossCallback(settings.pop("items"), tokenizer, **settings)
    with pytest.raises(ValueError, match=message):
        check_fairness_loss_settings(**(settings | {"items": kwargs.get("items", ITEMS)}))


class _GradSpy(TrainerCallback):
    """Records the trainable parameters' .grad (and values) when its hook runs."""

    def __init__(self):
        self.grads, self.params = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        self.params.append([p.detach().clone() for p in model.parameters() if p.requires_grad])

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after = [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _trainer(tmp_path, tokenizer, model, callbacks, **args):
    args = training_args(tmp_path / "run", **({"max_steps": 1} | args))
    return Trainer(
        model=model,
        args=args,
        train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS),
        callbacks=callbacks,
    )


@pytest.mark.parametrize("objective", ["items", "mean"])
def test_callback_adds_weight_times_the_loss_gradient_and_the_optimizer_uses_it(
    tmp_path, tokenizer, objective
):
    weight, lr = 2.5, 0.05
    model = make_tiny_model("llama")
    before, after = _GradSpy(), _GradSpy()
    callback = FairnessLossCallback(
        ITEMS, tokenizer, weight=weight, batch_size=4, seed=1, objective=objective
    )
    trainer = _trainer(
        tmp_path, tokenizer, model, [before, callback, after],
        optim="sgd", learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0,
    )  # fmt: skip
    reference = copy.deepcopy(model)
    trainer.train()
    # the manual computation: the loss on step 0's items, on the weights the step started from
    with torch.no_grad():
        for p, value in zip(reference.parameters(), before.params[0], strict=True):
            p.copy_(value)
    reference.eval()
    fairness_loss(reference, tokenizer, ItemCycle(ITEMS, 4, 1).batch(0), objective).backward()
    manual = [p.grad for p in reference.parameters()]
    for g0, g1, m in zip(before.grads[0], after.grads[0], manual, strict=True):
        torch.testing.assert_close(g1 - g0, weight * m, rtol=1e-4, atol=1e-6)
    assert any(m.abs().max() > 1e-4 for m in manual)  # the fairness gradient is not trivially zero
    for p0, g1, p1 in zip(before.params[0], after.grads[0], after.after, strict=True):  # SGD: p - lr * grad
        torch.testing.assert_close(p1, p0 - lr * g1, rtol=1e-5, atol=1e-7)
    logged = [entry for entry in trainer.state.log_history if "fairness_loss" in entry]
    with torch.no_grad():
        d = preference_gaps(reference, tokenizer, ItemCycle(ITEMS, 4, 1).batch(0))
    loss = d.pow(2).mean() if objective == "items" else d.mean().pow(2)
    assert logged and logged[0]["fairness_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert logged[0]["fairness_gap"] == pytest.approx(float(d.abs().mean()), rel=1e-4)
    assert logged[0]["fairness_mean_gap"] == pytest.approx(float(d.mean()), rel=1e-4)


def _mean_gap(model, tokenizer) -> float:
    with torch.no_grad():
        return float(preference_gaps(model.eval(), tokenizer, ITEMS).abs().mean())


def test_training_with_the_loss_shrinks_the_preference_gaps(tmp_path, tokenizer):
    start = _mean_gap(make_tiny_model("llama"), tokenizer)
    ends = {}
    for weight in (0.0, 20.0):
        model = make_tiny_model("llama")
        callback = FairnessLossCallback(ITEMS, tokenizer, weight=weight, batch_size=6)
        _trainer(
            tmp_path / str(weight), tokenizer, model, [callback], max_steps=8, learning_rate=3e-3
        ).train()
        ends[weight] = _mean_gap(model, tokenizer)
    assert ends[20.0] < 0.5 * start, (start, ends)
    assert ends[20.0] < 0.5 * ends[0.0], (start, ends)  # not what healing alone does


def test_weight_zero_trains_exactly_as_without_the_callback(tmp_path, tokenizer):
    runs = []
    for callbacks in ([], [FairnessLossCallback(ITEMS, tokenizer, weight=0.0)]):
        model = make_tiny_model("llama")
        _trainer(tmp_path / str(len(callbacks)), tokenizer, model, callbacks, max_steps=3).train()
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_resumed_run_adds_the_same_gradients_as_an_uninterrupted_one(tmp_path, tokenizer):
    def script():
        model = make_tiny_model("llama")
        callback = FairnessLossCallback(ITEMS, tokenizer, weight=5.0, batch_size=2, seed=7)
        return _trainer(
            tmp_path, tokenizer, model, [callback], max_steps=4, save_strategy="steps", save_steps=2
        )

    uninterrupted = script()
    uninterrupted.train()
    resumed = script()
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    a, b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = make_tiny_model("llama").state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)  # it trained


def test_lora_model_gets_the_fairness_gradient_on_its_adapters_only(tmp_path, tokenizer):
    from optipfair_train.heal import add_lora

    model = add_lora(make_tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before, after = _GradSpy(), _GradSpy()
    callback = FairnessLossCallback(ITEMS, tokenizer, weight=3.0, batch_size=3)
    _trainer(tmp_path, tokenizer, model, [before, callback, after]).train()
    added = [g1 - g0 for g0, g1 in zip(before.grads[0], after.grads[0], strict=True)]
    assert len(added) == len([p for p in model.parameters() if p.requires_grad])
    assert any(g.abs().max() > 0 for g in added)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["items", "mean"])
def test_under_ddp_every_rank_adds_the_whole_batch_gradient(tmp_path, objective):
    """Two processes (torchrun, gloo): each scores its share of the batch, the all-reduced sum equals the
    whole batch's gradient on every rank, and the ranks' weights stay identical."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(port), str(root / "tests" / "ddp_fair_loss_entry.py"), str(tmp_path), objective]  # fmt: skip
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert all(r["max_error"] < 1e-5 for r in ranks), ranks
    assert ranks[0]["digest"] == ranks[1]["digest"]
