"""``state.json``: what a pipeline run keeps between its steps, read and written through one typed record.

:class:`RunState` is the only code that reads or writes the file: ``load`` checks every field's type
and refuses a malformed file naming the file and the field, ``save`` writes it atomically
(:func:`~optipfair_train.pipeline.state.atomic_write_json`). The JSON layout is the one earlier versions
wrote (a field that is not set yet is left out), so their run folders still resume.

The per-stage metrics (``baseline`` and each round record's ``pruned`` / ``healed``) stay plain JSON
mappings: they are the numbers :mod:`.evaluate` measured, read as they are by the card, the report and
W&B.

Example:
    >>> state = RunState(config={"pruning": {"num_rounds": 1}})
    >>> state.baseline is None, state.finished
    (True, False)
    >>> state.save(Path("out/state.json"))  # doctest: +SKIP
    >>> RunState.load(Path("out/state.json")) == state  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .state import atomic_write_json, read_json

__all__ = ["RunState", "Retry", "STATE_NAME", "comparable_settings", "changed_settings"]

STATE_NAME = "state.json"


@dataclass
class Retry:
    """A healing attempt of round ``round`` restarted after a non-finite loss, at ``learning_rate``."""

    round: int
    attempt: int
    learning_rate: float


# field -> (accepted JSON types, how the error names them)
_INT, _NUMBER = (int,), (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "config": ((dict,), "a mapping of settings"),
    "rounds": ((list,), "a list of round records"),
    "baseline": ((dict,), "a mapping of metrics"),
    "stereoset_base_items": ((list,), "a list of StereoSet item scores"),
    "zeroshot_base_items": ((dict,), "a mapping of zero-shot answers"),
    "general_text": ((str,), "a string"),
    "general_note": ((str,), "a string"),
    "wandb_run_id": ((str,), "a string"),
    "speed": ((dict,), "a mapping of speed measurements"),
    "retry": ((dict,), "a mapping with round, attempt and learning_rate"),
    "finished": ((bool,), "true or false"),
}
_REQUIRED = ("config", "rounds")  # written when the run folder is opened


@dataclass
class RunState:
    """The content of a run's ``state.json``.

    Attributes:
        config: the settings a resumed run must match (``PruneThenHeal`` compares them).
        rounds: the records of the finished rounds (each as ``round-K/model/round.json`` holds it).
        baseline: the unpruned model's metrics, once measured.
        stereoset_base_items / zeroshot_base_items: the base model's answers, so a resumed run pairs
            later stages against the same ones.
        general_text / general_note: the general held-out text's name, or why there is none.
        wandb_run_id: the W&B run a resumed run continues.
        speed: base against final model speed, measured once.
        retry: the healing retry in progress, if a crash interrupted one.
        finished: every round and ``final/`` were written.
    """

    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    stereoset_base_items: list[Any] | None = None
    zeroshot_base_items: dict[str, Any] | None = None
    general_text: str | None = None
    general_note: str | None = None
    wandb_run_id: str | None = None
    speed: dict[str, Any] | None = None
    retry: Retry | None = None
    finished: bool = False

    # -- reading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "state") -> RunState:
        """The record for ``data`` (parsed ``state.json``); a field of the wrong type or an unknown
        field is an error naming ``source`` and the field.

        Example:
            >>> RunState.from_dict({"config": {}, "rounds": [], "finished": True}).finished
            True
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(_TYPES))
        if unknown:
            raise ValueError(
                f"{source}: unknown field {unknown[0]!r}; a run's state has {', '.join(_TYPES)}."
            )
        values = {}
        for name, value in data.items():
            types, accepted = _TYPES[name]
            if value is None and name != "config" and name != "rounds":  # an unset field
                continue
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise ValueError(f"{source}: field {name!r} must be {accepted}, got {value!r}.")
            values[name] = value
        if any(not isinstance(r, dict) for r in values.get("rounds", [])):
            raise ValueError(f"{source}: field 'rounds' must be a list of round records (JSON objects).")
        if "retry" in values:
            values["retry"] = _retry(values["retry"], source)
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> RunState | None:
        """The state in ``path``, or ``None`` when there is none yet; a damaged or malformed file is an
        error naming the file, the field and how to start over.

        Example:
            >>> RunState.load(Path("new-run/state.json")) is None  # doctest: +SKIP
            True
        """
        path = Path(path)
        if not path.is_file():
            return None
        remedy = f"delete {path.parent} (or choose another output_dir) to start over."
        data = read_json(path, remedy)
        missing = [name for name in _REQUIRED if isinstance(data, Mapping) and name not in data]
        try:
            if missing:
                raise ValueError(f"{path}: field {missing[0]!r} is missing.")
            return cls.from_dict(data, source=str(path))
        except ValueError as err:
            raise ValueError(f"{err} {remedy[0].upper()}{remedy[1:]}") from err

    @classmethod
    def of(cls, state: RunState | Mapping[str, Any]) -> RunState:
        """``state`` itself, or the record of a parsed ``state.json`` (as the card and figure functions
        accept either).

        Example:
            >>> RunState.of({"baseline": {"parameters": 10}, "rounds": []}).baseline
            {'parameters': 10}
        """
        return state if isinstance(state, RunState) else cls.from_dict(state)

    # -- writing -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON content: unset fields (``None``, ``finished`` false) are left out, as before.

        Example:
            >>> RunState(config={}, finished=True).to_dict()
            {'config': {}, 'rounds': [], 'finished': True}
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "finished" and not value):
                continue
            out[f.name] = dataclasses.asdict(value) if isinstance(value, Retry) else value
        return out

    def save(self, path: Path) -> None:
        """Write the state to ``path`` atomically (a crash leaves the old file or the new one).

        Example:
            >>> RunState(config={}).save(Path("out/state.json"))  # doctest: +SKIP
        """
        atomic_write_json(Path(path), self.to_dict())


def comparable_settings(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The settings a resumed run must share with the run that wrote the folder (``RunState.config``):
    all of them except the run section's, of which only the seed counts.

    Example:
        >>> comparable_settings(PipelineConfig())["run"]
        {'seed': 0}
    """
    settings = config.to_dict()
    settings["run"] = {k: v for k, v in settings["run"].items() if k == "seed"}
    return settings


def changed_settings(saved: Mapping[str, Any], config: PipelineConfig) -> list[str]:
    """The settings of ``config`` that differ from ``saved`` (an earlier run's ``RunState.config``), as
    ``name: then -> now``. A setting ``saved`` lacks, because it was added after that run was written,
    counts as its default, so such a folder still resumes when the new setting is left at it.

    Example:
        >>> changed_settings(comparable_settings(PipelineConfig()), PipelineConfig())
        []
    """
    current, defaults = comparable_settings(config), comparable_settings(PipelineConfig())
    changes = []
    for section, values in current.items():
        then = saved.get(section, {}) if isinstance(saved.get(section), Mapping) else {}
        for name, value in values.items():
            before = then.get(name, defaults[section][name])
            if before != value:
                changes.append(f"{name}: {before!r} -> {value!r}")
        changes += [f"{name}: {then[name]!r} -> (no such setting)" for name in then if name not in values]
    return changes


def _retry(value: dict[str, Any], source: str) -> Retry:
    names = [f.name for f in dataclasses.fields(Retry)]
    if sorted(value) != sorted(names):
        raise ValueError(f"{source}: field 'retry' must hold exactly {', '.join(names)}, got {value!r}.")
    for name, types in (("round", _INT), ("attempt", _INT), ("learning_rate", _NUMBER)):
        if isinstance(value[name], bool) or not isinstance(value[name], types):
            raise ValueError(f"{source}: field 'retry.{name}' must be a number, got {value[name]!r}.")
    return Retry(**value)
