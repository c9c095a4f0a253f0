"""The hidden axis streamed over a checkpoint: one block resident, the same model as in-memory HIDDEN pruning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from test_streamed import IDS, _batches, _source
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.pruning import save_pruned_model, streamed
from optipfair_train.pruning.io import MANIFEST_NAME
from optipfair_train.pruning.streamed import prune_checkpoint


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "family, method",
    [
        ("llama", "activation"),  # untied head: refit too
        ("llama-tied", "activation_l2"),  # tied head: cut with the embedding, not refit
        ("qwen3", "activation"),  # per-head q/k norms, GQA
        ("gemma", "L2"),  # scaled embedding, 1 + w norms, tied; weight-only scores (one pass)
        ("qwen2", "activation"),  # q/k/v biases
    ],
)
def test_streamed_hidden_pruning_equals_in_memory_hidden_pruning(tmp_path, family, method):
    folder = _source(tmp_path, family)
    options = dict(pruning_percentage=25, neuron_selection_method=method)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    before = sum(p.numel() for p in reference.parameters())
    prune_model(reference, "HIDDEN", dataloader=_batches(), reconstruct=True, show_progress=False, **options)
    save_pruned_model(reference, tmp_path / "memory")
    out = prune_checkpoint(
        folder, tmp_path / "streamed", _batches(), pruning_type="HIDDEN", show_progress=False, **options
    )

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain reload
    assert reloaded.config.hidden_size == reference.config.hidden_size == 48  # 64 - 16, a multiple of 4 heads
    assert reloaded.config.rms_norm_eps == reference.config.rms_norm_eps
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    memory = json.loads((tmp_path / "memory" / MANIFEST_NAME).read_text())
    assert manifest["hidden_size"] == memory["hidden_size"] == 48
    assert manifest["parameters"] == memory["parameters"] < before
    event, memory_event = manifest["history"][-1], memory["history"][-1]
    assert event["streamed"] is True and event["pruning_type"] == "HIDDEN"
    assert event["kept_channels"] == memory_event["kept_channels"]
    assert event["parameters_after"] == memory_event["parameters_after"]
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'


def test_streamed_hidden_keeps_one_block_resident_and_reads_each_block_twice(tmp_path, monkeypatch):
    folder = _source(tmp_path, "llama")
    loads = []
    load = streamed._BlockStream.load

    def counting_load(self, i):
        resident = [
            j
            for j, b in enumerate(self.adapter.layers)
            if any(p.device.type != "meta" for p in b.parameters())
        ]
        loads.append((i, resident))
        return load(self, i)

    monkeypatch.setattr(streamed._BlockStream, "load", counting_load)
    prune_checkpoint(folder, tmp_path / "out", _batches(), pruning_type="HIDDEN", show_progress=False)
    # pass 1 (scores) then pass 2 (cut and refit), nothing else resident when a block is read
    assert loads == [(i, []) for i in (0, 1, 2, 3, 0, 1, 2, 3)]


def test_a_failure_in_the_second_pass_leaves_no_output_folder(tmp_path, monkeypatch):
    folder = _source(tmp_path, "llama")
    done = streamed._BlockStream.done

    def failing_done(self, i, block):
        if i == 2:
            raise RuntimeError("disk full")
        return done(self, i, block)

    monkeypatch.setattr(streamed._BlockStream, "done", failing_done)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_checkpoint(folder, tmp_path / "out", _batches(), pruning_type="HIDDEN", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no out, no .out.partial


def test_bad_hidden_input_is_refused_before_anything_is_written(tmp_path):
    folder = _source(tmp_path, "llama")
    opt = _source(tmp_path / "opt", "opt")
    cases = [
        (folder, dict(neuron_selection_method="pca"), "takes the methods activation, activation_l2, L2"),
        (folder, dict(neuron_selection_method="MAW"), "takes the methods"),
        (folder, dict(expansion_rate=50), "expansion_rate do\\(es\\) not apply to pruning_type='HIDDEN'"),
        (folder, dict(layer_indices=[0]), "layer_indices does not apply"),
        (folder, dict(pruning_percentage=100), "strictly between 0 and 100"),
        (folder, dict(pruning_percentage=95, expansion_divisor=8), "keeps 0 of 64 channels"),
        (folder, dict(pruning_percentage=10, expansion_divisor=6), "not a valid llama configuration"),
        (opt, dict(pruning_percentage=25), "uses LayerNorm"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune_checkpoint(
                source, tmp_path / "out", _batches(), pruning_type="HIDDEN", show_progress=False, **kwargs
            )
    few = [{"input_ids": torch.tensor([[5, 6, 7, 8]])}]  # 4 tokens for 48 kept channels, no damping
    with pytest.raises(ValueError, match="calibration"):
        prune_checkpoint(folder, tmp_path / "out", few, pruning_type="HIDDEN", damping=0, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt", "source"]


def test_cli_streamed_hidden_prune_equals_the_cli_in_memory_hidden_prune(tmp_path, tokenizer, capsys):
    from optipfair_train.cli import main

    folder = _source(tmp_path, "llama")
    tokenizer.save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    common = [
        "prune",
        "--model-path",
        str(folder),
        "--calibration-data",
        str(text),
        "--num-calibration-samples",
        "8",
        "--calibration-seq-len",
        "32",
        "--pruning-type",
        "HIDDEN",
        "--pruning-percentage",
        "25",
        "--no-progress",
        "--method",
        "activation",
    ]
    assert main([*common, "--streamed", "--output-path", str(tmp_path / "streamed")]) == 0
    assert "one block in memory at a time" in capsys.readouterr().out
    assert main([*common, "--reconstruct", "--output-path", str(tmp_path / "memory")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.embed_tokens.weight"].shape == (104, 48)


def test_a_bfloat16_checkpoint_streams_to_the_same_model_as_in_memory(tmp_path):
    # the streamed refit is stored in bfloat16 as it is solved; in memory it is cast when written
    folder = tmp_path / "source"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    options = dict(pruning_percentage=25, neuron_selection_method="activation")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    prune_model(reference, "HIDDEN", dataloader=_batches(), reconstruct=True, show_progress=False, **options)
    out = prune_checkpoint(
        folder, tmp_path / "streamed", _batches(), pruning_type="HIDDEN", show_progress=False, **options
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert got["lm_head.weight"].dtype == torch.bfloat16 and got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
