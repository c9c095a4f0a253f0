"""When to prune and how far: one-shot, a list of (step, target), or a linear/cubic ramp.

A schedule is a list of :class:`PruningEvent` ``(step, target)``: at optimizer step ``step`` the model
is brought to ``target`` percent *removed*, measured against the size the model had when training
began (not against its current size). Targets never decrease and the last one is the final target.
``units_to_remove`` (in :mod:`optipfair_train.pruning.targets`, which the pipeline's rounds share)
turns "this much of the original removed" into the number of units the event removes from the
*current* model, so that the last event lands exactly on the final target.

Ramps follow Zhu & Gupta (2017): ``target_t = final * (1 - (1 - progress) ** power)`` with
``power=1`` (linear) or ``power=3`` (cubic: prune fast while the network is redundant, then slowly).

Example:
    >>> [round(e.target, 1) for e in make_schedule("cubic", target=50, start_step=10, end_step=40,
    ...                                           num_events=4).events]
    [28.9, 43.8, 49.2, 50.0]
    >>> [e.step for e in make_schedule("linear", target=30, start_step=10, end_step=40, num_events=4).events]
    [10, 20, 30, 40]
    >>> make_schedule(30, step=100).events
    [PruningEvent(step=100, target=30.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..pruning.targets import units_to_remove

__all__ = [
    "PruningEvent",
    "PruningSchedule",
    "SCHEDULE_KINDS",
    "make_schedule",
    "units_to_remove",
]

SCHEDULE_KINDS = ("one_shot", "steps", "linear", "cubic")
_POWERS = {"linear": 1, "cubic": 3}


@dataclass(frozen=True)
class PruningEvent:
    """Prune at optimizer step ``step`` (after it) until ``target`` percent of the original units are gone."""

    step: int
    target: float


def _check_target(target: float, where: str) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 100:
        raise ValueError(
            f"{where}: a target must be a percentage strictly between 0 and 100, got {target!r}."
        )
    return float(target)


def _check_step(step: int, where: str, minimum: int = 1) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < minimum:
        raise ValueError(f"{where}: a step must be an integer >= {minimum}, got {step!r}.")
    return step


class PruningSchedule:
    """A validated, ordered list of :class:`PruningEvent`.

    Steps are optimizer steps (``TrainerState.global_step``, so gradient accumulation is already
    counted); they must strictly increase, targets must not decrease.

    Example:
        >>> s = PruningSchedule([(10, 20), (20, 40)])
        >>> s.final_target, s.event_at(20)
        (40.0, PruningEvent(step=20, target=40.0))
    """

    def __init__(self, events: Sequence[PruningEvent | tuple[int, float]], kind: str = "steps"):
        if not events:
            raise ValueError("A pruning schedule needs at least one (step, target) event.")
        parsed: list[PruningEvent] = []
        for i, event in enumerate(events):
            if not isinstance(event, PruningEvent):
                if not isinstance(event, (tuple, list)) or len(event) != 2:
                    raise ValueError(f"Schedule entry {i} must be a (step, target) pair, got {event!r}.")
                event = PruningEvent(*event)
            step = _check_step(event.step, f"schedule entry {i}")
            parsed.append(PruningEvent(step, _check_target(event.target, f"schedule entry {i}")))
        for before, after in zip(parsed, parsed[1:], strict=False):
            if after.step <= before.step:
                raise ValueError(
                    f"Schedule steps must strictly increase; got step {after.step} after {before.step}."
                )
            if after.target < before.target:
                raise ValueError(
                    f"Schedule targets must not decrease (pruned units do not come back); got "
                    f"{after.target} at step {after.step} after {before.target} at step {before.step}."
                )
        self.events = parsed
        self.kind = kind

    @property
    def final_target(self) -> float:
        return self.events[-1].target

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.events]

    def event_at(self, step: int) -> PruningEvent | None:
        """The event scheduled after optimizer step ``step``, if any."""
        return next((e for e in self.events if e.step == step), None)

    def __repr__(self) -> str:
        return f"PruningSchedule(kind={self.kind!r}, events={self.events!r})"


def make_schedule(
    kind: str | float | Sequence[tuple[int, float]] | PruningSchedule,
    *,
    target: float | None = None,
    step: int | None = None,
    start_step: int | None = None,
    end_step: int | None = None,
    num_events: int | None = None,
    every_n_steps: int | None = None,
) -> PruningSchedule:
    """Build a schedule.

    - ``make_schedule("one_shot", target=30, step=100)`` (or ``make_schedule(30, step=100)``);
    - ``make_schedule([(100, 10), (200, 20)])`` (explicit steps and targets);
    - ``make_schedule("linear" | "cubic", target=50, start_step=100, end_step=1000, num_events=10)``,
      or ``every_n_steps=100`` instead of ``num_events``; the last event is always at ``end_step``
      with the exact final ``target``.

    Raises:
        ValueError: for an unknown kind, missing or contradictory arguments, bad steps or targets.

    Example:
        >>> [round(e.target, 2) for e in make_schedule("linear", target=30, start_step=1, end_step=3,
        ...                                             num_events=3).events]
        [10.0, 20.0, 30.0]
    """
    if isinstance(kind, PruningSchedule):
        return kind
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        kind, target = "one_shot", kind
    if not isinstance(kind, str):
        return PruningSchedule(list(kind), kind="steps")
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}.")
    if kind == "steps":
        raise ValueError("schedule='steps' needs the events themselves: pass [(step, target), ...].")
    if target is None:
        raise ValueError(f"schedule={kind!r} needs a final target (percent of the original units to remove).")
    target = _check_target(target, f"schedule {kind!r}")
    if kind == "one_shot":
        if step is None:
            raise ValueError("schedule='one_shot' needs step=N (the optimizer step after which to prune).")
        return PruningSchedule([(_check_step(step, "one_shot"), target)], kind=kind)
    if start_step is None or end_step is None:
        raise ValueError(f"schedule={kind!r} needs start_step and end_step.")
    start = _check_step(start_step, f"{kind} start_step")
    end = _check_step(end_step, f"{kind} end_step")
    if end <= start:
        raise ValueError(f"end_step ({end}) must be greater than start_step ({start}).")
    if (num_events is None) == (every_n_steps is None):
        raise ValueError(f"schedule={kind!r} needs exactly one of num_events and every_n_steps.")
    if every_n_steps is not None:
        _check_step(every_n_steps, "every_n_steps")
        steps = list(range(start, end, every_n_steps)) + [end]
    else:
        _check_step(num_events, "num_events", minimum=2)
        if num_events > end - start + 1:
            raise ValueError(
                f"num_events={num_events} does not fit between steps {start} and {end} "
                f"({end - start + 1} steps)."
            )
        steps = sorted({start + round(i * (end - start) / (num_events - 1)) for i in range(num_events)})
    power = _POWERS[kind]
    # The ramp starts one event interval before start_step, so the first event already prunes
    # (a ramp that is 0 at start_step would waste its first event); the last event is at end_step.
    origin = start - (steps[1] - steps[0])
    events = [(s, target * (1 - (1 - (s - origin) / (end - origin)) ** power)) for s in steps]
    events[-1] = (end, target)
    return PruningSchedule(events, kind=kind)
