"""``PruningCallback``: structured pruning on a schedule, inside ``Trainer.train()``.

The callback decides *when*; the engine decides *what*. At the end of a scheduled optimizer step
(``on_step_end``: the optimizer has stepped, gradients are cleared, the learning-rate scheduler has
advanced) it builds a request with the number of units to remove, plans it and applies the plan
(:func:`optipfair_train.pruning.plan` / :func:`~optipfair_train.pruning.apply`, ``optimizer=optimizer``),
which cuts the weights in place, keeping the same ``nn.Parameter`` objects, and slices the
optimizer state (Adam's moments) the same way, then checks every state tensor's shape: the next
``optimizer.step()`` updates exactly the pruned parameters with their own moments, and the
learning-rate schedule simply continues. This holds for plain training, gradient accumulation
(steps are optimizer steps) and PEFT LoRA models (base weights and ``lora_A``/``lora_B`` cut
together, without merging).

Targets are percentages of the units the model had when training began (MLP neurons per layer,
KV groups or query heads per group, or blocks); each event asks the engine to remove the number of
units that brings the model to the scheduled target, so the last event lands exactly on the final
target (:mod:`.schedule`).

Multi-process training (DDP) is refused with :class:`DistributedPruningError` before the first step
(:mod:`.ddp_guard` says why). Prune between Trainers instead:
:class:`optipfair_train.pipeline.PruneThenHeal` (one Trainer per round, every rank prunes identically),
or ``prune_model`` before building the Trainer.

Example:
    >>> cb = PruningCallback(trainer, pruning_type="MLP_GLU", target=30, schedule="cubic",
    ...                      start_step=100, end_step=1000, num_events=10, dataloader=calibration)  # doctest: +SKIP
    >>> trainer.add_callback(cb); trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from ..data import check_token_ids
from ..pruning import PRUNING_TYPES, apply, default_method, plan, pruning_request
from ..pruning.api import pruning_stats
from ..pruning.calibration import as_batches
from ..pruning.heads import check_head_granularity
from ..pruning.requests import Request
from ..pruning.targets import check_layer_indices, units_to_remove
from ..pruning.taylor import TaylorImportance
from .base import ReportingCallback
from .ddp_guard import DistributedPruningError, check_single_process
from .importance import GradientImportanceCallback
from .resume import install_resume_hook, resumed_at, save_progress
from .schedule import PruningSchedule, make_schedule
from .stats import PRUNING_TABLE_COLUMNS, model_structure, pruning_scalars, pruning_table_rows

__all__ = ["PruningCallback", "DistributedPruningError"]

logger = logging.getLogger(__name__)

# arguments the callback computes itself; passing them through prune_kwargs would break the schedule
_RESERVED = {
    "pruning_type",
    "pruning_percentage",
    "expansion_rate",
    "expansion_divisor",
    "target_parameters",
    "num_layers_to_remove",
    "depth_pruning_percentage",
    "layer_allocation",
    "optimizer",
    "return_stats",
    "dataloader",
    "gradient_importance",
    "neuron_selection_method",
    "layer_selection_method",
    "head_granularity",
    "layer_indices",
    "show_progress",
}


class PruningCallback(ReportingCallback):
    """Prune the model during ``Trainer.train()`` on a schedule, with any registered scorer.

    Args:
        trainer: the Trainer (or TRL trainer); needed for scalars to reach the ``report_to`` backends
            and to validate the target against the model at construction.
        pruning_type: ``"MLP_GLU"``, ``"MLP"``, ``"ATTENTION"`` or ``"DEPTH"`` (as in ``prune_model``).
        target: final percentage of the original units to remove (MLP neurons per layer, KV groups /
            query heads per group, or blocks), for the named schedules.
        schedule: ``"one_shot"`` (with ``step``), ``"linear"`` / ``"cubic"`` (with ``start_step``,
            ``end_step`` and ``num_events`` or ``every_n_steps``), a list of ``(step, target)``, or a
            :class:`~optipfair_train.callbacks.schedule.PruningSchedule`. Steps are optimizer steps.
        neuron_selection_method: the scorer (``activation``, ``taylor``, ``MAW``, ... see
            ``available_scorers()``; for ``ATTENTION``: ``L2``, ``activation``, ``taylor``, ``random``).
            Default: ``taylor`` with ``importance``, else with ``dataloader`` ``hybrid`` (``activation``
            for ``ATTENTION``), as ``prune_model`` chooses, else the engine's weight-only default.
        layer_selection_method: for ``DEPTH``: ``importance`` (default with ``dataloader``), ``taylor``,
            ``contiguous``, ``last``, ``first``.
        dataloader: calibration batches (dicts with ``input_ids``/``attention_mask``) for data-driven
            scorers; materialised once here.
        importance: a :class:`GradientImportanceCallback` (also add it to the trainer) or a
            ``TaylorImportance``: Taylor scores from the training's own gradients. Reset after each event.
        head_granularity: ``"group"`` or ``"query"`` for ``ATTENTION``.
        layer_indices: layers to prune (width / heads); default all.
        log_stats: log parameter counts, per-layer widths / heads, depth and sparsity after each event
            (scalars to every backend, a per-layer ``wandb.Table`` when W&B is active).
        show_progress: tqdm bars inside the engine during an event.
        prune_kwargs: further ``prune_model`` arguments (e.g. ``seed``, ``bias_pairs``, ``fairness_weight``).

    Resuming: rerun the same script with ``trainer.train(resume_from_checkpoint=True)`` (or a checkpoint
    path); nothing else is needed when ``trainer`` is given here. Before the Trainer loads the weights,
    the model is cut to the checkpoint's shapes and the callback's progress is restored, so the run
    continues as if never stopped (:mod:`.resume`; not for LoRA models past a pruning event).

    Raises:
        ValueError: bad schedule or target, unknown scorer, a scorer without the data it needs, or a
            target the model has already reached (checked here when ``trainer`` is given, else at
            train begin).
        DistributedPruningError: under multi-process training (see the module docstring).

    Example:
        >>> cb = PruningCallback(target=25, step=10, pruning_type="MLP_GLU", neuron_selection_method="MAW")
        >>> cb.schedule.events
        [PruningEvent(step=10, target=25.0)]
    """

    def __init__(
        self,
        trainer: Any | None = None,
        *,
        pruning_type: str = "MLP_GLU",
        target: float | None = None,
        schedule: str | Sequence[tuple[int, float]] | PruningSchedule = "one_shot",
        step: int | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        num_events: int | None = None,
        every_n_steps: int | None = None,
        neuron_selection_method: str | None = None,
        layer_selection_method: str | None = None,
        dataloader: Iterable | None = None,
        importance: GradientImportanceCallback | TaylorImportance | None = None,
        head_granularity: str = "group",
        layer_indices: Sequence[int] | None = None,
        log_stats: bool = True,
        show_progress: bool = False,
        prune_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(trainer)
        scheduled = [t for t in PRUNING_TYPES if t != "HIDDEN"]  # the hidden axis is one-shot for now
        if pruning_type not in scheduled:
            raise ValueError(
                f"Unknown pruning_type {pruning_type!r} for PruningCallback; it schedules {', '.join(scheduled)}."
            )
        self.pruning_type = pruning_type
        if not isinstance(schedule, str) and target is not None and not isinstance(schedule, PruningSchedule):
            raise ValueError("Give either target= with a named schedule, or a list of (step, target) events.")
        self.schedule = make_schedule(
            schedule,
            target=target,
            step=step,
            start_step=start_step,
            end_step=end_step,
            num_events=num_events,
            every_n_steps=every_n_steps,
        )
        self.batches = as_batches(dataloader) if dataloader is not None else None
        if importance is not None and not isinstance(
            importance, (GradientImportanceCallback, TaylorImportance)
        ):
            raise ValueError(
                f"importance must be a GradientImportanceCallback or a TaylorImportance, got {type(importance).__name__}."
            )
        self.importance = importance
        check_head_granularity(head_granularity)
        self.head_granularity = head_granularity
        self.layer_indices = list(layer_indices) if layer_indices is not None else None
        self.prune_kwargs = dict(prune_kwargs or {})
        clash = sorted(set(self.prune_kwargs) & _RESERVED)
        if clash:
            raise ValueError(
                f"prune_kwargs may not set {', '.join(clash)}: PruningCallback sets them (use its own arguments)."
            )
        depth = pruning_type == "DEPTH"
        if layer_selection_method is not None and not depth:
            raise ValueError("layer_selection_method applies to pruning_type='DEPTH' only.")
        if neuron_selection_method is not None and depth:
            raise ValueError(
                "For pruning_type='DEPTH' choose blocks with layer_selection_method=..., not a neuron scorer."
            )
        if layer_selection_method == "custom":
            raise ValueError(
                "layer_selection_method='custom' removes fixed blocks once: call prune_model(..., "
                "layer_indices=...) before training instead of scheduling it."
            )
        self.method = neuron_selection_method or layer_selection_method
        if self.method is None:
            kind = {"DEPTH": "depth", "ATTENTION": "heads"}.get(pruning_type, "mlp")
            self.method = default_method(
                kind, calibrated=self.batches is not None, gradients=self.importance is not None
            )
        # every check of the request, once, now: the gradients and the tokenizer that the training
        # supplies later stand in as the importance argument and a placeholder
        template = self._request(
            1, gradients=self.importance, tokenizer=self.prune_kwargs.get("tokenizer", "from the trainer")
        )
        self.method = template.method
        self.log_stats = log_stats
        self.show_progress = show_progress
        self.original_units: int | None = None
        self.original_parameters: int | None = None
        self.events_done: list[dict[str, Any]] = []
        if trainer is not None:
            check_single_process(trainer.args)
            self._check_target(trainer.model)
            install_resume_hook(trainer, self)  # resume_from_checkpoint cuts the model first (.resume)

    def attach(self, trainer: Any) -> PruningCallback:
        """As :meth:`ReportingCallback.attach`, and a later ``resume_from_checkpoint`` cuts the model first."""
        super().attach(trainer)
        install_resume_hook(trainer, self)
        return self

    def _request(self, remove: int, *, gradients: Any, tokenizer: Any) -> Request:
        """The engine request of one event: remove ``remove`` units with this callback's settings."""
        kwargs = dict(self.prune_kwargs, tokenizer=tokenizer)
        if self.pruning_type == "DEPTH":
            kwargs["layer_selection_method"] = self.method
            kwargs.pop("tokenizer")
        else:
            kwargs.update(neuron_selection_method=self.method, layer_indices=self.layer_indices)
            if self.pruning_type == "ATTENTION":
                kwargs["head_granularity"] = self.head_granularity
        return pruning_request(
            self.pruning_type,
            remove=remove,
            calibrated=self.batches is not None,
            gradient_importance=gradients,
            **kwargs,
        )

    # ---- validation ----------------------------------------------------------------------------
    def _units(self, model: torch.nn.Module) -> int:
        """Current size in the schedule's units; raises if the pruned layers are not uniform."""
        adapter = get_adapter(model)
        if self.pruning_type == "DEPTH":
            return adapter.num_layers
        layers = check_layer_indices(self.layer_indices, adapter.num_layers)
        if self.pruning_type == "ATTENTION":
            counts = [adapter.head_counts(i) for i in layers]
            sizes = {kv if self.head_granularity == "group" else q // kv for q, kv, _ in counts}
            what = "KV groups" if self.head_granularity == "group" else "query heads per group"
        else:
            sizes = {adapter.mlp(i).intermediate_size for i in layers}
            what = "MLP widths"
        if len(sizes) != 1:
            raise ValueError(
                f"PruningCallback schedules need uniform layers, but the pruned layers have {what} "
                f"{sorted(sizes)}; pass layer_indices= for a uniform subset."
            )
        return sizes.pop()

    def _check_target(self, model: torch.nn.Module) -> None:
        units = self._units(model)
        if units_to_remove(units, units, self.schedule.final_target) == 0:
            unit = {"DEPTH": "blocks"}.get(self.pruning_type, "units")
            raise ValueError(
                f"Target already reached: removing {self.schedule.final_target}% of {units} {unit} removes "
                f"nothing (the smallest step is {100 / units:.1f}%)."
            )

    # ---- events --------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model=None, **kwargs):
        check_single_process(args)
        resumed = resumed_at(self, state.global_step)  # progress restored with the checkpoint
        if (
            not resumed
            and state.global_step > 0
            and any(e.step <= state.global_step for e in self.schedule.events)
        ):
            raise ValueError(
                f"Resuming at step {state.global_step} past scheduled pruning events needs the trainer at "
                "construction, PruningCallback(trainer, ...), so the checkpoint's pruned shapes are restored."
            )
        if not resumed:
            self._check_target(model)
            self.original_units = self._units(model)
            self.original_parameters = model_structure(model)["parameters"]
        if self.batches is not None:  # refused now, not at the pruning step hours later
            vocab_size = get_adapter(model).model.get_input_embeddings().num_embeddings
            for i, batch in enumerate(self.batches):
                check_token_ids(batch["input_ids"], vocab_size, f"PruningCallback: calibration batch {i}")
        if (
            self.method == "taylor"
            and isinstance(self.importance, GradientImportanceCallback)
            and self.batches is None
        ):
            mlp = get_adapter(model).mlp(0)
            if not mlp.down.weight.requires_grad:
                raise ValueError(
                    "The 'taylor' scorer reads the gradients of the pruned weights, but they are frozen "
                    "(e.g. LoRA): pass dataloader=... and use 'activation' (or 'taylor' on calibration data)."
                )
        if self.log_stats:
            target = self.events_done[-1]["target"] if resumed and self.events_done else 0.0
            self.log_scalars(args, state, pruning_scalars(model, self.original_parameters, target=target))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs):
        save_progress(self, args, state)

    def _gradient_importance(self) -> TaylorImportance | None:
        imp = self.importance
        acc = imp.importance if isinstance(imp, GradientImportanceCallback) else imp
        if acc is not None and acc.batches > 0:
            return acc
        return None

    def on_step_end(self, args: Any, state: Any, control: Any, model=None, optimizer=None, **kwargs):
        event = self.schedule.event_at(state.global_step)
        if event is None:
            return
        current = self._units(model)
        remove = units_to_remove(current, self.original_units, event.target)
        if remove == 0:
            logger.info(
                "step %d: target %.2f%% already reached, nothing to prune", state.global_step, event.target
            )
            return
        grads = None
        if self.method == "taylor":
            grads = self._gradient_importance()
            if grads is None and self.batches is None:
                raise RuntimeError(
                    f"Pruning at step {state.global_step} needs Taylor scores, but no gradient was accumulated "
                    "yet (is the GradientImportanceCallback added to the trainer and scheduled before this step?)."
                )
        tokenizer = self.prune_kwargs.get("tokenizer", kwargs.get("processing_class"))
        start = time.perf_counter()
        request = self._request(remove, gradients=grads, tokenizer=tokenizer)
        original = count_parameters(model)
        events = apply(
            model, plan(model, request, self.batches, show_progress=self.show_progress), optimizer=optimizer
        )
        seconds = time.perf_counter() - start
        stats = pruning_stats(original, model, events)
        reached = self._units(model)
        if isinstance(self.importance, GradientImportanceCallback):
            self.importance.reset(model)
        elif isinstance(self.importance, TaylorImportance):
            self.importance = TaylorImportance(model)
        record = {
            "step": state.global_step,
            "target": event.target,
            "units": reached,
            "seconds": seconds,
            "stats": stats,
        }
        self.events_done.append(record)
        logger.info(
            "step %d: pruned %s to %.2f%% of the original units removed (%d left) in %.2f s; %s -> %s parameters",
            state.global_step,
            self.pruning_type,
            event.target,
            reached,
            seconds,
            f"{stats['original_parameters']:,}",
            f"{stats['pruned_parameters']:,}",
        )
        if self.log_stats:
            self._log_event(args, state, unwrap_model(model), event.target, stats, seconds)

    def _log_event(
        self, args: Any, state: Any, model: torch.nn.Module, target: float, stats: dict, seconds: float
    ) -> None:
        structure = model_structure(model)
        scalars = pruning_scalars(model, self.original_parameters, structure=structure, target=target)
        scalars["pruning/event"] = float(len(self.events_done))
        scalars["pruning/event_seconds"] = seconds
        scalars["pruning/event_reduction"] = float(stats["reduction"])
        self.log_scalars(args, state, scalars)
        self.events_done[-1]["structure"] = structure
        rows = []  # cumulative (a logged W&B table is immutable): one row per layer per event so far
        for i, done in enumerate(self.events_done):
            if "structure" not in done:  # restored without its record (see .resume): no rows to give
                continue
            rows += pruning_table_rows(
                done["step"],
                i,
                done["stats"]["event"],
                done["structure"],
                self.original_parameters,
                done["target"],
            )
        self.log_table(args, state, "pruning/layers", PRUNING_TABLE_COLUMNS, rows)
