"""Model-family adapters: the only place that knows where layers, MLPs, attention and norms live.

Every other module asks an adapter for ``layers``, ``mlp(i)``, ``attention(i)`` or ``input_norm(i)``
and never spells attribute names such as ``model.model.layers[i].mlp.gate_proj`` itself. Adding a
family is one :class:`Family` entry in :data:`FAMILIES` plus one tiny-config test case.

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

from torch import nn

__all__ = [
    "Family",
    "FAMILIES",
    "ModelAdapter",
    "MLPParts",
    "AttentionParts",
    "get_adapter",
    "supported_model_types",
    "UnsupportedModelError",
]


class UnsupportedModelError(ValueError):
    """Raised for a model whose family has no adapter."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its parts (attribute paths, relative to the causal-LM model)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    mlp: str = "mlp"
    gate: str | None = "gate_proj"  # None for a plain (non-GLU) MLP
    up: str = "up_proj"
    down: str = "down_proj"
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    input_norm: str = "input_layernorm"

    @property
    def is_glu(self) -> bool:
        return self.gate is not None


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("gemma", ("gemma",)),
    Family("gemma2", ("gemma2",)),
)


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values that have an adapter."""
    return sorted(t for f in FAMILIES for t in f.model_types)


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
        return self.up.weight.shape[0]

    @property
    def width_linears(self) -> list[nn.Module]:
        """Linears whose output rows are intermediate neurons (gate, up)."""
        return [m for m in (self.gate, self.up) if m is not None]


@dataclass
class AttentionParts:
    """The projections of one attention block."""

    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the causal-LM module under a PEFT wrapper (the one that owns ``config`` and layers)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


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

    def _part(self, layer_idx: int, path: str) -> nn.Module:
        return attrgetter(path)(self.layers[layer_idx])

    def mlp(self, layer_idx: int) -> MLPParts:
        f = self.family
        module = self._part(layer_idx, f.mlp)
        return MLPParts(
            module=module,
            gate=attrgetter(f.gate)(module) if f.gate else None,
            up=attrgetter(f.up)(module),
            down=attrgetter(f.down)(module),
        )

    def attention(self, layer_idx: int) -> AttentionParts:
        f = self.family
        module = self._part(layer_idx, f.attention)
        get = lambda name: attrgetter(name)(module)  # noqa: E731
        return AttentionParts(module=module, q=get(f.q), k=get(f.k), v=get(f.v), o=get(f.o))

    def input_norm(self, layer_idx: int) -> nn.Module:
        return self._part(layer_idx, self.family.input_norm)

    def intermediate_sizes(self) -> list[int]:
        return [self.mlp(i).intermediate_size for i in range(self.num_layers)]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for ``model`` (a causal LM, optionally PEFT-wrapped).

    Raises:
        UnsupportedModelError: naming the supported families, when ``model`` belongs to none of them.

    Example:
        >>> adapter = get_adapter(model)  # doctest: +SKIP
        >>> adapter.mlp(0).gate.weight.shape  # doctest: +SKIP
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
                    f"({family.layers}[i].{family.mlp}); only causal-LM heads (AutoModelForCausalLM) are supported"
                ) from err
            return adapter
    raise UnsupportedModelError(
        f"Unsupported model {type(inner).__name__} (model_type={model_type!r}). "
        f"Supported model types: {', '.join(supported_model_types())}."
    )
