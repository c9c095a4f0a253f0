"""Prune a checkpoint larger than memory: one decoder block resident at a time, saved shard by shard.

:func:`prune_checkpoint` reads a saved model folder (safetensors, sharded or not) and writes the pruned
model to another folder without ever holding the whole model:

1. The model is built with accelerate's ``init_empty_weights``: every parameter on the ``meta`` device
   (no memory), buffers such as the rotary frequencies computed for real. Only the weights outside the
   blocks (embeddings, final norm, LM head) are read from the checkpoint.
2. The calibration batches go through the embeddings and are stopped at block 0
   (:func:`~optipfair_train.pruning.sequential.capture_block_inputs`).
3. Block by block (:func:`~optipfair_train.pruning.sequential.sequential_plan` with a block loader):
   read block ``i``'s tensors from the checkpoint, collect the Gram of the refit projection's input,
   choose the kept neurons (or heads), cut the block, refit ``down_proj`` (or ``o_proj``), run it to
   produce block ``i + 1``'s inputs, write it to its own shard, and put it back on ``meta``.
4. The config (real widths, the pruning event), ``model.safetensors.index.json``, the pruning manifest
   and the source's tokenizer and generation files are written; the folder appears under its final
   name only when complete (it is built as a hidden ``.<name>.partial`` folder beside it).

The arithmetic is that of ``prune_model(..., reconstruct=True, sequential=True)``, so the result is the
same model, weight for weight (tests/test_streamed.py). Resident at once: one block, the outer weights,
the calibration hidden states (tokens x hidden size, in and out), one Gram matrix (intermediate size
squared, float64) and the refit's float64 copy of ``down_proj``: for an 8B LLaMA in bf16 with 32k
calibration tokens about 5.7 GiB, against 18.3 GiB with the whole model resident (docs/memory-plan.md).
Computation runs on the CPU. The hidden axis (``pruning_type="HIDDEN"``) streams in two passes over
the checkpoint instead (:mod:`.streamed_hidden`).

Example:
    >>> prune_checkpoint("Llama-3.1-8B", "Llama-3.1-8B-mlp20", batches,
    ...                  pruning_percentage=20)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..analysis import count_parameters
from ..arch import get_adapter
from .api import pruning_request
from .calibration import as_batches
from .heads import head_keep_counts
from .io import MANIFEST_NAME, pruning_manifest, record_pruning_event
from .reconstruction import DEFAULT_DAMPING, check_calibration_size
from .sequential import check_same_layer_types, sequential_head_plan, sequential_mlp_plan
from .streamed_hidden import check_streamed_hidden_method, stream_hidden
from .surgery import record_attention_sizes, record_mlp_sizes
from .width import mlp_width_targets

logger = logging.getLogger(__name__)

__all__ = ["prune_checkpoint", "STREAMED_PRUNING_TYPES"]

STREAMED_PRUNING_TYPES = ("MLP", "MLP_GLU", "ATTENTION", "HIDDEN")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class _Checkpoint:
    """Reads single tensors from a safetensors checkpoint without loading the rest."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
            raise ValueError(
                f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json); "
                f"found {found or 'no weight files'}. Streamed pruning reads safetensors: re-save the model "
                "with save_pretrained(...) (safetensors is its default)."
            )
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ValueError(f"{folder}: the index names shards that are not there: {', '.join(missing)}.")
        self.folder, self.weight_map = folder, weight_map

    def read(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        names = list(names)
        absent = [n for n in names if n not in self.weight_map]
        if absent:
            raise ValueError(
                f"{self.folder}: the checkpoint lacks {absent[:5]} (and {max(0, len(absent) - 5)} more)."
            )
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(self.folder / file, "pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key).to(dtype)
        return out


class _BlockStream:
    """Loads block ``i`` from the checkpoint into the empty model, and writes it out when done."""

    def __init__(self, model: nn.Module, checkpoint: _Checkpoint, out: Path, dtype: torch.dtype):
        self.adapter = get_adapter(model)
        self.prefix = self.adapter.family.layers + "."
        self.checkpoint, self.out, self.dtype = checkpoint, out, dtype
        self.count = self.adapter.num_layers + 1  # one shard per block, one for the outer weights
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.count:05d}.safetensors"

    def load(self, i: int) -> nn.Module:
        block = self.adapter.layers[i]
        names = list(block.state_dict())
        state = self.checkpoint.read((f"{self.prefix}{i}.{n}" for n in names), self.dtype)
        stray = [k for k in self.checkpoint.weight_map if k.startswith(f"{self.prefix}{i}.")]
        unexpected = sorted(set(stray) - set(state))
        if unexpected:
            raise ValueError(
                f"Block {i} of the checkpoint holds tensors the model does not have: {unexpected[:5]}."
            )
        block.load_state_dict({n: state[f"{self.prefix}{i}.{n}"] for n in names}, strict=True, assign=True)
        return block

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(k)
        save_file({n: t.contiguous() for n, t in tensors.items()}, self.out / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def done(self, i: int, block: nn.Module) -> None:
        self.write(i, {f"{self.prefix}{i}.{n}": t for n, t in block.state_dict().items()})
        block.to("meta")  # frees the block; its (pruned) shapes stay for the config


def _outer_weights(model: nn.Module, checkpoint: _Checkpoint, prefix: str, dtype: torch.dtype) -> None:
    """Load every weight outside the blocks, tie the embeddings, and check nothing is left empty."""
    wanted = [n for n in model.state_dict() if not n.startswith(prefix)]
    present = [n for n in wanted if n in checkpoint.weight_map]
    result = model.load_state_dict(checkpoint.read(present, dtype), strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(
            f"The checkpoint's outer weights do not fit the model: {result.unexpected_keys[:5]}."
        )
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if not n.startswith(prefix) and p.device.type == "meta"]
    if empty:
        raise ValueError(f"The checkpoint lacks weights the model needs outside its blocks: {empty[:5]}.")


def _unique_outer_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Outer tensors, each storage once (a tied LM head is restored by ``tie_weights`` on load)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def _check_output(source: Path, output: Path) -> None:
    if output.resolve() == source.resolve():
        raise ValueError(f"output_dir must differ from the source checkpoint ({source}).")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output_dir {output} exists and is not an empty folder; choose a new one.")


def prune_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    dataloader: Iterable[dict[str, torch.Tensor]],
    *,
    pruning_type: str = "MLP",
    neuron_selection_method: str | None = None,
    pruning_percentage: float | None = None,
    expansion_rate: float | None = None,
    expansion_divisor: int | None = None,
    head_granularity: str = "group",
    layer_indices: Sequence[int] | None = None,
    damping: float = DEFAULT_DAMPING,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Prune the checkpoint folder ``source`` block by block into ``output_dir``; returns ``output_dir``.

    Same result as loading the model, ``prune_model(model, pruning_type, ..., dataloader=dataloader,
    reconstruct=True, sequential=True)`` and ``save_pruned_model``, with one block in memory at a time
    (see the module docstring). Uniform widths reload with plain ``from_pretrained``.

    Args:
        source: a local folder saved by ``save_pretrained`` (safetensors; for a hub model, download it
            first, e.g. ``huggingface_hub.snapshot_download``).
        output_dir: a new (or empty) folder; a failed run leaves nothing there.
        dataloader: calibration batches (dicts with ``input_ids`` and ``attention_mask``).
        pruning_type: ``MLP`` / ``MLP_GLU`` (width, ``down_proj`` refit), ``ATTENTION`` (heads,
            ``o_proj`` refit) or ``HIDDEN`` (residual channels of the whole model, RMSNorm families,
            refit of the stream's readers: the same model as ``prune_model(model, "HIDDEN",
            reconstruct=True)``, in two passes over the checkpoint; :mod:`.streamed_hidden`).
        neuron_selection_method: a weight-only scorer or ``activation`` for MLP; ``L2``, ``activation``
            or ``random`` for ATTENTION (they need only the layer's own statistics); ``activation``,
            ``activation_l2`` or ``L2`` for HIDDEN. Default: the requests' default with sequential
            statistics (``activation``).
        pruning_percentage / expansion_rate / expansion_divisor: the width (or head) target, as in
            ``prune_model``; default 10% for MLP and HIDDEN (kept width rounded down to a multiple of
            ``expansion_divisor``, default the head count), 25% for ATTENTION.
        head_granularity / layer_indices / damping / seed: as in ``prune_model``.
        dtype: compute and save dtype (default: the checkpoint's ``dtype`` in its config, else float32).

    Example:
        >>> prune_checkpoint("my-model", "my-model-pruned", batches, pruning_percentage=20)  # doctest: +SKIP
    """
    source, output = Path(source), Path(output_dir)
    if pruning_type not in STREAMED_PRUNING_TYPES:
        raise ValueError(
            f"Streamed pruning supports pruning_type {', '.join(STREAMED_PRUNING_TYPES)}, got {pruning_type!r} "
            "(DEPTH on a checkpoint: load it with device_map and use prune_model)."
        )
    if pruning_type == "HIDDEN":
        check_streamed_hidden_method(neuron_selection_method)
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} is not a saved model folder (no config.json).")
    _check_output(source, output)
    config = AutoConfig.from_pretrained(source)
    if any(hasattr(config, k) for k in ("layer_intermediate_sizes", "layer_num_attention_heads")):
        raise ValueError(f"{source} was pruned to per-layer sizes; streamed pruning needs uniform layers.")
    checkpoint = _Checkpoint(source)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    batches = as_batches(dataloader, config.vocab_size)
    # the request applies every rule (scorer, its data, refit settings, defaults) once, as prune_model's
    request = pruning_request(
        pruning_type,
        calibrated=True,
        neuron_selection_method=neuron_selection_method,
        pruning_percentage=pruning_percentage,
        expansion_rate=expansion_rate,
        expansion_divisor=expansion_divisor,
        head_granularity=head_granularity,
        layer_indices=layer_indices,
        reconstruct=True,
        damping=damping,
        sequential=pruning_type != "HIDDEN",  # the hidden refit reads the unpruned model's activations
        seed=seed,
    )

    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    check_same_layer_types(adapter)
    request.check(model)
    event: dict[str, Any] = {
        "pruning_type": pruning_type,
        "parameters_before": count_parameters(model),
        **request.settings(),
        "streamed": True,
    }
    if pruning_type == "HIDDEN":
        check_calibration_size(batches, request.kept(model), damping)
    elif pruning_type == "ATTENTION":
        counts = head_keep_counts(model, request.pruning_percentage, head_granularity, layer_indices)
        n_q, _, head_dim = adapter.head_counts(0)
        check_calibration_size(batches, n_q * head_dim, damping)
    else:
        targets = mlp_width_targets(model, **request.target_arguments())
        check_calibration_size(batches, max(targets.values()), damping)

    partial = output.parent / f".{output.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run of this function
    partial.mkdir(parents=True)
    try:
        stream = _BlockStream(model, checkpoint, partial, dtype)
        _outer_weights(model, checkpoint, stream.prefix, dtype)
        progress = dict(show_progress=show_progress)
        blocks = dict(load_block=stream.load, block_done=stream.done, **progress)
        if pruning_type == "HIDDEN":
            event.update(stream_hidden(model, stream.load, stream.done, batches, request, **progress))
        elif pruning_type == "ATTENTION":
            plan, _ = sequential_head_plan(
                model,
                batches,
                request.method,
                counts,
                head_granularity,
                damping,
                seed=seed,
                **blocks,
            )
            record_attention_sizes(adapter)
            event.update(
                kept_query_heads={i: p.query_heads.tolist() for i, p in plan.items()},
                kept_kv_heads={i: p.kv_heads.tolist() for i, p in plan.items()},
            )
        else:
            sequential_mlp_plan(model, batches, request.method, targets, damping, seed=seed, **blocks)
            record_mlp_sizes(adapter)
            event.update(intermediate_sizes=adapter.intermediate_sizes())
        stream.write(stream.count - 1, _unique_outer_state(model, stream.prefix))
        event["parameters_after"] = count_parameters(model)
        record_pruning_event(model, event)
        model.config.save_pretrained(partial)
        index = {
            "metadata": {"total_size": stream.total_bytes},
            "weight_map": dict(sorted(stream.weight_map.items())),
        }
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (partial / MANIFEST_NAME).write_text(json.dumps(pruning_manifest(model), indent=2))
        for item in source.iterdir():  # tokenizer, generation config, chat template, licence ...
            if item.is_file() and item.name not in ("config.json", MANIFEST_NAME, *_WEIGHT_FILES):
                if not item.name.endswith((".safetensors", ".bin", ".pt")):
                    shutil.copy2(item, partial / item.name)
        if output.exists():
            output.rmdir()  # checked empty above
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info(
        "Streamed %s pruning: %s -> %s parameters, saved to %s",
        pruning_type,
        f"{event['parameters_before']:,}",
        f"{event['parameters_after']:,}",
        output,
    )
    return output
