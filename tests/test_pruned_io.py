"""Saving and loading pruned folders strictly: a config that disagrees with its weights, a damaged or
stale weight file and a full disk are errors naming the file and the cause, never a half-random model."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from conftest import make_char_tokenizer, make_tiny_model

from optipfair_train import load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import get_adapter
from optipfair_train.models import load_model_and_tokenizer

IDS = torch.tensor([[5, 17, 30, 42, 8, 61, 3, 77]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def uniform(tmp_path) -> tuple[Path, torch.nn.Module]:
    """A llama whose MLPs were pruned to 90 of 128 neurons in every layer, saved (4 layers, 2 KV heads)."""
    model = make_tiny_model("llama")
    prune_model(model, neuron_selection_method="MAW", pruning_percentage=30, show_progress=False)
    assert get_adapter(model).intermediate_sizes() == [90] * 4
    return save_pruned_model(model, tmp_path / "uniform"), model


def _edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "layers, message",
    [
        # one block more than saved: today block 4 would be initialised at random
        (
            5,
            "no model.layers.4.self_attn.q_proj.weight (config.json says num_hidden_layers=5, the weights hold 4",
        ),
        # one block less: today block 3's weights would be dropped
        (
            3,
            "model.layers.3.input_layernorm.weight (and 8 more) is not part of the model config.json describes",
        ),
    ],
)
def test_a_layer_count_that_disagrees_with_the_weights_is_refused(uniform, layers, message):
    folder, _ = uniform
    _edit_config(folder, num_hidden_layers=layers)
    with pytest.raises(ValueError, match="config.json") as err:
        load_pruned_model(folder)
    assert message in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("intermediate_size", 128, "config.json says intermediate_size=128, the weights hold 90"),
        ("num_key_value_heads", 1, "config.json says num_key_value_heads=1, the weights hold 2"),
    ],
)
def test_a_size_that_disagrees_with_the_weights_names_the_key_and_both_numbers(uniform, key, value, message):
    folder, _ = uniform
    _edit_config(folder, **{key: value})
    with pytest.raises(ValueError) as err:
        load_pruned_model(folder)
    assert str(err.value).startswith(f"{folder / 'model.safetensors'}: {message}")


def test_per_layer_sizes_are_checked_against_the_weights(tmp_path):
    model = make_tiny_model("llama")
    prune_model(
        model, neuron_selection_method="L2", pruning_percentage=25, layer_indices=[3], show_progress=False
    )
    folder = save_pruned_model(model, tmp_path / "per-layer")
    torch.testing.assert_close(_logits(load_pruned_model(folder)), _logits(model), rtol=0, atol=0)
    _edit_config(folder, layer_intermediate_sizes=[128, 128, 128, 100])  # layer 3 holds 96
    with pytest.raises(ValueError, match=r"layer_intermediate_sizes\[3\]=100, the weights hold 96"):
        load_pruned_model(folder)
    _edit_config(folder, layer_intermediate_sizes=["a", 128, 128, 96])
    with pytest.raises(
        ValueError, match=r"config.json: layer_intermediate_sizes must list 4 positive integers"
    ):
        load_pruned_model(folder)


def test_a_truncated_weight_file_is_named(uniform, tmp_path):
    folder, _ = uniform
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"^{weights} cannot be read .*truncated or damaged"):
        load_pruned_model(folder)
    # an unpruned model folder, loaded by the package's model loader
    plain = tmp_path / "plain"
    make_tiny_model("llama").save_pretrained(plain)
    make_char_tokenizer().save_pretrained(plain)
    weights = plain / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"^{weights} cannot be read .*truncated or damaged"):
        load_model_and_tokenizer(plain)


def test_resaving_removes_the_weights_of_an_earlier_sharded_save(uniform):
    folder, model = uniform
    save_pruned_model(model, folder, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    (folder / "notes.txt").write_text("the user's own file")
    prune_model(model, pruning_type="DEPTH", num_layers_to_remove=1, layer_selection_method="last")
    save_pruned_model(model, folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
        "pruning_manifest.json",
    ]
    torch.testing.assert_close(_logits(load_pruned_model(folder)), _logits(model), rtol=0, atol=0)


def test_a_folder_with_both_weight_layouts_is_refused(uniform):
    folder, model = uniform
    shards = folder.with_name("shards")
    save_pruned_model(model, shards, max_shard_size="200KB")
    for path in shards.glob("model*"):
        shutil.copy(path, folder / path.name)  # what an older save_pretrained left behind
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
        load_pruned_model(folder)


def _full_disk(monkeypatch) -> None:
    """The weight writer writes half a file, then fails as on a full disk."""

    def write_half(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", write_half)


def test_a_full_disk_during_a_save_leaves_nothing_half_written(uniform, tmp_path, monkeypatch):
    folder, model = uniform
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    reference = _logits(load_pruned_model(folder))
    _full_disk(monkeypatch)
    prune_model(model, pruning_type="DEPTH", num_layers_to_remove=1, layer_selection_method="last")
    with pytest.raises(OSError, match=f"^.*No space left on device at {folder} ") as err:
        save_pruned_model(model, folder, tokenizer=make_char_tokenizer())
    assert err.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier save, untouched
    torch.testing.assert_close(_logits(load_pruned_model(folder)), reference, rtol=0, atol=0)
    new = tmp_path / "new"
    with pytest.raises(OSError, match=f"No space left on device at {new} "):
        save_pruned_model(model, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uniform"]  # no folder, no temporary left


def test_saving_onto_a_file_is_refused_before_writing(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=f"^{target} is a file; save_pruned_model needs a folder"):
        save_pruned_model(make_tiny_model("llama"), target)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"] and target.read_text() == "not a folder"
    )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num_hidden_layers": 5}, "missing keys model.layers.4.input_layernorm.weight and 8 more"),
        ({"num_hidden_layers": 3}, "unexpected keys model.layers.3.input_layernorm.weight and 8 more"),
        ({"intermediate_size": 100}, "config.json says intermediate_size=100, the weights hold 128"),
    ],
)
def test_an_unpruned_folder_whose_config_disagrees_is_refused(tmp_path, values, message):
    """The package's model loader (the pipeline's model_path) is as strict on a plain folder."""
    folder = tmp_path / "plain"
    make_tiny_model("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    _edit_config(folder, **values)
    with pytest.raises(ValueError, match=str(folder)) as err:
        load_model_and_tokenizer(folder)
    assert message in str(err.value)
