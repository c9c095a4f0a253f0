"""Saving and loading pruned models, with a pruning manifest beside the weights.

A pruned model's config records its real shapes: ``intermediate_size``, ``num_attention_heads`` and
``num_key_value_heads`` when every layer is alike (plain ``AutoModelForCausalLM.from_pretrained``
reloads it), plus ``layer_intermediate_sizes`` / ``layer_num_attention_heads`` /
``layer_num_key_value_heads`` when they differ per layer (only :func:`load_pruned_model` builds that,
with no remote code).
``config.pruning_history`` lists every pruning event, so it survives any ``save_pretrained``.

Example:
    >>> save_pruned_model(model, "out", tokenizer=tokenizer)  # doctest: +SKIP
    >>> model = load_pruned_model("out")  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from .heads import HeadPlan, apply_head_plan
from .width import apply_width_plan

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "record_pruning_event",
    "pruning_manifest",
    "save_pruned_model",
    "load_pruned_model",
    "write_error",
    "disk_full",
    "check_saved_weights",
]

MANIFEST_NAME = "pruning_manifest.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TMP_PREFIX = ".tmp-"
# weight files of any save_pretrained layout: single or sharded, safetensors or torch, and their index
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
_DISK_FULL_MARKS = ("No space left", "StorageFull", "inline_container", "unexpected pos")
_LAYER_LISTS = ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads")
# weight name parts -> the config key (and its per-layer list) that sets the pruned dimension
_SIZE_KEYS = (
    (("mlp.", "fc1", "fc2"), "intermediate_size", "layer_intermediate_sizes"),
    (("k_proj", "v_proj"), "num_key_value_heads", "layer_num_key_value_heads"),
    (("q_proj", "o_proj", "self_attn.dense", "out_proj"), "num_attention_heads", "layer_num_attention_heads"),
)


def record_pruning_event(model: torch.nn.Module, event: dict[str, Any]) -> None:
    """Append one JSON-serialisable event to ``model.config.pruning_history``."""
    config = unwrap_model(model).config
    history = list(getattr(config, "pruning_history", None) or [])
    history.append(json.loads(json.dumps(event)))
    config.pruning_history = history


def pruning_manifest(model: torch.nn.Module) -> dict[str, Any]:
    """What was pruned and what is left: history, per-layer sizes and parameter count.

    Example:
        >>> pruning_manifest(model)["layers"][0]["intermediate_size"]  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    config = adapter.config
    layers = []
    for i, width in enumerate(adapter.intermediate_sizes()):
        n_q, n_kv, head_dim = adapter.head_counts(i)
        layers.append(
            {
                "index": i,
                "intermediate_size": width,
                "num_attention_heads": n_q,
                "num_key_value_heads": n_kv,
                "head_dim": head_dim,
            }
        )
    shapes = {tuple(v for k, v in layer.items() if k != "index") for layer in layers}
    return {
        "format": "optipfair-train pruning manifest",
        "version": 1,
        "model_type": config.model_type,
        "base_model": getattr(config, "_name_or_path", None) or None,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "uniform": len(shapes) == 1,
        "layers": layers,
        "parameters": count_parameters(model),
        "history": list(getattr(config, "pruning_history", None) or []),
    }


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (from Python, torch or safetensors) reports a full disk.

    Example:
        >>> disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
        True
    """
    return getattr(err, "errno", None) == errno.ENOSPC or any(mark in str(err) for mark in _DISK_FULL_MARKS)


def write_error(path: Path, err: BaseException) -> OSError:
    """An ``OSError`` naming ``path`` and the real cause of a failed write (a full disk said plainly).

    torch and safetensors report a full disk in their own words (``[enforce fail at
    inline_container.cc:...] unexpected pos``, ``StorageFull``); this says it.

    Example:
        >>> str(write_error(Path("out"), OSError(28, "No space left on device")))  # doctest: +SKIP
        'No space left on device at out (OSError: [Errno 28] No space left on device); ...'
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else "no details"
    cause = f"{type(err).__name__}: {text}"
    if disk_full(err):
        return OSError(
            errno.ENOSPC, f"No space left on device at {path} ({cause}); free space or choose another folder"
        )
    return OSError(f"Could not write {path} ({cause})")


def save_pruned_model(model: torch.nn.Module, output_dir: str | Path, tokenizer=None, **save_kwargs) -> Path:
    """``save_pretrained`` plus ``pruning_manifest.json`` (and the tokenizer, when given).

    Everything is written into a temporary folder first and moved into ``output_dir`` once whole, so a
    failure part-way (a full disk) leaves ``output_dir`` as it was; weight files of an earlier save with
    another layout (shards and their index, or a single file) are removed, other files are kept.

    Raises:
        OSError: the write failed; the message names ``output_dir`` and the cause.

    Example:
        >>> save_pruned_model(model, "pruned-model", tokenizer=tokenizer)  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir} is a file; save_pruned_model needs a folder (new or existing).")
    manifest = pruning_manifest(model)
    existed = output_dir.is_dir()
    # inside an existing folder (files are then moved up one by one); beside a new one (renamed whole)
    tmp = output_dir / f"{TMP_PREFIX}save" if existed else output_dir.with_name(TMP_PREFIX + output_dir.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        unwrap_model(model).save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    except (OSError, RuntimeError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(output_dir, err) from err
    if not existed:
        os.replace(tmp, output_dir)
    else:
        written = {entry.name for entry in tmp.iterdir()}
        for name in written:
            os.replace(tmp / name, output_dir / name)
        tmp.rmdir()
        for stale in output_dir.iterdir():
            if stale.name not in written and _WEIGHT_FILE.fullmatch(stale.name) and stale.is_file():
                logger.info("Removing %s, weights of an earlier save with another layout", stale)
                stale.unlink()
    logger.info("Saved pruned model (%s parameters) to %s", f"{manifest['parameters']:,}", output_dir)
    return output_dir


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of ``path``: the single file or the shards its index lists (never both)."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file() and index.is_file():
        raise ValueError(
            f"{path} holds both {WEIGHTS_NAME} and {INDEX_NAME}, written by two different saves; delete "
            "the older one (save_pruned_model never leaves both)."
        )
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is damaged (no readable weight_map: {err!r}).") from err
    elif single.is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (nor {INDEX_NAME}).")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(missing)}, listed in {INDEX_NAME}.")
    return [path / f for f in files]


def _saved_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor name in ``files`` with its shape and file, read from the headers only."""
    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    found[name] = (tuple(handle.get_slice(name).get_shape()), file)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} cannot be read ({err}): it is truncated or damaged.") from err
    return found


def _layer_lists(path: Path, config) -> dict[str, list[int]]:
    """The per-layer size lists of a pruned config, checked: positive integers, one per layer."""
    n = int(config.num_hidden_layers)
    lists = {}
    for name in _LAYER_LISTS:
        values = getattr(config, name, None)
        if values is None:
            continue
        if (
            not isinstance(values, list)
            or len(values) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
        ):
            raise ValueError(
                f"{path / 'config.json'}: {name} must list {n} positive integers (one per layer, "
                f"num_hidden_layers={n}), got {values!r}."
            )
        lists[name] = values
    if ("layer_num_attention_heads" in lists) != ("layer_num_key_value_heads" in lists):
        raise ValueError(
            f"{path / 'config.json'}: layer_num_attention_heads and layer_num_key_value_heads go together; "
            "only one is set."
        )
    return lists


def _carve(model: torch.nn.Module, lists: dict[str, list[int]]) -> None:
    """Cut every layer of a freshly built ``model`` to the saved per-layer sizes (values are replaced)."""
    if "layer_intermediate_sizes" in lists:
        apply_width_plan(model, {i: torch.arange(w) for i, w in enumerate(lists["layer_intermediate_sizes"])})
    if "layer_num_attention_heads" in lists:
        pairs = zip(lists["layer_num_attention_heads"], lists["layer_num_key_value_heads"], strict=True)
        apply_head_plan(
            model, {i: HeadPlan(torch.arange(q), torch.arange(kv)) for i, (q, kv) in enumerate(pairs)}
        )


def _size_key(name: str, lists: dict[str, list[int]]) -> tuple[str, int] | None:
    """The config key that sets the shape of weight ``name`` (``None`` when it is not a pruned size)."""
    layer = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    i = int(layer.group(1)) if layer else 0
    for parts, key, per_layer in _SIZE_KEYS:
        if any(part in name for part in parts):
            return (f"{per_layer}[{i}]", lists[per_layer][i]) if per_layer in lists else (key, -1)
    return None


def _mismatch(config, lists, name: str, saved: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """Which config key disagrees with weight ``name``, with both numbers, when it can be told."""
    found = _size_key(name, lists)
    dims = [d for d in range(min(len(saved), len(expected))) if saved[d] != expected[d]]
    if found is None or len(dims) != 1:
        return ""
    key, listed = found
    wanted = listed if listed > 0 else getattr(config, key, None)
    if not isinstance(wanted, int) or wanted <= 0 or expected[dims[0]] % wanted:
        return ""
    unit = expected[dims[0]] // wanted  # 1 for MLP neurons, head_dim for heads
    return f"config.json says {key}={wanted}, the weights hold {saved[dims[0]] / unit:g}: "


def _check_weights(path: Path, config, model: torch.nn.Module, lists: dict[str, list[int]]) -> list[Path]:
    """Refuse weights that do not fill ``model`` exactly: a missing, unexpected or misshapen tensor."""
    files = _weight_files(path)
    saved = _saved_shapes(files)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    blocks = {m.group(1) for n in saved for m in [re.search(r"\.(?:layers|h)\.(\d+)\.", n)] if m}
    depth = (
        f" (config.json says num_hidden_layers={config.num_hidden_layers}, the weights hold {len(blocks)} blocks)"
        if blocks and len(blocks) != config.num_hidden_layers
        else ""
    )
    for name, shape in expected.items():
        if name not in saved and name not in tied:
            raise ValueError(f"{path}: the weights have no {name}{depth}; config.json and weights disagree.")
        if name in saved and saved[name][0] != shape:
            hint = _mismatch(config, lists, name, saved[name][0], shape)
            raise ValueError(
                f"{saved[name][1]}: {hint}{name} is {list(saved[name][0])}, config.json makes it {list(shape)}."
            )
    unexpected = [name for name in saved if name not in expected]
    if unexpected:
        raise ValueError(
            f"{saved[unexpected[0]][1]}: {unexpected[0]} (and {len(unexpected) - 1} more) is not part of the "
            f"model config.json describes{depth}."
        )
    return files


def check_saved_weights(path: str | Path) -> None:
    """Refuse a folder whose safetensors weights do not fill the model its config.json describes.

    Checked on an empty (meta-device) model: nothing is loaded. The ``ValueError`` names the file and
    the first disagreement (a missing or extra tensor, or the config key and both numbers of a shape).

    Example:
        >>> check_saved_weights("pruned-model")  # doctest: +SKIP
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    lists = _layer_lists(path, config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _carve(skeleton, lists)
    _check_weights(path, config, skeleton, lists)


def load_pruned_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", **from_pretrained_kwargs
) -> torch.nn.Module:
    """Load any model saved by this package, including per-layer (non-uniform) pruned ones, strictly.

    The weights must fill the model config.json describes exactly (no tensor missing, none left over,
    every shape equal), or a ``ValueError`` names the file and the first disagreement: nothing is
    initialised at random and nothing is dropped. Uniform models then go through
    ``AutoModelForCausalLM.from_pretrained``; per-layer ones are built from the config, reshaped layer by
    layer and filled from the safetensors files.

    Example:
        >>> model = load_pruned_model("pruned-model")  # doctest: +SKIP
    """
    from transformers.initialization import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    lists = _layer_lists(path, config)
    if not lists:  # the shapes come from config.json alone
        check_saved_weights(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs).to(device)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    _carve(model, lists)
    state: dict[str, torch.Tensor] = {}
    for file in _check_weights(path, config, model, lists):
        state.update(load_file(file))
    model.load_state_dict(state, strict=False)  # strict up to tied weights, checked above
    model.tie_weights()
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.to(device).eval()
