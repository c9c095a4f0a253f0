"""Model-family adapters: the only place that knows where layers, MLPs, attention and norms live.

Every other module asks an adapter for ``layers``, ``mlp(i)``, ``attention(i)`` or ``input_norm(i)``
and never spells attribute names such as ``model.model.layers[i].mlp.gate_proj`` itself. Adding a
family is one :class:`Family` entry in :data:`FAMILIES` plus one tiny-config test case.

Projections may be ``nn.Linear`` (weight ``[out, in]``), GPT-2's ``Conv1D`` (weight ``[in, out]``) or
a PEFT LoRA layer wrapping either; :func:`weight_out_in` gives every one of them as ``[out, in]``.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> adapter = get_adapter(model)
    >>> adapter.family.name, adapter.num_layers, adapter.mlp(0).intermediate_size
    ('llama', 2, 128)
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "Family",
    "FAMILIES",
    "ModelAdapter",
    "MLPParts",
    "AttentionParts",
    "get_adapter",
    "supported_model_types",
    "unwrap_model",
    "is_conv1d",
    "weight_out_in",
    "UnsupportedModelError",
    "rms_norm_eps",
    "set_rms_norm_eps",
    "set_embedding_scale",
]


class UnsupportedModelError(ValueError):
    """Raised for a model whose family has no adapter."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its parts (attribute paths, relative to the causal-LM model).

    ``mlp=""`` means the projections sit on the decoder layer itself (OPT); ``gate=None`` marks a
    plain (non-GLU) MLP; ``q=k=v=None`` marks a fused query/key/value projection (GPT-2), which head
    pruning does not support. ``intermediate_key`` is the config field holding the MLP width.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attention: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    input_norm: str = "input_layernorm"
    intermediate_key: str = "intermediate_size"
    # hidden-dimension axis (RMSNorm families only): norms that read the residual stream, norms of a
    # sublayer's output before it is added (Gemma2), the final norm, whether norms apply ``1 + w``
    # whether the embedding is multiplied by ``sqrt(hidden_size)`` (Gemma), and whether q/k pass through
    # per-head RMSNorms built from the same ``rms_norm_eps`` (Qwen3's q_norm/k_norm)
    residual_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    output_norms: tuple[str, ...] = ()
    final_norm: str | None = "model.norm"
    norm_plus_one: bool = False
    scaled_embedding: bool = False
    qk_norm: bool = False

    @property
    def is_glu(self) -> bool:
        return self.gate is not None

    @property
    def separate_qkv(self) -> bool:
        return self.q is not None


_PLAIN = dict(gate=None, up="fc1", down="fc2", final_norm=None)  # LayerNorm: no hidden axis
_GEMMA = dict(norm_plus_one=True, scaled_embedding=True)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",), qk_norm=True),
    Family("gemma", ("gemma",), **_GEMMA),
    Family(
        "gemma2",
        ("gemma2",),
        residual_norms=("input_layernorm", "pre_feedforward_layernorm"),
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        **_GEMMA,
    ),
    Family("phi", ("phi",), o="dense", **_PLAIN),
    Family(
        "opt",
        ("opt",),
        layers="model.decoder.layers",
        mlp="",
        o="out_proj",
        input_norm="self_attn_layer_norm",
        intermediate_key="ffn_dim",
        **_PLAIN,
    ),
    Family(
        "gpt2",
        ("gpt2",),
        layers="transformer.h",
        attention="attn",
        gate=None,
        up="c_fc",
        down="c_proj",
        q=None,
        k=None,
        v=None,
        o="c_proj",
        input_norm="ln_1",
        intermediate_key="n_inner",
        final_norm=None,
    ),
)


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values that have an adapter."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (also under a LoRA wrapper): its weight is stored ``[in, out]``."""
    return isinstance(getattr(module, "base_layer", module), Conv1D)


def weight_out_in(module: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """``module``'s weight (or a tensor of the weight's shape, e.g. its gradient) laid out ``[out, in]``."""
    tensor = module.weight if tensor is None else tensor
    return tensor.t() if is_conv1d(module) else tensor


def out_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[0]


@dataclass
class MLPParts:
    """The projections of one MLP block. ``gate`` is None for a plain MLP.

    A projection may be a PEFT LoRA layer wrapping the Linear: its ``weight`` is the base weight.
    """

    module: nn.Module
    gate: nn.Module | None
    up: nn.Module
    down: nn.Module

    @property
    def intermediate_size(self) -> int:
        return out_features(self.up)

    @property
    def width_linears(self) -> list[nn.Module]:
        """Projections whose outputs are intermediate neurons (gate, up)."""
        return [m for m in (self.gate, self.up) if m is not None]


@dataclass
class AttentionParts:
    """The projections of one attention block (``q``/``k``/``v`` are None when fused)."""

    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the causal-LM module under a PEFT wrapper (the one that owns ``config`` and layers)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _get(module: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    return attrgetter(path)(module) if path else module


class ModelAdapter:
    """Uniform access to the parts of one model of a supported family."""

    def __init__(self, model: nn.Module, family: Family):
        self.model = unwrap_model(model)
        self.family = family

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return attrgetter(self.family.layers)(self.model)

    @property
    def decoder(self) -> nn.Module:
        """The module that owns ``layers`` (``model.model`` for LLaMA-style families)."""
        parent, _, _ = self.family.layers.rpartition(".")
        return attrgetter(parent)(self.model) if parent else self.model

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def mlp(self, layer_idx: int) -> MLPParts:
        return self.block_mlp(self.layers[layer_idx])

    def block_mlp(self, block: nn.Module) -> MLPParts:
        """The MLP parts of a decoder block module (e.g. a detached copy of ``layers[i]``)."""
        f = self.family
        module = _get(block, f.mlp)
        return MLPParts(
            module=module, gate=_get(module, f.gate), up=_get(module, f.up), down=_get(module, f.down)
        )

    def attention(self, layer_idx: int) -> AttentionParts:
        return self.block_attention(self.layers[layer_idx])

    def block_attention(self, block: nn.Module) -> AttentionParts:
        """The attention parts of a decoder block module."""
        f = self.family
        module = _get(block, f.attention)
        return AttentionParts(
            module=module, q=_get(module, f.q), k=_get(module, f.k), v=_get(module, f.v), o=_get(module, f.o)
        )

    def input_norm(self, layer_idx: int) -> nn.Module:
        return _get(self.layers[layer_idx], self.family.input_norm)

    @property
    def has_hidden_axis(self) -> bool:
        """True when residual channels can be removed exactly (RMSNorm families; see pruning/hidden.py)."""
        return self.family.final_norm is not None

    def block_norms(self, layer_idx: int) -> tuple[list[nn.Module], list[nn.Module]]:
        """``(residual_norms, output_norms)`` of one block: norms reading the residual stream, and
        norms of a sublayer's output before it is added to the stream (Gemma2's post-norms)."""
        layer = self.layers[layer_idx]
        f = self.family
        return [_get(layer, n) for n in f.residual_norms], [_get(layer, n) for n in f.output_norms]

    def final_norm(self) -> nn.Module:
        if self.family.final_norm is None:
            raise UnsupportedModelError(f"{self.family.name} has no RMSNorm final norm adapter.")
        return _get(self.model, self.family.final_norm)

    def intermediate_sizes(self) -> list[int]:
        return [self.mlp(i).intermediate_size for i in range(self.num_layers)]

    def head_counts(self, layer_idx: int) -> tuple[int, int, int]:
        """``(num_query_heads, num_kv_heads, head_dim)`` of one layer, read from its weights."""
        parts = self.attention(layer_idx)
        config = self.config
        head_dim = int(
            getattr(parts.module, "head_dim", 0) or config.hidden_size // config.num_attention_heads
        )
        if parts.q is None:  # fused qkv: plain multi-head attention
            return config.num_attention_heads, config.num_attention_heads, head_dim
        return out_features(parts.q) // head_dim, out_features(parts.k) // head_dim, head_dim


_EPS_ATTRIBUTES = ("variance_epsilon", "eps")  # LLaMA-style RMSNorm, Gemma-style RMSNorm


def rms_norm_eps(model: nn.Module) -> float:
    """The model's ``config.rms_norm_eps`` (every RMSNorm of the supported families is built from it)."""
    return float(unwrap_model(model).config.rms_norm_eps)


def set_rms_norm_eps(model: nn.Module, eps: float) -> None:
    """Set ``config.rms_norm_eps`` and the epsilon of every RMSNorm module, as a reload would build them."""
    inner = unwrap_model(model)
    inner.config.rms_norm_eps = eps
    for module in inner.modules():
        if type(module).__name__.endswith("RMSNorm"):
            for name in _EPS_ATTRIBUTES:
                if hasattr(module, name):
                    setattr(module, name, eps)


def set_embedding_scale(embedding: nn.Module, scale: float) -> None:
    """Set the ``sqrt(hidden_size)`` multiplier of a Gemma-style scaled embedding (buffer and init value)."""
    embedding.embed_scale.fill_(scale)
    embedding.scalar_embed_scale = scale


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model`` (a causal LM, optionally PEFT-wrapped).

    Raises:
        UnsupportedModelError: naming the supported families, when ``model`` belongs to none of them.

    Example:
        >>> adapter = get_adapter(model)  # doctest: +SKIP
        >>> adapter.mlp(0).up.weight.shape  # doctest: +SKIP
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            adapter = ModelAdapter(inner, family)
            try:
                adapter.mlp(0)
            except AttributeError as err:
                raise UnsupportedModelError(
                    f"{type(inner).__name__} has model_type {model_type!r} but not the expected layout "
                    f"({family.layers}[i]); only causal-LM heads (AutoModelForCausalLM) are supported"
                ) from err
            return adapter
    raise UnsupportedModelError(
        f"Unsupported model {type(inner).__name__} (model_type={model_type!r}). "
        f"Supported model types: {', '.join(supported_model_types())}."
    )
