"""A user's Trainer script with PruningCallback resumes from its checkpoints like any other.

The run is "killed" after the checkpoint written at the pruning step: one Trainer trains to the end
uninterrupted (saving checkpoints on the way), a fresh Trainer built by the same script (unpruned
model) resumes from the checkpoint, and every weight and optimizer tensor must be equal at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from callbacks_helpers import NEUTRAL_TEXTS, TextDataset, training_args
from conftest import SAMPLE_TEXTS, make_tiny_model
from transformers import Trainer

from optipfair_train.arch import get_adapter
from optipfair_train.callbacks import BiasProbeCallback, GradientImportanceCallback, PruningCallback
from optipfair_train.callbacks.resume import PROGRESS_FILE

PAIRS = [("The man is a nurse.", "The woman is a nurse."), ("He cooks dinner.", "She cooks dinner.")]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def calibration(tokenizer):
    return [
        dict(tokenizer(SAMPLE_TEXTS[i : i + 2], padding=True, return_tensors="pt")) for i in range(0, 4, 2)
    ]


def _script(
    output_dir: Path, tokenizer, calibration, pruning: dict, max_steps: int = 6, attach: bool = False
):
    """What a user's script builds: model, Trainer (GA=2, a checkpoint every 3 steps), the callbacks."""
    model = make_tiny_model("llama")
    args = training_args(
        output_dir, max_steps=max_steps, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS, repeat=3),
        processing_class=tokenizer,
    )
    if pruning.get("neuron_selection_method") == "taylor":  # scores from the training's own gradients
        pruning = {**pruning, "importance": GradientImportanceCallback()}
        trainer.add_callback(pruning["importance"])
    if attach:  # the callback built without the trainer, then attached
        PruningCallback(dataloader=calibration, **pruning).attach(trainer)
    else:
        trainer.add_callback(PruningCallback(trainer, dataloader=calibration, **pruning))
    trainer.add_callback(BiasProbeCallback(trainer, pairs=PAIRS, n_bootstrap=20))
    return trainer


def _optimizer_tensors(trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [v for k in sorted(state) for _, v in sorted(state[k].items()) if torch.is_tensor(v)]


def _assert_same_run(uninterrupted, resumed):
    a, b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resuming: {different[:5]}"
    opt_a, opt_b = _optimizer_tensors(uninterrupted), _optimizer_tensors(resumed)
    assert len(opt_a) == len(opt_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(opt_a, opt_b, strict=True))
    assert uninterrupted.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()


CASES = {
    # two events: the first at the checkpoint's step, the second after the resume (needs the restored
    # original size: 128 -> 103 -> 90 neurons: 25.6 and 38.4 round to 25 and 38)
    "mlp-two-events": dict(pruning_type="MLP_GLU", schedule=[(3, 20), (5, 30)]),
    # Taylor scores from the training's gradients: the second event scores on steps 3-5 (reset after the
    # first), and step 3's scores come from the checkpoint
    "taylor-gradients": dict(
        pruning_type="MLP_GLU", schedule=[(2, 20), (5, 30)], neuron_selection_method="taylor"
    ),
    "attention": dict(pruning_type="ATTENTION", target=50, step=3),
    "depth": dict(pruning_type="DEPTH", target=25, step=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_at_the_pruning_checkpoint_equals_an_uninterrupted_run(tmp_path, tokenizer, calibration, case):
    pruning = CASES[case]
    uninterrupted = _script(tmp_path / "run", tokenizer, calibration, pruning)
    uninterrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert len(saved["pruning_history"]) == 1  # pruned at step 3, then saved at step 3

    resumed = _script(tmp_path / "run", tokenizer, calibration, pruning)  # the rerun script: unpruned model
    assert get_adapter(resumed.model).intermediate_sizes() == [128] * 4
    resumed.train(resume_from_checkpoint=str(checkpoint))

    _assert_same_run(uninterrupted, resumed)
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, PruningCallback))
    first = next(c for c in uninterrupted.callback_handler.callbacks if isinstance(c, PruningCallback))
    assert [e["step"] for e in callback.events_done] == [e["step"] for e in first.events_done]
    assert callback.original_units == first.original_units
    assert resumed.model.config.pruning_history == uninterrupted.model.config.pruning_history


def test_resume_with_true_finds_the_last_checkpoint_and_restores_progress(tmp_path, tokenizer, calibration):
    """``resume_from_checkpoint=True`` (the usual rerun): the callback's records come from the checkpoint."""
    pruning = CASES["mlp-two-events"]
    first = _script(tmp_path / "run", tokenizer, calibration, pruning, max_steps=3)  # "killed" after step 3
    first.train()
    records = json.loads((tmp_path / "run" / "checkpoint-3" / PROGRESS_FILE).read_text())
    assert [e["step"] for e in records[0]["events_done"]] == [3]

    resumed = _script(tmp_path / "run", tokenizer, calibration, pruning, max_steps=6, attach=True)
    resumed.train(resume_from_checkpoint=True)
    callback = next(c for c in resumed.callback_handler.callbacks if isinstance(c, PruningCallback))
    assert [(e["step"], e["units"]) for e in callback.events_done] == [(3, 103), (5, 90)]
    assert get_adapter(resumed.model).intermediate_sizes() == [90] * 4
    targets = [e["pruning/target"] for e in resumed.state.log_history if "pruning/target" in e]
    # the first run's train begin and event (log history comes with the checkpoint), the resume's train
    # begin (the target reached so far, not 0), the second event
    assert targets == [0.0, 20.0, 20.0, 30.0]


def test_resume_with_another_schedule_is_refused_before_anything_changes(tmp_path, tokenizer, calibration):
    first = _script(tmp_path / "run", tokenizer, calibration, dict(target=20, step=3), max_steps=3)
    first.train()
    rerun = _script(tmp_path / "run", tokenizer, calibration, dict(target=40, step=3))
    before = {k: v.clone() for k, v in rerun.model.state_dict().items()}
    with pytest.raises(
        ValueError, match="checkpoint-3: the model there has 103 MLP_GLU units, .* leaves 77 of 128"
    ):
        rerun.train(resume_from_checkpoint=True)
    after = rerun.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_resume_past_a_pruning_event_is_refused_with_the_reason(tmp_path, tokenizer, calibration):
    from peft import LoraConfig, get_peft_model

    def script():
        model = get_peft_model(
            make_tiny_model("llama"),
            LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]
            ),
        )
        args = training_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS),
            processing_class=tokenizer,
        )
        trainer.add_callback(PruningCallback(trainer, target=50, step=2, dataloader=calibration))
        return trainer

    script().train()
    rerun = script()
    with pytest.raises(ValueError, match="checkpoint-3: a LoRA .* holds only the adapter"):
        rerun.train(resume_from_checkpoint=True)
    assert get_adapter(rerun.model).intermediate_sizes() == [128] * 4
