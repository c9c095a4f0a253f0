"""Per-item results of every stage, kept in the run folder so that two runs can be paired item by item.

``output_dir/stage-items/<stage>.json``, one file per stage (``base``, ``round-K-pruned``,
``round-K-healed``), written atomically when the stage is measured::

    {
      "stage": "round-1-healed",
      "seed": 0,                                   # the run's seed (it chose the sampled items)
      "stereoset": {"fingerprint": "...", "ids": ["4e5fe8cacd", ...],
                    "items": [stereoset_scores' per-item records: task, target, bias_type,
                              mean_log_prob and num_tokens of the three options]},
      "zeroshot": {"fingerprint": "...", "tasks": {"piqa": {"acc_items": [1, 0, ...], "item_keys": [...]}}},
      "perplexity": {"perplexity": 12.3, "perplexity/general": 20.1,
                     "texts": {"perplexity": "...", "perplexity/general": "..."}}
    }

A probe that did not run is left out. ``ids`` are :func:`~optipfair_train.bias.item_id` of the judged
StereoSet items (zero-shot: :func:`~optipfair_train.zeroshot.item_key`); ``fingerprint`` is one hash of
the ids in order, so two files pair exactly when their fingerprints agree. ``texts`` say what each
perplexity was measured on, so perplexities compare only on the same text.

Example:
    >>> record = stage_record("base", seed=0, perplexity={"perplexity": 9.5})
    >>> record["stage"], record["perplexity"]["perplexity"]
    ('base', 9.5)
    >>> write_stage_items(Path("out"), record)  # doctest: +SKIP
    PosixPath('out/stage-items/base.json')
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .state import atomic_write_json, read_json

__all__ = [
    "ITEMS_DIR",
    "fingerprint",
    "read_stage_items",
    "saved_stages",
    "stage_name",
    "stage_record",
    "write_stage_items",
]

ITEMS_DIR = "stage-items"
_STAGE = re.compile(r"^(base|round-[1-9][0-9]*-(pruned|healed))$")


def stage_name(round_number: int = 0, kind: str = "healed") -> str:
    """The name of a stage: ``base`` for round 0, else ``round-K-pruned`` / ``round-K-healed``.

    Example:
        >>> stage_name(), stage_name(2, "pruned")
        ('base', 'round-2-pruned')
    """
    if round_number == 0:
        return "base"
    if kind not in ("pruned", "healed"):
        raise ValueError(f"a round's stage is 'pruned' or 'healed', got {kind!r}")
    return f"round-{round_number}-{kind}"


def fingerprint(ids: Sequence[str]) -> str:
    """One short hash of item ids in order: equal exactly when the item lists are.

    Example:
        >>> fingerprint(["a", "b"]) == fingerprint(["a", "b"]) != fingerprint(["b", "a"])
        True
    """
    return hashlib.sha1("\x1f".join(ids).encode("utf-8")).hexdigest()[:12]


def stage_record(
    stage: str,
    seed: int,
    stereoset: tuple[Sequence[str], Sequence[Mapping[str, Any]]] | None = None,
    zeroshot: Mapping[str, Mapping[str, Any]] | None = None,
    perplexity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The file content of one stage (layout: the module docstring).

    Args:
        stage: :func:`stage_name`.
        seed: the run's seed.
        stereoset: ``(ids, per-item records)`` of the judged StereoSet items.
        zeroshot: per task ``{"acc_items": [...], "item_keys": [...]}``.
        perplexity: ``{"perplexity": x, "perplexity/general": y, "texts": {...}}``.

    Example:
        >>> r = stage_record("base", 0, stereoset=(["a"], [{"task": "intersentence"}]))
        >>> r["stereoset"]["fingerprint"] == fingerprint(["a"])
        True
    """
    if not _STAGE.match(stage):
        raise ValueError(f"stage must be base or round-K-pruned / round-K-healed, got {stage!r}")
    record: dict[str, Any] = {"stage": stage, "seed": seed}
    if stereoset is not None:
        ids, items = stereoset
        if len(ids) != len(items):
            raise ValueError(f"{len(ids)} StereoSet ids for {len(items)} item records")
        record["stereoset"] = {"fingerprint": fingerprint(list(ids)), "ids": list(ids), "items": list(items)}
    if zeroshot is not None:
        keys = [f"{name}:{key}" for name, task in zeroshot.items() for key in task["item_keys"]]
        tasks = {
            name: {k: list(task[k]) for k in ("acc_items", "item_keys")} for name, task in zeroshot.items()
        }
        record["zeroshot"] = {"fingerprint": fingerprint(keys), "tasks": tasks}
    if perplexity is not None:
        record["perplexity"] = dict(perplexity)
    return record


def write_stage_items(out: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as ``out/stage-items/<stage>.json``, whole or not at all; returns the path.

    Example:
        >>> write_stage_items(Path("out"), stage_record("base", 0))  # doctest: +SKIP
        PosixPath('out/stage-items/base.json')
    """
    folder = Path(out) / ITEMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['stage']}.json"
    atomic_write_json(path, dict(record))
    return path


def saved_stages(out: Path) -> list[str]:
    """The stages of the run in ``out`` that have a per-item file, in run order.

    Example:
        >>> saved_stages(Path("outputs/demo"))  # doctest: +SKIP
        ['base', 'round-1-pruned', 'round-1-healed']
    """
    folder = Path(out) / ITEMS_DIR
    names = [p.stem for p in folder.glob("*.json") if _STAGE.match(p.stem)] if folder.is_dir() else []

    def order(name: str) -> tuple[int, int]:
        if name == "base":
            return 0, 0
        _, k, kind = name.split("-")
        return int(k), 0 if kind == "pruned" else 1

    return sorted(names, key=order)


def read_stage_items(out: Path, stage: str) -> dict[str, Any] | None:
    """The per-item file of ``stage`` in the run folder ``out`` (``None`` when there is none).

    Raises:
        ValueError: for a damaged file, or one that is not a stage record, naming the file.

    Example:
        >>> read_stage_items(Path("outputs/demo"), "base")["stereoset"]["fingerprint"]  # doctest: +SKIP
        'c1b2...'
    """
    path = Path(out) / ITEMS_DIR / f"{stage}.json"
    if not path.is_file():
        return None
    record = read_json(path, f"delete it and rerun the run in {out} to measure {stage} again.")
    if not isinstance(record, dict) or record.get("stage") != stage:
        raise ValueError(f"{path} is not the per-item record of stage {stage}.")
    for probe, field in (("stereoset", "items"), ("zeroshot", "tasks")):
        part = record.get(probe)
        if part is not None and (
            not isinstance(part, dict) or "fingerprint" not in part or field not in part
        ):
            raise ValueError(f"{path}: {probe!r} must hold 'fingerprint' and {field!r}.")
    return record
