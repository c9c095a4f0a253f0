"""Streaming statistics from calibration batches, for data-driven importance.

Nothing here stores a ``[batch, seq, dim]`` tensor beyond the batch being processed: every statistic
is a running sum per unit, masked by the attention mask so padding never counts. Under
``torch.distributed`` the sums are all-reduced, so every rank prunes the same units.

Example:
    >>> batches = [tokenizer(["some text"], return_tensors="pt")]  # doctest: +SKIP
    >>> sumsq = mlp_activation_sumsq(model, batches)  # {layer: tensor[intermediate]}  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arch import ModelAdapter, get_adapter
from ..data import check_token_ids

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationBatch",
    "as_batches",
    "input_sumsq",
    "mlp_activation_sumsq",
    "InputMoments",
    "mlp_input_statistics",
    "block_influence",
]

CalibrationBatch = dict[str, torch.Tensor]


def as_batches(dataloader: Iterable, vocab_size: int | None = None) -> list[CalibrationBatch]:
    """Validate calibration data and return it as a list of ``{"input_ids", "attention_mask"}`` dicts.

    Accepts any iterable (a ``DataLoader``, a list) of mappings with ``input_ids`` (``[B, S]``) and
    optionally ``attention_mask``; with ``vocab_size``, every token id must be below it. Validation
    happens before any weight is touched.

    Example:
        >>> as_batches([{"input_ids": torch.tensor([[1, 2, 3]])}])[0]["attention_mask"]
        tensor([[1, 1, 1]])
    """
    if dataloader is None:
        raise ValueError("Calibration data is required: pass a DataLoader of dicts with input_ids.")
    batches = []
    for i, batch in enumerate(dataloader):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                f"Calibration batch {i} is a {type(batch).__name__}; expected a dict (or BatchEncoding) with "
                "'input_ids' [batch, seq] and optionally 'attention_mask' (e.g. a tokenizer's output)."
            )
        input_ids = torch.as_tensor(batch["input_ids"])
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(
                f"Calibration batch {i}: input_ids must be a non-empty [batch, seq] tensor, "
                f"got shape {tuple(input_ids.shape)}."
            )
        if vocab_size is not None:
            check_token_ids(input_ids, vocab_size, f"Calibration batch {i}")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != input_ids.shape:
            raise ValueError(
                f"Calibration batch {i}: attention_mask shape {tuple(mask.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}."
            )
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    if not batches:
        raise ValueError("The calibration dataloader is empty: give at least one batch.")
    if sum(int(b["attention_mask"].sum()) for b in batches) == 0:
        raise ValueError("The calibration batches contain no unmasked token.")
    return batches


def _all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run(
    model: torch.nn.Module, batches: list[CalibrationBatch], show_progress: bool, desc: str, current: dict
) -> None:
    """Forward every batch (no grad, eval mode), exposing the batch's mask to hooks via ``current``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not show_progress):
                current["mask"] = batch["attention_mask"].to(device)
                model(
                    input_ids=batch["input_ids"].to(device), attention_mask=current["mask"], use_cache=False
                )
    finally:
        model.train(was_training)


def input_sumsq(
    model: torch.nn.Module,
    batches: list[CalibrationBatch],
    modules: dict,
    *,
    show_progress: bool = False,
    desc: str = "activation statistics",
) -> dict:
    """For each module of ``modules`` (``{key: module}``), the per-feature sum over unmasked tokens of
    its squared input: a streaming statistic, one float64 vector per module.

    Example:
        >>> input_sumsq(model, batches, {"down0": model.model.layers[0].mlp.down_proj})  # doctest: +SKIP
    """
    sums: dict = {}
    current: dict = {}

    def hook_for(key):
        def hook(module, args):
            # select real tokens (not multiply by the mask: a fully padded row may hold NaN)
            # (OPT feeds its MLP a flattened [batch*seq, dim] tensor, hence the reshape)
            x = args[0].reshape(-1, args[0].shape[-1])[current["mask"].reshape(-1).bool()].float()
            total = (x * x).sum(dim=0).double().cpu()
            sums[key] = sums[key] + total if key in sums else total

        return hook

    handles = [module.register_forward_pre_hook(hook_for(key)) for key, module in modules.items()]
    with _hooks(handles):
        _run(model, batches, show_progress, desc, current)
    _all_reduce_(sums.values())
    return {key: value.float() for key, value in sums.items()}


def mlp_activation_sumsq(
    model: torch.nn.Module,
    batches: list[CalibrationBatch],
    *,
    adapter: ModelAdapter | None = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Per layer, the sum over unmasked tokens of the squared input of ``down_proj`` (one value per neuron).

    Example:
        >>> stats = mlp_activation_sumsq(model, as_batches(loader))  # doctest: +SKIP
        >>> stats[0].shape  # (intermediate_size,)  # doctest: +SKIP
    """
    adapter = adapter or get_adapter(model)
    modules = {i: adapter.mlp(i).down for i in range(adapter.num_layers)}
    return input_sumsq(model, batches, modules, show_progress=show_progress)


@dataclass
class InputMoments:
    """Streamed statistics of one layer's ``down_proj`` input over unmasked calibration tokens.

    Attributes:
        tokens: number of unmasked tokens.
        sum / sumsq: per-neuron sum of ``x_i`` and of ``x_i^2``.
        batch_norms: per-neuron sum over batches of the batch's L2 norm ``sqrt(sum_t x_ti^2)``
            (OptiPFair's data-driven statistic, padding excluded here).

    The Gram matrix ``sum_t x_t x_t^T`` comes from
    :func:`~optipfair_train.pruning.reconstruction.collect_grams`.
    """

    tokens: float
    sum: torch.Tensor
    sumsq: torch.Tensor
    batch_norms: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-neuron variance over tokens (FLAP's fluctuation)."""
        n = max(self.tokens, 2.0)
        return ((self.sumsq - self.sum * self.sum / n) / (n - 1)).clamp_min(0)


def mlp_input_statistics(
    model: torch.nn.Module,
    batches: list[CalibrationBatch],
    *,
    adapter: ModelAdapter | None = None,
    layer_indices: Iterable[int] | None = None,
    show_progress: bool = False,
) -> dict[int, InputMoments]:
    """Per layer, the :class:`InputMoments` of the ``down_proj`` input (float64 running sums).

    All sums are all-reduced under ``torch.distributed``.

    Example:
        >>> moments = mlp_input_statistics(model, as_batches(loader))  # doctest: +SKIP
        >>> moments[0].variance.shape  # (intermediate_size,)  # doctest: +SKIP
    """
    adapter = adapter or get_adapter(model)
    layers = list(range(adapter.num_layers)) if layer_indices is None else list(layer_indices)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    current: dict = {}

    def hook_for(layer_idx: int):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[current["mask"].reshape(-1).bool()].double()
            values = {
                "tokens": torch.tensor([float(x.shape[0])], dtype=torch.float64),
                "sum": x.sum(dim=0).cpu(),
                "sumsq": (x * x).sum(dim=0).cpu(),
            }
            values["batch_norms"] = values["sumsq"].sqrt()
            acc = sums.setdefault(layer_idx, {})
            for key, value in values.items():
                acc[key] = acc[key] + value if key in acc else value

        return hook

    handles = [adapter.mlp(i).down.register_forward_pre_hook(hook_for(i)) for i in layers]
    with _hooks(handles):
        _run(model, batches, show_progress, "input statistics", current)
    _all_reduce_(t for acc in sums.values() for t in acc.values())
    return {
        i: InputMoments(
            tokens=float(acc["tokens"]),
            sum=acc["sum"],
            sumsq=acc["sumsq"],
            batch_norms=acc["batch_norms"],
        )
        for i, acc in sums.items()
    }


def block_influence(
    model: torch.nn.Module,
    batches: list[CalibrationBatch],
    *,
    span: int = 1,
    metric: str = "cosine",
    adapter: ModelAdapter | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Influence of every run of ``span`` consecutive blocks: how much it changes the hidden state.

    ``cosine``: mean over unmasked tokens of ``1 - cos(h_in, h_out)``; ``angular``: mean of
    ``arccos(cos) / pi``. ``h_in`` is the input of block ``i`` and ``h_out`` the output of block
    ``i + span - 1``. Returns a tensor of ``num_layers - span + 1`` values; low values are the blocks
    that can be removed with least damage.

    Example:
        >>> block_influence(model, as_batches(loader), span=1).argmin()  # doctest: +SKIP
    """
    if metric not in ("cosine", "angular"):
        raise ValueError(f"Unknown block influence metric {metric!r}; use 'cosine' or 'angular'.")
    adapter = adapter or get_adapter(model)
    n = adapter.num_layers
    if not 1 <= span <= n:
        raise ValueError(f"span must be between 1 and the number of layers ({n}), got {span}.")
    states: dict[int, torch.Tensor] = {}
    totals = torch.zeros(n - span + 1, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    current: dict = {}

    def pre_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[layer_idx] = hidden.detach()

        return hook

    def post_hook(module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        states[n] = hidden.detach()
        mask = current["mask"].bool()
        for start in range(n - span + 1):
            cos = F.cosine_similarity(states[start][mask].float(), states[start + span][mask].float(), dim=-1)
            value = 1 - cos if metric == "cosine" else torch.arccos(cos.clamp(-1, 1)) / torch.pi
            totals[start] += value.double().sum().cpu()
        count[0] += mask.sum().item()
        states.clear()

    handles = [
        layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        for i, layer in enumerate(adapter.layers)
    ]
    handles.append(adapter.layers[n - 1].register_forward_hook(post_hook, with_kwargs=True))
    with _hooks(handles):
        _run(model, batches, show_progress, "block influence", current)
    _all_reduce_([totals, count])
    return (totals / count).float()
