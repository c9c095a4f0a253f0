"""Full weights out of a sharded (FSDP2) or replicated (DDP) healing run, so the next round can prune.

Structural pruning needs every weight whole on every rank: the pipeline prunes identically on all
ranks between two Trainers. Under DDP the Trainer's model already is whole; under FSDP2
(``torch.distributed.fsdp.fully_shard``, accelerate ``fsdp_version: 2``) each parameter is a ``DTensor``
holding 1/world of its rows and the module classes are swapped for ``FSDP<Name>`` subclasses, so
surgery on it would cut a shard, not the layer. :func:`gather_full_state_dict` collects whole CPU
tensors on every rank, one parameter at a time (device memory grows by one full tensor, never by the
whole model); :func:`unshard` loads them into a freshly built plain model of the same shapes.
Host memory: every rank holds one whole CPU copy (docs/memory-plan.md, "Between rounds").

Example (LoRA healing; every rank calls it: rebuild the adapters on the checkpoint healing started
from, load the gathered weights, merge):
    >>> rebuild = lambda: add_lora(load_pruned_model(round_dir / "pruned"), r=16, alpha=32)  # doctest: +SKIP
    >>> model = unshard(trainer.model, rebuild).merge_and_unload()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

__all__ = ["is_fsdp", "gather_full_state_dict", "unshard"]


def _module(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (the Trainer hands callbacks the inner one already)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_fsdp(model_or_trainer) -> bool:
    """Whether a model (or a Trainer's model) is sharded with FSDP2, i.e. holds ``DTensor`` parameters.

    Raises ``TypeError`` for FSDP1 (``FullyShardedDataParallel``) wrappers, whose flat parameters this
    module does not gather: use ``fsdp_version: 2`` (configs/accelerate/fsdp.yaml).

    Example:
        >>> is_fsdp(torch.nn.Linear(2, 2))
        False
    """
    model = model_or_trainer
    if not isinstance(model, torch.nn.Module):  # a Trainer: the wrapped model, else the model
        model = getattr(model, "model_wrapped", None) or model.model
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in _module(model).modules()):
        raise TypeError(
            "The model is wrapped with FSDP1 (FullyShardedDataParallel); the pipeline gathers FSDP2 "
            "(fully_shard) weights only. Set fsdp_version: 2 in the accelerate config."
        )
    return any(isinstance(p, DTensor) for p in _module(model).parameters())


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``model.state_dict()`` as a whole, detached CPU tensor, on every rank.

    Under FSDP2 this is a collective: all ranks must call it, in the same order of parameters (they
    do, ``state_dict`` order is the module order). Names are those of the unwrapped model (no DDP
    ``module.``; torch's checkpoint wrapper, used by accelerate's activation checkpointing, removes its
    own prefix in ``state_dict``), so the result loads into a plain model of equal shapes.

    Example:
        >>> sd = gather_full_state_dict(torch.nn.Linear(3, 2))
        >>> sorted(sd), tuple(sd["weight"].shape)
        (['bias', 'weight'], (2, 3))
    """
    full = {}
    for name, tensor in _module(model).state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # all-gather of this one parameter
        # copy: on a CPU back-end .to("cpu") would alias a buffer FSDP may free or reuse later
        full[name] = tensor.detach().to("cpu", copy=True)
    return full


def unshard(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A plain (unsharded) copy of ``model``'s current weights, built by ``build`` and loaded strictly.

    ``build`` must return a module with the same structure and shapes (for the pipeline: the round's
    ``pruned/`` checkpoint, with the same LoRA adapters added when healing used LoRA). A model that is
    not sharded is returned as it is (its DDP wrapper removed). Every rank must call this.

    Example:
        >>> plain = torch.nn.Linear(3, 2)
        >>> unshard(plain, lambda: torch.nn.Linear(3, 2)) is plain
        True
    """
    if not is_fsdp(model):
        return _module(model)
    full = gather_full_state_dict(model)
    target = build()
    expected = target.state_dict()
    wrong = {
        n: (tuple(t.shape), tuple(expected[n].shape))
        for n, t in full.items()
        if n in expected and t.shape != expected[n].shape
    }
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if wrong or missing or unexpected:
        raise ValueError(
            "The rebuilt model does not match the sharded one: "
            f"shape (gathered, rebuilt) {dict(list(wrong.items())[:5])}, missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Build it from the checkpoint the healing started from."
        )
    target.load_state_dict(full, strict=True)
    logger.info("Gathered %d sharded tensors into a plain %s", len(full), type(target).__name__)
    return target
