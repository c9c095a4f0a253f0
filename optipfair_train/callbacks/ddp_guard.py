"""The refusal of in-loop structural pruning under multi-process (DDP) training.

DDP's gradient buckets have fixed shapes, and the Trainer keeps its DDP wrapper in a local variable of
the training loop, so a model cut in the loop either crashes or lets ranks drift.
:class:`~optipfair_train.callbacks.PruningCallback` calls :func:`check_single_process` when it is built
with a trainer and again at train begin, before any weight changes.

Example:
    >>> from types import SimpleNamespace
    >>> check_single_process(SimpleNamespace(world_size=1))  # one process: nothing to refuse
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DistributedPruningError", "check_single_process"]


class DistributedPruningError(RuntimeError):
    """In-loop structural pruning was asked for under multi-process (DDP) training."""


def _world_size(args: Any) -> int:
    size = int(getattr(args, "world_size", 1) or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        size = max(size, torch.distributed.get_world_size())
    return size


def check_single_process(args: Any) -> None:
    """Raise :class:`DistributedPruningError` when the training runs on more than one process.

    ``args``: the Trainer's ``TrainingArguments`` (its ``world_size``); an initialised process group
    counts too.

    Example:
        >>> from types import SimpleNamespace
        >>> check_single_process(SimpleNamespace(world_size=2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        optipfair_train.callbacks.ddp_guard.DistributedPruningError: PruningCallback cannot prune ... pruned.
    """
    world_size = _world_size(args)
    if world_size > 1:
        raise DistributedPruningError(
            f"PruningCallback cannot prune inside a multi-process training run (world size {world_size}): "
            "DDP's gradient buckets have fixed shapes and the Trainer keeps its DDP wrapper for the whole "
            "loop, so cutting the model here would crash or let the ranks drift apart. Prune between "
            "Trainers instead: use optipfair_train.pipeline.PruneThenHeal (a fresh Trainer per round, "
            "every rank prunes identically), or call optipfair_train.prune_model(...) before creating the "
            "Trainer. Nothing was pruned."
        )
