"""bench/memory_plan.py: its arithmetic against transformers' own parameter counts and hand-computed sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan as plan  # noqa: E402


@pytest.mark.parametrize("name", sorted(plan.MODELS))
def test_parameter_count_equals_llama_on_meta(name):
    shape = plan.MODELS[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(plan.llama_config(shape))
    assert plan.parameters(shape) == model.num_parameters()


def test_published_sizes():
    assert plan.parameters(plan.MODELS["1B"]) == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    assert plan.parameters(plan.MODELS["8B"]) == 8_030_261_248
    assert plan.parameters(plan.MODELS["70B"]) == 70_553_706_496
    assert plan.parameters(plan.PRESETS["mistral-7b.yaml"]) == 7_241_732_096  # Mistral-7B-v0.1


def test_hand_computed_statistics_and_lora():
    m8 = plan.MODELS["8B"]
    stats = plan.pruning_memory(m8, tokens=32768)
    assert stats["down_proj Gram, one layer"] == 14336**2 * 8 / 2**30  # 1.53125 GiB
    assert stats["down_proj Gram, all layers"] == 32 * 1.53125
    assert stats["sequential buffer, 32k tokens (in + out)"] == 0.5  # 2 x 32768 x 4096 x 2 bytes
    # per layer 16 * ((4096+4096)*2 + (4096+1024)*2 + (4096+14336)*3) = 1,310,720; 32 layers
    assert plan.lora_parameters(m8, 16) == 41_943_040


def test_hand_computed_activations():
    # 1B, 1 x 1024 tokens: checkpoints 16*1024*2048*2 = 67,108,864; one layer 1024*2*(20480+1024+32768)
    # = 111,149,056; logits 1024*128256*14 = 1,838,678,016
    assert plan.activations(plan.MODELS["1B"], 1, 1024, 14) == 2_016_935_936
    # without checkpointing: 16 layers x 111,149,056 + the logits
    assert plan.activations(plan.MODELS["1B"], 1, 1024, 14, checkpointing=False) == 3_617_062_912


def test_sharding_shrinks_fsdp_memory_not_ddp():
    m = plan.MODELS["70B"]
    fsdp = [plan.healing_memory(m, "lora", "fsdp", w, 1, 1024, 16) for w in (1, 2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True) and fsdp[0] - fsdp[-1] > 100
    ddp = {plan.healing_memory(m, "lora", "ddp", w, 1, 1024, 16) for w in (1, 8)}
    assert len(ddp) == 1
    assert (
        plan.healing_memory(m, "kd_lora", "ddp", 1, 1, 1024, 16)
        - plan.healing_memory(m, "kd_lora_topk", "ddp", 1, 1, 1024, 16)
        > 2 * plan.parameters(m) / 2**30
    )  # the resident teacher's weights, plus its logit temporaries
    assert plan.smallest_set(plan.MODELS["1B"], "lora", 1, 1024, 16, 80) == "1 (DDP)"
    assert plan.smallest_set(m, "kd_lora", 1, 1024, 16, 80) == "> 64"  # an unsharded 131 GiB teacher
    with pytest.raises(ValueError, match="Unknown method"):
        plan.healing_memory(m, "full", "ddp", 1, 1, 1024, 16)


def test_report_written(tmp_path):
    out = tmp_path / "plan.md"
    plan.main(["--micro-batch", "2", "--seq-len", "512", "--out", str(out)])
    text = out.read_text()
    assert "--micro-batch 2 --seq-len 512" in text
    assert "| parameters | 1,235,814,400 | 8,030,261,248 | 70,553,706,496 |" in text
    assert "`mistral-7b.yaml` (Mistral-7B-v0.1, lora, 4 x 2048, r=64)" in text  # read from the preset


def test_hand_computed_sequential_pruning_peak():
    m8 = plan.MODELS["8B"]
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # 218,103,808 projection weights
    stats = 14336**2 * 8 + 2 * 8 * 4096 * 14336 + 2 * 32768 * 4096 * 2 + 2 * layer
    streamed = 2 * (2 * 128256 * 4096 + 4096 + layer + 2 * 4096) + stats
    assert plan.sequential_pruning_peak(m8, 32768, streamed=True) == streamed / 2**30
    assert plan.sequential_pruning_peak(m8, 32768, streamed=False) == (2 * 8_030_261_248 + stats) / 2**30
    assert plan.sequential_pruning_peak(m8, 32768, streamed=True) < 6  # ~5.7 GiB against ~19 GiB


def test_hand_computed_hidden_pruning_peak():
    m8 = plan.MODELS["8B"]
    assert plan.hidden_kept(m8, 10) == 3680  # 4096 - 409 = 3687, down to a multiple of 32 heads
    assert plan.hidden_kept(m8, 25) == 3072
    kept, layer = 3680, 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    stats = 8 * (4096 * kept + kept * kept)  # one norm's C and G
    outputs = 4096 + 2 * 1024 + 2 * 14336  # q, k, v, gate, up rows
    solve = 8 * 4096 * (4096 + 3 * kept)  # 4096 rows at a time
    memory = 2 * 8_030_261_248 + 65 * stats + 32 * 8 * kept * outputs + 8 * 128256 * kept + solve
    assert plan.hidden_pruning_peak(m8, 32768, 10, streamed=False) == memory / 2**30
    outer = 2 * (2 * 128256 * 4096 + 4096)
    buffer = 2 * 32768 * 4096 * 2
    blocks = outer + 2 * (layer + 2 * 4096) + buffer + 2 * stats + 2 * kept * outputs + solve
    head = outer + buffer + stats + solve + 2 * 128256 * kept
    phases = plan.hidden_streamed_phases(m8, 32768, 10)
    assert phases == {"blocks": blocks / 2**30, "lm_head": head / 2**30}
    assert plan.hidden_pruning_peak(m8, 32768, 10, streamed=True) == max(blocks, head) / 2**30
    assert plan.hidden_streamed_phases(plan.MODELS["1B"], 32768, 10)["lm_head"] == 0  # tied: no head refit
