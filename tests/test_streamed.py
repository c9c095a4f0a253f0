"""Streamed pruning of a checkpoint: one block resident, the same model as in-memory sequential pruning."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import as_batches, save_pruned_model, streamed
from optipfair_train.pruning.io import MANIFEST_NAME
from optipfair_train.pruning.streamed import prune_checkpoint

IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12], [9, 9, 30, 31, 32, 70, 71, 4]])


def _batches(n=3, rows=4, seq=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(3, 100, (rows, seq), generator=g)} for _ in range(n)]
    batches[0]["attention_mask"] = torch.ones(rows, seq, dtype=torch.long)
    batches[0]["attention_mask"][0, 30:] = 0  # padding in one row: masked tokens must not count
    return as_batches(batches)


def _source(tmp_path, family="llama", shard="100KB"):
    """A tiny model saved in several safetensors shards, plus a tokenizer-like file that must be copied."""
    model = make_tiny_model(family)
    folder = tmp_path / "source"
    model.save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return folder


def _in_memory(folder, out, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prune_model(
        model, dataloader=_batches(), reconstruct=True, sequential=True, show_progress=False, **kwargs
    )
    save_pruned_model(model, out)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("llama", dict(pruning_type="MLP_GLU", neuron_selection_method="activation", pruning_percentage=25)),
        ("llama-tied", dict(pruning_type="MLP", neuron_selection_method="MAW", pruning_percentage=50)),
        ("opt", dict(pruning_type="MLP", neuron_selection_method="activation", pruning_percentage=25)),
        (
            "qwen2",
            dict(pruning_type="ATTENTION", neuron_selection_method="activation", pruning_percentage=50),
        ),
    ],
)
def test_streamed_result_equals_in_memory_sequential_pruning(tmp_path, family, kwargs):
    folder = _source(tmp_path, family)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    reference = _in_memory(folder, tmp_path / "memory", **kwargs)
    out = prune_checkpoint(folder, tmp_path / "streamed", _batches(), show_progress=False, **kwargs)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = reference.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)
    # the config describes the real shapes, the manifest the same layers as the in-memory save
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    memory_manifest = json.loads((tmp_path / "memory" / MANIFEST_NAME).read_text())
    assert manifest["layers"] == memory_manifest["layers"]
    assert (
        manifest["parameters"]
        == memory_manifest["parameters"]
        < sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    )
    assert manifest["history"][-1]["streamed"] is True
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) == get_adapter(reloaded).num_layers + 1  # one shard per block + outer


def test_only_one_block_is_resident_while_pruning(tmp_path, monkeypatch):
    folder = _source(tmp_path)
    resident_at_load = []
    load = streamed._BlockStream.load

    def counting_load(self, i):
        resident = [
            j
            for j, b in enumerate(self.adapter.layers)
            if any(p.device.type != "meta" for p in b.parameters())
        ]
        resident_at_load.append(resident)
        return load(self, i)

    monkeypatch.setattr(streamed._BlockStream, "load", counting_load)
    prune_checkpoint(folder, tmp_path / "out", _batches(), pruning_percentage=25, show_progress=False)
    assert resident_at_load == [[], [], [], []]  # every block was written out before the next was read


def test_a_failure_midway_leaves_no_output_folder(tmp_path, monkeypatch):
    folder = _source(tmp_path)
    done = streamed._BlockStream.done

    def failing_done(self, i, block):
        if i == 2:
            raise RuntimeError("disk full")
        return done(self, i, block)

    monkeypatch.setattr(streamed._BlockStream, "done", failing_done)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_checkpoint(folder, tmp_path / "out", _batches(), pruning_percentage=25, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    folder = _source(tmp_path)
    cases = [
        (dict(pruning_type="DEPTH"), "supports pruning_type"),
        (dict(neuron_selection_method="hybrid"), "sequential=True scores each layer"),
        (dict(pruning_percentage=150), "pruning_percentage"),
        (dict(pruning_type="ATTENTION", neuron_selection_method="taylor"), "accepts the methods"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prune_checkpoint(folder, tmp_path / "out", _batches(), show_progress=False, **kwargs)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        prune_checkpoint(folder, busy, _batches(), show_progress=False)
    with pytest.raises(ValueError, match="must differ"):
        prune_checkpoint(folder, folder, _batches(), show_progress=False)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no safetensors weights.*pytorch_model.bin"):
        prune_checkpoint(empty, tmp_path / "out", _batches(), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "no-weights", "source"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_gemma2_mixed_layer_types_are_refused(tmp_path):
    folder = _source(tmp_path, "gemma2")
    with pytest.raises(ValueError, match="mixes layer types"):
        prune_checkpoint(folder, tmp_path / "out", _batches(), pruning_percentage=25, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_cli_streamed_prune_equals_the_cli_in_memory_sequential_prune(tmp_path, tokenizer, capsys):
    from optipfair_train.cli import main

    folder = _source(tmp_path)
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
        "MLP",
        "--pruning-percentage",
        "25",
        "--no-progress",
        "--method",
        "activation",
    ]
    assert main([*common, "--streamed", "--output-path", str(tmp_path / "streamed")]) == 0
    assert "one block in memory at a time" in capsys.readouterr().out
    assert main([*common, "--reconstruct", "--sequential", "--output-path", str(tmp_path / "memory")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.up_proj.weight"].shape[0] == 96

    assert (
        main([*common, "--streamed", "--target-parameters", "1000", "--output-path", str(tmp_path / "x")])
        == 2
    )
    assert "drop --target-parameters" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
