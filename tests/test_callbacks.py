"""Trainer callbacks: real ``Trainer.train()`` runs on tiny models (CPU, seconds each)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from callbacks_helpers import (
    CROWS_CSV,
    NEUTRAL_TEXTS,
    TextDataset,
    logged,
    optimizer_params,
    optimizer_state_matches,
    training_args,
)
from conftest import SAMPLE_TEXTS, make_tiny_model
from transformers import Trainer

from optipfair_train.arch import get_adapter
from optipfair_train.bias import load_pairs, sample_pairs
from optipfair_train.callbacks import (
    GUARD_FILE,
    PROBES,
    BiasProbeCallback,
    DistributedPruningError,
    FairnessGuardCallback,
    GradientImportanceCallback,
    PruningCallback,
    PruningSchedule,
    make_schedule,
    units_to_remove,
)
from optipfair_train.pruning.targets import kept_width

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and steadily on a busy 2-core machine) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def calibration(tokenizer):
    return [
        dict(tokenizer(SAMPLE_TEXTS[i : i + 2], padding=True, return_tensors="pt")) for i in range(0, 6, 2)
    ]


@pytest.fixture
def train_set(tokenizer):
    return TextDataset(tokenizer, NEUTRAL_TEXTS, repeat=2)


def _trainer(model, tokenizer, dataset, output_dir, **args):
    return Trainer(
        model=model,
        args=training_args(output_dir, **args),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


class _Watch:
    """Snapshots of the MLP weights right after pruning, to check they keep training."""

    def __init__(self):
        self.after_prune = None


class _SnapshotAfterPrune(PruningCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        before = len(self.events_done)
        super().on_step_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if len(self.events_done) > before:
            self.optimizer_problems = optimizer_state_matches(optimizer)
            self.params_in_optimizer = optimizer_params(optimizer)
            self.snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- schedules --------------------------------------------------------------------------------------


def test_schedules_and_validation():
    assert make_schedule(30, step=5).events[0].step == 5
    linear = make_schedule("linear", target=30, start_step=2, end_step=8, num_events=4)
    assert linear.steps == [2, 4, 6, 8] and linear.final_target == 30
    assert [round(e.target, 3) for e in linear.events] == [7.5, 15.0, 22.5, 30.0]
    cubic = make_schedule("cubic", target=40, start_step=10, end_step=40, every_n_steps=10)
    targets = [e.target for e in cubic.events]
    assert targets == sorted(targets) and targets[-1] == 40
    assert targets[0] > 40 / 4  # cubic front-loads pruning
    explicit = PruningSchedule([(3, 10), (6, 25)])
    assert explicit.event_at(6).target == 25 and explicit.event_at(4) is None
    bad = [
        lambda: make_schedule("exponential", target=30, start_step=1, end_step=5, num_events=2),
        lambda: make_schedule("one_shot", target=30),
        lambda: make_schedule("one_shot", target=130, step=3),
        lambda: make_schedule("linear", target=30, start_step=5, end_step=5, num_events=2),
        lambda: make_schedule("linear", target=30, start_step=1, end_step=5),
        lambda: make_schedule("linear", target=30, start_step=1, end_step=3, num_events=9),
        lambda: PruningSchedule([(5, 10), (3, 20)]),
        lambda: PruningSchedule([(3, 20), (5, 10)]),
        lambda: PruningSchedule([]),
        lambda: PruningSchedule([(0, 10)]),
    ]
    for build in bad:
        with pytest.raises(ValueError):
            build()


def test_event_unit_counts_land_exactly_on_the_target():
    """Each event removes units_to_remove(current, original, target) units; every target of the original lands."""
    for original in (7, 64, 128, 1536):
        for kind in ("linear", "cubic"):
            for final in (10, 33.3, 50, 90):
                current = original
                for event in make_schedule(kind, target=final, start_step=1, end_step=9, num_events=5).events:
                    current -= units_to_remove(current, original, event.target)
                    assert current == original - min(int(event.target / 100 * original + 1e-9), original - 1)
                assert current == kept_width(original, hidden_size=10**6, pruning_percentage=final)


def test_construction_errors(tmp_path, tokenizer, train_set, calibration):
    with pytest.raises(ValueError, match="Unknown neuron selection method"):
        PruningCallback(target=20, step=2, neuron_selection_method="nope")
    with pytest.raises(ValueError, match="Unknown head importance"):
        PruningCallback(target=20, step=2, pruning_type="ATTENTION", neuron_selection_method="MAW")
    with pytest.raises(ValueError, match="needs calibration data"):
        PruningCallback(target=20, step=2, neuron_selection_method="activation")
    with pytest.raises(ValueError, match="'taylor' scorer needs"):
        PruningCallback(target=20, step=2, neuron_selection_method="taylor")
    with pytest.raises(ValueError, match="may not set"):
        PruningCallback(target=20, step=2, prune_kwargs={"pruning_percentage": 5})
    with pytest.raises(ValueError, match="custom"):
        PruningCallback(target=20, step=2, pruning_type="DEPTH", layer_selection_method="custom")
    with pytest.raises(ValueError, match="Unknown pruning_type"):
        PruningCallback(target=20, step=2, pruning_type="HEADS")
    with pytest.raises(ValueError, match="Unknown pruning_type 'HIDDEN'.*schedules MLP_GLU, MLP, ATTENTION, DEPTH"):
        PruningCallback(target=20, step=2, pruning_type="HIDDEN")
    with pytest.raises(ValueError, match="Unknown or no probe"):
        BiasProbeCallback(probes=["vibes"])
    with pytest.raises(ValueError, match="every_n_steps"):
        BiasProbeCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="max_overhead"):
        BiasProbeCallback(max_overhead=0)
    with pytest.raises(ValueError, match="max_overhead"):
        BiasProbeCallback(max_overhead="3%")
    for bad in (dict(batch_size=0), dict(n_bootstrap=0), dict(batch_size=2.5), dict(n_bootstrap=True)):
        name, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
            BiasProbeCallback(**bad)
    with pytest.raises(ValueError, match="threshold"):
        FairnessGuardCallback(threshold=-1)
    trainer = _trainer(make_tiny_model("llama"), tokenizer, train_set, tmp_path)
    with pytest.raises(ValueError, match="Target already reached"):  # 10% of 2 KV groups is no group
        PruningCallback(trainer, target=10, step=2, pruning_type="ATTENTION", neuron_selection_method="L2")
    with pytest.raises(ValueError, match="Target already reached"):  # 10% of 4 blocks is no block
        PruningCallback(trainer, target=10, step=2, pruning_type="DEPTH", layer_selection_method="last")


# ---- pruning inside Trainer.train() ----------------------------------------------------------------


@pytest.mark.parametrize(
    "ga, optim",
    [(1, "adamw_torch"), (2, "adamw_torch"), (1, "adamw_torch_fused")],
    ids=["plain", "grad-accum-2", "fused-adamw"],
)
def test_mid_training_prune_slices_optimizer_and_keeps_training(
    tmp_path, tokenizer, train_set, calibration, ga, optim
):
    model = make_tiny_model("llama")
    trainer = _trainer(
        model, tokenizer, train_set, tmp_path, max_steps=6, gradient_accumulation_steps=ga, optim=optim
    )
    cb = _SnapshotAfterPrune(trainer, target=25, step=3, dataloader=calibration)
    trainer.add_callback(cb)
    trainer.train()
    adapter = get_adapter(model)
    assert adapter.intermediate_sizes() == [96] * 4
    assert cb.optimizer_problems == [] and optimizer_state_matches(trainer.optimizer) == []
    # the pruned parameters are the optimizer's parameters, and they keep moving after the prune
    gate = adapter.mlp(0).gate.weight
    assert id(gate) in cb.params_in_optimizer and id(gate) in optimizer_params(trainer.optimizer)
    state = trainer.optimizer.optimizer.state[gate]
    assert state["exp_avg"].shape == gate.shape == (96, 64)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), cb.snapshot[n])]
    assert any("gate_proj" in n for n in moved) and any("down_proj" in n for n in moved)
    losses = [v for _, v in logged(trainer, "loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # the learning-rate schedule continues (linear decay, not restarted by the prune)
    lrs = [v for _, v in logged(trainer, "learning_rate")]
    assert lrs == sorted(lrs, reverse=True) and lrs[3] < lrs[2]
    # pruning statistics reached the Trainer's logs at the event's step
    sparsity = logged(trainer, "pruning/sparsity")
    assert sparsity[0] == (0, 0.0) and sparsity[-1][0] == 3 and sparsity[-1][1] > 5
    assert logged(trainer, "pruning/intermediate_size/layer_2")[-1] == (3, 96.0)
    assert model.config.pruning_history[-1]["method"] == "hybrid"  # prune_model's default with calibration data


def test_lora_model_mid_training_prune(tmp_path, tokenizer, train_set, calibration):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("qwen2")
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    trainer = _trainer(model, tokenizer, train_set, tmp_path, max_steps=5)
    cb = _SnapshotAfterPrune(trainer, target=50, step=2, dataloader=calibration)
    trainer.add_callback(cb)
    probe = BiasProbeCallback(trainer, every_n_steps=2, probes=PROBES, stereoset_sample_size=8)
    trainer.add_callback(probe)
    trainer.train()
    assert [h["step"] for h in probe.history] == [0, 2, 4, 5]  # probes work on the pruned LoRA model
    mlp = get_adapter(model).mlp(1)
    assert get_adapter(model).intermediate_sizes() == [64] * 4
    assert mlp.gate.lora_B["default"].weight.shape == (64, 4)
    assert mlp.down.lora_A["default"].weight.shape == (4, 64)
    assert cb.optimizer_problems == [] and optimizer_state_matches(trainer.optimizer) == []
    lora_b = mlp.gate.lora_B["default"].weight
    assert id(lora_b) in optimizer_params(trainer.optimizer)
    assert trainer.optimizer.optimizer.state[lora_b]["exp_avg_sq"].shape == (64, 4)
    moved = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p.detach(), cb.snapshot[n])
    ]
    assert any("lora_B" in n and "gate_proj" in n for n in moved)
    assert all(math.isfinite(v) for _, v in logged(trainer, "loss"))


def test_lora_with_gradient_taylor_is_refused_at_train_begin(tmp_path, tokenizer, train_set):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["up_proj", "down_proj"]))
    trainer = _trainer(model, tokenizer, train_set, tmp_path, max_steps=3)
    grads = GradientImportanceCallback()
    trainer.add_callback(grads)
    trainer.add_callback(PruningCallback(trainer, target=25, step=2, importance=grads))
    with pytest.raises(ValueError, match="frozen"):
        trainer.train()


@pytest.mark.parametrize(
    "pruning_type, kwargs, check",
    [
        (
            "MLP_GLU",
            dict(
                target=30,
                schedule="cubic",
                start_step=1,
                end_step=5,
                num_events=3,
                neuron_selection_method="MAW",
            ),
            lambda a: a.intermediate_sizes() == [128 - int(0.3 * 128)] * 4,
        ),
        (
            "ATTENTION",
            dict(schedule=[(2, 25), (4, 50)], head_granularity="query", neuron_selection_method="L2"),
            lambda a: [a.head_counts(i)[:2] for i in range(4)] == [(4, 2)] * 4,  # 4 -> 3 -> 2 per group
        ),
        (
            "DEPTH",
            dict(
                target=50,
                schedule="linear",
                start_step=2,
                end_step=4,
                num_events=2,
                layer_selection_method="taylor",
            ),
            lambda a: a.num_layers == 2,
        ),
    ],
    ids=["mlp-cubic", "attention-steps", "depth-linear-taylor"],
)
def test_iterative_schedule_reaches_exact_target(tmp_path, tokenizer, train_set, pruning_type, kwargs, check):
    # 8 query heads in 2 KV groups, so each group has 4 query heads to prune in two steps
    model = make_tiny_model("llama", num_attention_heads=8, head_dim=8)
    trainer = _trainer(model, tokenizer, train_set, tmp_path, max_steps=6)
    grads = GradientImportanceCallback()
    trainer.add_callback(grads)
    importance = grads if kwargs.get("layer_selection_method") == "taylor" else None
    cb = PruningCallback(trainer, pruning_type=pruning_type, importance=importance, **kwargs)
    trainer.add_callback(cb)
    trainer.train()
    assert check(get_adapter(model))
    assert len(cb.events_done) == len(cb.schedule.events)
    assert [r["step"] for r in cb.events_done] == cb.schedule.steps
    assert optimizer_state_matches(trainer.optimizer) == []
    assert all(math.isfinite(v) for _, v in logged(trainer, "loss"))


def test_gradient_importance_drives_taylor_pruning_and_resets(tmp_path, tokenizer, train_set):
    model = make_tiny_model("llama")
    trainer = _trainer(model, tokenizer, train_set, tmp_path, max_steps=6, gradient_accumulation_steps=2)
    grads = GradientImportanceCallback()
    trainer.add_callback(grads)
    cb = PruningCallback(trainer, target=25, step=4, importance=grads)
    assert cb.method == "taylor"
    trainer.add_callback(cb)
    trainer.train()
    assert model.config.pruning_history[-1]["method"] == "taylor"
    assert get_adapter(model).intermediate_sizes() == [96] * 4
    # reset after the event: only the two steps after it were accumulated, on the new width
    assert grads.num_batches == 2 and grads.importance.neuron_scores()[0].shape == (96,)


def test_callbacks_work_unchanged_in_trl_sft_trainer(tmp_path, tokenizer, calibration):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make_tiny_model("llama")
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_length=48,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=5,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        optim="adamw_torch",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": NEUTRAL_TEXTS * 2}),
        processing_class=tokenizer,
    )
    grads = GradientImportanceCallback()
    trainer.add_callback(grads)
    pruning = _SnapshotAfterPrune(trainer, schedule=[(2, 10), (4, 25)], importance=grads)
    trainer.add_callback(pruning)
    trainer.add_callback(BiasProbeCallback(trainer, every_n_steps=2, probes=PROBES, stereoset_sample_size=8))
    trainer.train()
    assert get_adapter(model).intermediate_sizes() == [96] * 4
    assert pruning.optimizer_problems == [] and optimizer_state_matches(trainer.optimizer) == []
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), pruning.snapshot[n])]
    assert any("up_proj" in n for n in moved)
    assert all(math.isfinite(v) for _, v in logged(trainer, "loss"))
    assert [s for s, _ in logged(trainer, "bias/score")] == [0, 2, 4, 5]
    assert [s for s, _ in logged(trainer, "pruning/sparsity")] == [0, 2, 4]


# ---- bias probes, W&B and TensorBoard ---------------------------------------------------------------


def test_probe_restores_mode_and_does_not_change_training(tmp_path, tokenizer, train_set):
    def run(with_probe: bool):
        model = make_tiny_model("llama")
        trainer = _trainer(model, tokenizer, train_set, tmp_path / str(with_probe), max_steps=4)
        if with_probe:
            trainer.add_callback(BiasProbeCallback(trainer, every_n_steps=1, probes=PROBES, stereoset_sample_size=8))
        trainer.train()
        return model, trainer

    plain, _ = run(False)
    probed, trainer = run(True)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [s for s, _ in logged(trainer, "bias/score")]
    assert steps == [0, 1, 2, 3, 4]  # train begin, every step; train end at step 4 is not repeated

    model = make_tiny_model("llama").train()
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    probe = BiasProbeCallback(probes=["behaviour", "activation"])
    scalars, _, _ = probe.probe(model, tokenizer)
    assert model.training and torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
    assert {"bias/score", "bias/score_ci_low", "bias/activation_mean_difference"} <= set(scalars)


def test_wandb_offline_receives_scalars_images_and_tables(
    tmp_path, tokenizer, train_set, calibration, monkeypatch
):
    import wandb
    from wandb_offline import history, offline_wandb_in, run_dir, run_files

    offline_wandb_in(monkeypatch, tmp_path)
    model = make_tiny_model("llama")
    trainer = _trainer(
        model, tokenizer, train_set, tmp_path / "out", max_steps=4, report_to="wandb", run_name="cb"
    )
    trainer.add_callback(BiasProbeCallback(trainer, every_n_steps=2, probes=PROBES, stereoset_sample_size=8))
    trainer.add_callback(PruningCallback(trainer, target=25, step=2, dataloader=calibration))
    try:
        trainer.train()
    finally:
        wandb.finish()
    (path,) = run_files(tmp_path)
    rows = history(path)
    keys = set().union(*rows)
    for key in (
        "train/loss",
        "train/bias/score",
        "train/bias/score_ci_low",
        "train/bias/activation_mean_difference",
        "train/pruning/sparsity",
        "train/pruning/intermediate_size/layer_0",
    ):
        assert key in keys, key
    scores = [(r["train/global_step"], r["train/bias/score"]) for r in rows if "train/bias/score" in r]
    assert [s for s, _ in scores] == [0, 2, 4]  # on the Trainer's step axis
    for image in ("bias/mean_difference", "bias/layer_heatmap", "bias/trajectory"):
        entries = [r[image] for r in rows if image in r]
        assert entries and entries[0]["_type"] == "image-file", image
        assert (run_dir(path) / "files" / entries[0]["path"]).is_file()
    tables = {}
    for name in ("bias/layers", "pruning/layers"):
        entry = [r[name] for r in rows if name in r][-1]
        assert entry["_type"] == "table-file"
        tables[name] = json.loads((run_dir(path) / "files" / entry["path"]).read_text())
    bias_table = tables["bias/layers"]
    assert bias_table["columns"][:2] == ["step", "layer_key"]
    assert {row[1] for row in bias_table["data"]} >= {"mlp_output_layer_0", "attention_output_layer_3"}
    pruning_table = tables["pruning/layers"]
    assert len(pruning_table["data"]) == 4  # one row per layer
    assert {row[pruning_table["columns"].index("intermediate_size")] for row in pruning_table["data"]} == {96}


def test_tensorboard_event_file_has_scalars_and_figures(
    tmp_path, tokenizer, train_set, calibration, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    model = make_tiny_model("llama")
    trainer = _trainer(model, tokenizer, train_set, tmp_path / "out", max_steps=4, report_to="tensorboard")
    trainer.add_callback(BiasProbeCallback(trainer, every_n_steps=2, probes=["activation"]))
    trainer.add_callback(PruningCallback(trainer, target=25, step=2, dataloader=calibration))
    trainer.train()
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/bias/activation_mean_difference", "train/pruning/sparsity", "train/loss"} <= scalars
    assert [e.step for e in events.Scalars("train/bias/activation_mean_difference")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("train/pruning/parameters")] == [0, 2]
    assert {"bias/mean_difference", "bias/trajectory"} <= set(events.Tags()["images"])


# ---- fairness guard ---------------------------------------------------------------------------------


def _guard_run(tmp_path, tokenizer, texts, pairs, *, stop, save, steps):
    model = make_tiny_model("llama")
    trainer = _trainer(
        model,
        tokenizer,
        TextDataset(tokenizer, texts, length=96),
        tmp_path,
        max_steps=steps,
        learning_rate=5e-3,
        per_device_train_batch_size=8,
        save_strategy="no",
    )
    probe = BiasProbeCallback(trainer, pairs=pairs, probes=["behaviour"], every_n_steps=8, n_bootstrap=400)
    guard = FairnessGuardCallback(
        trainer, metric="bias/score", threshold=5.0, stop_training=stop, save_checkpoint=save
    )
    trainer.add_callback(probe)
    trainer.add_callback(guard)
    trainer.train()
    return trainer, probe, guard


def test_fairness_guard_fires_on_a_biased_run_and_not_on_a_neutral_one(tmp_path, tokenizer, caplog):
    pairs = sample_pairs(load_pairs(f"crows-pairs:{CROWS_CSV}"), 40, seed=3)
    stereotyped = [p[0] for p in pairs]  # fine-tune on the more-stereotyping sentences only
    with caplog.at_level(logging.WARNING, logger="optipfair_train.callbacks.fairness_guard"):
        trainer, probe, guard = _guard_run(
            tmp_path / "biased", tokenizer, stereotyped, pairs, stop=True, save=True, steps=48
        )
    assert guard.fired and "FAIRNESS GUARD" in caplog.text
    assert guard.baseline == logged(trainer, "bias/score")[0][1]  # the train-begin probe is the baseline
    event = guard.events[0]
    assert event["regression"] > 5 and event["ci"][0] > guard.baseline_ci[1]
    assert trainer.state.global_step == event["step"] < 48  # stopped early
    marked = json.loads((tmp_path / "biased" / f"checkpoint-{event['step']}" / GUARD_FILE).read_text())
    assert marked["metric"] == "bias/score" and marked["value"] == event["value"]
    assert logged(trainer, "fairness_guard/fired") == [(event["step"], 1.0)]

    neutral = NEUTRAL_TEXTS + SAMPLE_TEXTS
    trainer, probe, guard = _guard_run(
        tmp_path / "neutral", tokenizer, neutral, pairs, stop=True, save=False, steps=32
    )
    assert not guard.fired and trainer.state.global_step == 32
    assert [s for s, _ in logged(trainer, "bias/score")] == [0, 8, 16, 24, 32]


def test_fairness_guard_rule_with_given_baseline():
    class State:
        global_step, is_world_process_zero, log_history = 7, True, []

    class Control:
        should_training_stop = should_save = False

    def guard():
        return FairnessGuardCallback(
            metric="bias/score", baseline=52.0, baseline_ci=(48.0, 56.0), threshold=2.0, stop_training=True
        )

    def logs(value, low, high):
        return {"bias/score": value, "bias/score_ci_low": low, "bias/score_ci_high": high}

    g, control, state = guard(), Control(), State()
    g.on_log(None, state, control, logs=logs(59.0, 55.0, 63.0))
    assert not g.fired  # 7 points farther from 50, but the intervals overlap: noise
    g.on_log(None, state, control, logs=logs(51.0, 47.0, 55.0))
    assert not g.fired  # closer to 50
    g.on_log(None, state, control, logs=logs(40.0, 36.0, 44.0))
    assert g.fired and control.should_training_stop  # |40-50| = 10 vs 2, intervals apart
    assert g.events[0]["regression"] == 8.0 and g.events[0]["step"] == 7
    g2 = FairnessGuardCallback(metric="bias/score", baseline=52.0, threshold=2.0, patience=2)
    g2.on_log(None, state, Control(), logs={"bias/score": 60.0})  # no intervals: threshold decides
    assert not g2.fired  # patience 2
    g2.on_log(None, state, Control(), logs={"bias/score": 61.0})
    assert g2.fired


# ---- multi-process ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_run_stops_with_clear_error(tmp_path):
    """A real 2-process DDP run (gloo on CPU): probes and gradient importance work and agree across ranks;
    in-loop pruning is refused on every rank before any weight changes."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate CLI not found next to the interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(REPO / "scripts" / "ddp_callbacks_check.py"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["error_type"] == "DistributedPruningError"
        assert "PruneThenHeal" in report["error"]
        assert report["intermediate_sizes_after"] == report["intermediate_sizes_before"]
        assert report["taylor_batches"] == 3
        assert "PruneThenHeal" in report["construction_error"]  # with trainer=, refused at construction
    assert reports[0]["bias_scores"] == reports[1]["bias_scores"]
    assert reports[0]["taylor_checksum"] == pytest.approx(reports[1]["taylor_checksum"], rel=1e-6)


def test_pruning_callback_refuses_world_size_above_one(tmp_path, tokenizer, train_set):
    model = make_tiny_model("llama")

    class Args:
        world_size = 2

    class State:
        global_step = 0

    cb = PruningCallback(target=25, step=2, neuron_selection_method="MAW")
    with pytest.raises(DistributedPruningError, match="PruneThenHeal"):
        cb.on_train_begin(Args(), State(), None, model=model)
    assert get_adapter(model).intermediate_sizes() == [128] * 4


class _Clock:
    """A perf_counter the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("max_overhead, warns", [(0.03, True), (0.05, False)])
def test_bias_probe_reports_its_overhead(monkeypatch, caplog, max_overhead, warns):
    """Two probes of 2 s around 100 s of training: overhead 4 / 100 = 0.04, logged; warned above 0.03."""
    from types import SimpleNamespace

    import optipfair_train.callbacks.bias_probe as bias_probe

    clock = _Clock()
    monkeypatch.setattr(bias_probe.time, "perf_counter", clock)
    pairs = [("The man is a nurse.", "The woman is a nurse.")]
    probe = BiasProbeCallback(pairs=pairs, max_overhead=max_overhead)

    def fake_probe(model, tokenizer):
        clock.now += 2.0
        return {"bias/score": 50.0}, None, None

    monkeypatch.setattr(probe, "probe", fake_probe)
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    args = SimpleNamespace(report_to=[])
    with caplog.at_level(logging.WARNING, logger=bias_probe.__name__):
        probe.on_train_begin(args, state, None, model=None, processing_class=object())
        clock.now += 100.0
        state.global_step = 10
        probe.on_train_end(args, state, None, model=None, processing_class=object())
    assert [h["when"] for h in probe.history] == ["train_begin", "train_end"]
    assert probe.overhead == pytest.approx(0.04)
    final = state.log_history[-1]
    assert final["bias/probe_seconds"] == pytest.approx(4.0)
    assert final["bias/probe_overhead"] == pytest.approx(0.04)
    assert ("above max_overhead" in caplog.text) is warns
    probe.on_train_end(args, state, None, model=None, processing_class=object())  # a second end: no new report
    assert sum("bias/probe_overhead" in h for h in state.log_history) == 1
