"""Activation capture through the model-family adapters, streaming by default.

The primitive is :func:`capture_activations`: a context manager that registers forward hooks on the
modules named by layer keys and hands each captured tensor, with the batch's attention mask, to a
user *reducer* ``reducer(key, tensor, attention_mask) -> None``. The reducer keeps only what it
needs (a per-layer scalar, per-neuron running sums...), so nothing of shape [batch, seq, dim] is
stored unless the reducer stores it. Hooks are removed when the block exits, also on exceptions.

Layer keys are OptiPFair's: ``attention_output_layer_N``, ``mlp_output_layer_N``,
``gate_proj_layer_N``, ``up_proj_layer_N``, ``down_proj_layer_N`` (outputs of those modules),
``input_norm_layer_N`` (output of the block's input norm), plus ``down_proj_input_layer_N``: the
MLP intermediate activation that enters ``down_proj`` ([B, S, intermediate]), the unit that width
pruning removes. For plain (non-GLU) MLPs ``up_proj``/``down_proj`` name the adapter's ``up``/``down``
projections (``fc1``/``fc2``, GPT-2's ``c_fc``/``c_proj``) and there is no ``gate_proj`` key.

Example:
    >>> sums = {}
    >>> def reducer(key, x, mask):
    ...     sums[key] = sums.get(key, 0) + (x * mask[..., None]).sum((0, 1))
    >>> with capture_activations(model, ["down_proj_input_layer_0"], reducer):  # doctest: +SKIP
    ...     model(**batch)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from optipfair_train.arch import ModelAdapter, get_adapter
from optipfair_train.names import ALL_COMPONENTS, COMPONENTS

__all__ = [
    "COMPONENTS",
    "ALL_COMPONENTS",
    "Reducer",
    "layer_key",
    "parse_layer_key",
    "available_layer_keys",
    "select_layer_keys",
    "check_layer_keys",
    "capture_activations",
    "NeuronStats",
    "store_activations",
    "eval_mode",
    "model_device",
]

logger = logging.getLogger(__name__)

Reducer = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]


def layer_key(component: str, layer_idx: int) -> str:
    """The key of ``component`` in layer ``layer_idx``.

    Example:
        >>> layer_key("mlp_output", 3)
        'mlp_output_layer_3'
    """
    if component not in ALL_COMPONENTS:
        raise ValueError(f"Unknown component {component!r}; choose from {', '.join(ALL_COMPONENTS)}")
    return f"{component}_layer_{layer_idx}"


def parse_layer_key(key: str) -> tuple[str, int]:
    """Split a layer key into (component, layer index).

    Example:
        >>> parse_layer_key("down_proj_input_layer_12")
        ('down_proj_input', 12)
    """
    component, sep, idx = key.rpartition("_layer_")
    if not sep or component not in ALL_COMPONENTS or not idx.isdigit():
        raise KeyError(
            f"Malformed layer key {key!r}: expected '<component>_layer_<N>' with component in "
            f"{', '.join(ALL_COMPONENTS)}"
        )
    return component, int(idx)


def _components(components: Sequence[str] | str | None) -> tuple[str, ...]:
    if components is None:
        return COMPONENTS
    if isinstance(components, str):
        components = [components]
    unknown = [c for c in components if c not in ALL_COMPONENTS]
    if unknown:
        raise ValueError(f"Unknown component(s) {unknown}; choose from {', '.join(ALL_COMPONENTS)}")
    return tuple(components)


def available_layer_keys(model: nn.Module, components: Sequence[str] | str | None = None) -> list[str]:
    """All layer keys of ``model`` for ``components`` (default: OptiPFair's six), ordered by component.

    ``gate_proj`` keys exist only for GLU families.

    Example:
        >>> available_layer_keys(model, "mlp_output")  # doctest: +SKIP
        ['mlp_output_layer_0', 'mlp_output_layer_1']
    """
    adapter = get_adapter(model)
    glu = adapter.family.is_glu
    return [
        layer_key(c, i)
        for c in _components(components)
        if glu or c != "gate_proj"
        for i in range(adapter.num_layers)
    ]


def select_layer_keys(
    model: nn.Module,
    layers: str | Sequence[int] = "first_middle_last",
    components: Sequence[str] | str | None = None,
) -> list[str]:
    """Layer keys for a layer selection: ``"first_middle_last"``, ``"all"`` or a list of layer indices.

    Raises:
        ValueError: for an unknown selection or a layer index out of range.

    Example:
        >>> select_layer_keys(model, [0, 2], "mlp_output")  # doctest: +SKIP
        ['mlp_output_layer_0', 'mlp_output_layer_2']
    """
    n = get_adapter(model).num_layers
    if isinstance(layers, str):
        if layers == "all":
            indices = list(range(n))
        elif layers == "first_middle_last":
            indices = sorted({0, n // 2, n - 1})
        else:
            raise ValueError(
                f"Unknown layer selection {layers!r}: use 'first_middle_last', 'all' or a list of ints"
            )
    else:
        indices = [int(i) for i in layers]
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"Layer indices {bad} out of range: the model has layers 0..{n - 1}")
    wanted = set(indices)
    return [k for k in available_layer_keys(model, components) if parse_layer_key(k)[1] in wanted]


def check_layer_keys(model: nn.Module, keys: Sequence[str]) -> None:
    """Raise ``KeyError`` naming the available keys if any of ``keys`` does not exist in ``model``.

    Example:
        >>> check_layer_keys(model, ["mlp_output_layer_0"])  # doctest: +SKIP
    """
    available = available_layer_keys(model, ALL_COMPONENTS)
    unknown = [k for k in keys if k not in set(available)]
    if unknown:
        raise KeyError(f"Unknown layer key(s) {unknown}. Available keys: {', '.join(available)}")


def _hook_point(adapter: ModelAdapter, key: str) -> tuple[nn.Module, bool]:
    """(module, read_input) for a layer key; read_input means a pre-hook on the module's input."""
    component, i = parse_layer_key(key)
    if component == "attention_output":
        return adapter.attention(i).module, False
    if component == "input_norm":
        return adapter.input_norm(i), False
    mlp = adapter.mlp(i)  # projections come as the outermost module (a LoRA wrapper sees its delta)
    if component == "mlp_output":
        # A family whose MLP has no module of its own (OPT): the MLP's output is the down projection's.
        return (mlp.down if mlp.module is adapter.layers[i] else mlp.module), False
    part = {"gate_proj": mlp.gate, "up_proj": mlp.up, "down_proj": mlp.down, "down_proj_input": mlp.down}
    return part[component], component == "down_proj_input"


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture_activations(model: nn.Module, keys: Sequence[str], reducer: Reducer) -> Iterator[None]:
    """Call ``reducer(key, tensor, attention_mask)`` for every key on every forward pass in the block.

    ``tensor`` is the detached activation [B, S, dim] in the model's dtype (also for families that
    flatten it to [B*S, dim] internally); ``attention_mask`` is the [B, S] mask passed to the model's
    forward (cut to the last S positions when it is longer, as with a KV cache), or None when the
    forward had none. The hooks are removed on exit, also on exceptions.

    Raises:
        KeyError: for an unknown key (the message lists the available keys).

    Example:
        >>> seen = []
        >>> with capture_activations(model, ["mlp_output_layer_0"], lambda k, x, m: seen.append(x.shape)):  # doctest: +SKIP
        ...     model(**batch)
    """
    check_layer_keys(model, keys)
    adapter = get_adapter(model)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def grab_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def make_hook(key: str, read_input: bool):
        def hook(module, args, output=None):
            x = _first_tensor(args if read_input else output).detach()
            mask = state["mask"]
            if mask is not None and x.dim() == 2 and x.shape[0] % mask.shape[0] == 0:
                x = x.view(mask.shape[0], x.shape[0] // mask.shape[0], -1)  # OPT flattens [B*S, dim]
            if mask is not None:
                mask = mask[:, -x.shape[1] :] if x.dim() == 3 and mask.shape[1] >= x.shape[1] else None
            reducer(key, x, mask)

        return hook

    # The decoder always gets the mask as a keyword, however the user (or a PEFT wrapper) called the model.
    handles = [adapter.decoder.register_forward_pre_hook(grab_mask, with_kwargs=True)]
    try:
        for key in keys:
            module, read_input = _hook_point(adapter, key)
            hook = make_hook(key, read_input)
            handles.append(
                module.register_forward_pre_hook(hook) if read_input else module.register_forward_hook(hook)
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
        logger.debug("removed %d activation hooks", len(handles))


class NeuronStats:
    """Streaming reducer: masked per-neuron sum, sum of squares and token count per key and group.

    Set :attr:`group_ids` (a [B] long tensor, values < ``num_groups``) before each forward to split
    the statistics, e.g. group 0 for the first prompts of pairs and group 1 for the second prompts.
    Padding positions (mask 0) never count. Memory: ``num_groups x dim`` floats per key.

    Example:
        >>> stats = NeuronStats(num_groups=2)
        >>> with capture_activations(model, ["down_proj_input_layer_1"], stats):  # doctest: +SKIP
        ...     stats.group_ids = torch.tensor([0, 0, 1, 1])
        ...     model(**batch)
        >>> gap = (stats.mean("down_proj_input_layer_1")[0] - stats.mean("down_proj_input_layer_1")[1]).abs()  # doctest: +SKIP
    """

    def __init__(self, num_groups: int = 1):
        self.num_groups = num_groups
        self.group_ids: torch.Tensor | None = None
        self.sum: dict[str, torch.Tensor] = {}
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = x.float()
        w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(x.device, torch.float32)
        groups = self.group_ids
        if groups is None:
            groups = torch.zeros(x.shape[0], dtype=torch.long)
        groups = groups.to(x.device)
        if key not in self.sum:
            dim = x.shape[-1]
            for table in (self.sum, self.sum_sq):
                table[key] = torch.zeros(self.num_groups, dim, dtype=torch.float64, device=x.device)
            self.count[key] = torch.zeros(self.num_groups, dtype=torch.float64, device=x.device)
        self.sum[key].index_add_(0, groups, torch.einsum("bs,bsd->bd", w, x).double())
        self.sum_sq[key].index_add_(0, groups, torch.einsum("bs,bsd->bd", w, x * x).double())
        self.count[key].index_add_(0, groups, w.sum(1).double())

    def mean(self, key: str) -> torch.Tensor:
        """Per-group, per-neuron mean over the unmasked tokens seen: [num_groups, dim].

        Example:
            >>> stats.mean("down_proj_input_layer_1").shape  # doctest: +SKIP
            torch.Size([2, 1536])
        """
        return (self.sum[key] / self.count[key].clamp_min(1)[:, None]).float()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module).

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and under ``torch.no_grad`` for the block, then restore its mode.

    Example:
        >>> with eval_mode(model):  # doctest: +SKIP
        ...     model(**batch)
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def store_activations(
    model: nn.Module, inputs: dict[str, torch.Tensor], keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run one forward pass and return the full activations of ``keys`` as float32 CPU tensors [B, S, dim].

    Use it for a few prompts (figures); for statistics over many prompts write a reducer instead.

    Example:
        >>> acts = store_activations(model, {"input_ids": ids}, ["mlp_output_layer_0"])  # doctest: +SKIP
        >>> acts["mlp_output_layer_0"].shape  # doctest: +SKIP
        torch.Size([1, 7, 64])
    """
    stored: dict[str, torch.Tensor] = {}

    def keep(key: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        stored[key] = x.float().cpu()

    device = model_device(model)
    with eval_mode(model), capture_activations(model, keys, keep):
        model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    return stored
