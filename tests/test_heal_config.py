"""heal() runs from its own small config (HealConfig, optional RunConfig): no PipelineConfig needed."""

from __future__ import annotations

import copy

import torch
from conftest import make_tiny_model
from transformers import TrainerCallback

from optipfair_train.pipeline.config import HealConfig, RunConfig
from optipfair_train.pipeline.healing import heal, training_args


def test_heal_without_a_pipeline_config(tmp_path):
    model = make_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    ids = torch.randint(4, 100, (4, 16))
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    config = HealConfig(
        heal_method="lora", heal_steps=2, per_device_batch_size=2, lora_target_modules=["down_proj"]
    )
    healed, tokens = heal(model, None, config, tmp_path / "round", 1e-2, dataset, run=RunConfig(save_steps=1))
    assert tokens == 2 * 2 * 16  # two steps of two unpadded 16-token sequences
    assert not hasattr(healed, "peft_config")  # LoRA merged back into a plain model
    state = healed.state_dict()
    changed = [k for k in before if not torch.equal(before[k], state[k])]
    assert changed and all(k.endswith("mlp.down_proj.weight") for k in changed)
    assert (tmp_path / "round" / "heal").is_dir()  # checkpoints where a rerun resumes from


def test_training_arguments_come_from_the_small_config(tmp_path):
    args = training_args(
        HealConfig(heal_steps=7, per_device_batch_size=3), tmp_path, 5e-4, run=RunConfig(seed=11)
    )
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate, args.seed) == (
        7,
        3,
        5e-4,
        11,
    )


def test_bf16_heals_under_autocast_with_float32_weights(tmp_path):
    """bf16: the forward runs in bfloat16 while the weights and the optimizer's moments stay float32."""
    model = make_tiny_model("llama")
    teacher = copy.deepcopy(model).eval()
    seen: list[torch.dtype] = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    ids = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    states: list[dict] = []

    class KeepOptimizer(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            states.append({k: v for s in optimizer.state.values() for k, v in s.items()})

    config = HealConfig(heal_method="kd", heal_steps=2, per_device_batch_size=2, bf16=True)
    assert training_args(config, tmp_path, 1e-3).bf16
    before = copy.deepcopy(model.state_dict())
    healed, _ = heal(
        model, None, config, tmp_path / "round", 1e-3, dataset, run=RunConfig(save_steps=5),
        teacher=teacher, callbacks=[KeepOptimizer()],
    )  # fmt: skip
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in healed.parameters())
    assert any(not torch.equal(before[k], v) for k, v in healed.state_dict().items())
    assert states and states[-1]["exp_avg"].dtype == torch.float32
    unset = HealConfig(heal_method="kd", heal_steps=1)
    assert not training_args(unset, tmp_path, 1e-3).bf16


def test_bf16_reaches_the_sft_arguments_too(tmp_path):
    for flag in (True, False):
        args = training_args(HealConfig(heal_method="sft_lora", heal_steps=1, bf16=flag), tmp_path, 1e-3)
        assert type(args).__name__ == "SFTConfig" and args.bf16 is flag
