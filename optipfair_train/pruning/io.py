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

import json
import logging
from pathlib import Path
from typing import Any

import torch
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
]

MANIFEST_NAME = "pruning_manifest.json"


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


def save_pruned_model(model: torch.nn.Module, output_dir: str | Path, tokenizer=None, **save_kwargs) -> Path:
    """``save_pretrained`` plus ``pruning_manifest.json`` (and the tokenizer, when given).

    Example:
        >>> save_pruned_model(model, "pruned-model", tokenizer=tokenizer)  # doctest: +SKIP
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = pruning_manifest(model)
    unwrap_model(model).save_pretrained(output_dir, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    (output_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    logger.info("Saved pruned model (%s parameters) to %s", f"{manifest['parameters']:,}", output_dir)
    return output_dir


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} has no safetensors weights ({', '.join(missing)} missing).")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def load_pruned_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu", **from_pretrained_kwargs
) -> torch.nn.Module:
    """Load any model saved by this package, including per-layer (non-uniform) pruned ones.

    Uniform models go through ``AutoModelForCausalLM.from_pretrained``; models whose config has
    ``layer_intermediate_sizes`` are built from the config, reshaped layer by layer and filled from
    the safetensors files, strictly (every weight must be present and of the right shape).

    Example:
        >>> model = load_pruned_model("pruned-model")  # doctest: +SKIP
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    widths = getattr(config, "layer_intermediate_sizes", None)
    query_heads = getattr(config, "layer_num_attention_heads", None)
    kv_heads = getattr(config, "layer_num_key_value_heads", None)
    if not widths and not query_heads:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs).to(device)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    n = get_adapter(model).num_layers
    for name, values in (("layer_intermediate_sizes", widths), ("layer_num_attention_heads", query_heads)):
        if values and len(values) != n:
            raise ValueError(f"{path}: config.{name} lists {len(values)} layers, the model has {n}.")
    # carve every layer down to its saved shape; the values are overwritten by the checkpoint below
    if widths:
        apply_width_plan(model, {i: torch.arange(w) for i, w in enumerate(widths)})
    if query_heads:
        apply_head_plan(
            model,
            {
                i: HeadPlan(torch.arange(q), torch.arange(kv))
                for i, (q, kv) in enumerate(zip(query_heads, kv_heads, strict=True))
            },
        )
    state = _state_dict_from(path)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match the pruned architecture "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})."
        )
    model.tie_weights()
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.to(device).eval()
