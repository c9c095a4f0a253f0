"""Crash-safe files of a pipeline run: atomic writes, completion records, checkpoint discovery.

Every file and folder the pipeline keeps is written under a temporary name (``.tmp-<name>``) in the
same directory, flushed to disk and renamed into place, so a reader finds it whole or not at all. A
folder also holds ``COMPLETE_NAME``, written last, with the size and SHA-256 of every file in it: a
Trainer checkpoint (which the Trainer writes in place) counts only once the pipeline has added that
record, and a file deleted or damaged later is named instead of being loaded half-way.

Example:
    >>> with atomic_folder(Path("out/round-1/model")) as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    >>> folder_problem(Path("out/round-1/model")) is None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import PartialState
from transformers import TrainerCallback

from .faults import crash_point

if TYPE_CHECKING:  # run_state reads and writes its file with this module's functions
    from .run_state import RunState

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_NAME",
    "EVENTS_NAME",
    "ROUND_RECORD",
    "check_writable",
    "finished_rounds",
    "final_ready",
    "CHECKPOINT_FILES",
    "atomic_write_json",
    "read_json",
    "atomic_folder",
    "mark_complete",
    "folder_problem",
    "remove_folder",
    "remove_leftovers",
    "last_complete_checkpoint",
    "remove_checkpoints",
    "CheckpointCompletion",
]

COMPLETE_NAME = "optipfair-complete.json"
EVENTS_NAME = "events.json"  # in round-K/pruned: the pruning events of round K
ROUND_RECORD = "round.json"  # in round-K/model: round K's metrics, as state.json lists them
TMP_PREFIX = ".tmp-"
# What a Trainer checkpoint needs to resume exactly (patterns; each must match at least one file):
# without scheduler.pt or the RNG state the Trainer resumes silently, on another trajectory.
# "a|b": either layout; FSDP's SHARDED_STATE_DICT checkpoints hold torch.distributed.checkpoint folders
# (pytorch_model_fsdp_0/, optimizer_0/) instead of model.safetensors / optimizer.pt
CHECKPOINT_FILES = (
    "*.safetensors|pytorch_model_fsdp_*/*",
    "optimizer.pt|optimizer_*/*",
    "scheduler.pt",
    "rng_state*.pth",
    "trainer_state.json",
)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a crash leaves the old file or the new one, never half.

    Example:
        >>> atomic_write_json(Path("out/state.json"), {"rounds": []})  # doctest: +SKIP
    """
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def read_json(path: Path, remedy: str) -> Any:
    """Read a JSON file the pipeline wrote; a damaged one is an error naming the file and ``remedy``.

    Example:
        >>> read_json(Path("out/state.json"), "delete out to start over.")  # doctest: +SKIP
        {'config': {...}, 'rounds': [...]}
    """
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err}); {remedy}") from err


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, without creating anything.

    Example:
        >>> check_writable(Path("/etc/passwd/run"))  # doctest: +SKIP
        Traceback (most recent call last):
        OSError: Output directory /etc/passwd/run is not writable (/etc/passwd is not a writable folder); ...
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OSError(
            f"Output directory {out} is not writable ({existing} is not a writable folder); "
            "choose another output_dir."
        )


def finished_rounds(out: Path, num_rounds: int) -> list[dict[str, Any]]:
    """Records of rounds 1, 2, ... whose healed model folder exists (a round is finished once it does).

    Example:
        >>> [r["round"] for r in finished_rounds(Path("out"), num_rounds=3)]  # doctest: +SKIP
        [1, 2]
    """
    records = []
    for k in range(1, num_rounds + 1):
        folder = out / f"round-{k}" / "model"
        if not folder.is_dir():
            break
        records.append(read_json(folder / ROUND_RECORD, f"delete {folder} to redo round {k}."))
    return records


def final_ready(out: Path, state: RunState | None) -> bool:
    """Whether the run in ``out`` finished with ``out/final`` intact (a rerun then changes nothing).

    A finished run whose ``final/`` was deleted is not ready: the rerun rebuilds it from the last
    round's model. A damaged ``final/`` is an error, as it may hold the user's own edits.

    Example:
        >>> final_ready(Path("out"), RunState.load(Path("out/state.json")))  # doctest: +SKIP
        True
    """
    if state is None or not state.finished or not (out / "final").exists():
        return False
    problem = folder_problem(out / "final")
    if problem is not None:
        raise ValueError(f"{problem}. Delete {out / 'final'} and rerun: it is rebuilt from the last round.")
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_NAME)


def mark_complete(folder: Path, required: Sequence[str] = ()) -> None:
    """Flush every file of ``folder`` to disk, then record their sizes and SHA-256 in ``COMPLETE_NAME``.

    Raises:
        FileNotFoundError: when a ``required`` pattern (``"a|b"``: either) matches no file (the folder
            stays unmarked).

    Example:
        >>> mark_complete(Path("out/round-1/heal/checkpoint-10"), CHECKPOINT_FILES)  # doctest: +SKIP
    """
    missing = [pattern for pattern in required if not any(any(folder.glob(p)) for p in pattern.split("|"))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; it is not marked complete.")
    record = {}
    for path in _files(folder):
        _fsync(path)
        record[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_json(folder / COMPLETE_NAME, {"files": record, "required": list(required)})


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted (naming the file at fault), or ``None`` when it is complete.

    Example:
        >>> folder_problem(Path("out/round-1/heal/checkpoint-10"))  # doctest: +SKIP
        'out/round-1/heal/checkpoint-10/scheduler.pt is missing'
    """
    marker = folder / COMPLETE_NAME
    if not marker.is_file():
        return f"{folder} has no {COMPLETE_NAME}: its writing was interrupted"
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return f"{marker} is damaged"
    for name, expected in record["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{path} was changed or truncated after it was written"
    return None


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success mark it complete and rename it to ``target``.

    An existing ``target`` is replaced; an exception (or a crash) leaves ``target`` as it was.

    Example:
        >>> with atomic_folder(Path("out/final")) as tmp:  # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    tmp = target.with_name(TMP_PREFIX + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # e.g. a full disk: free what was written (a kill leaves it to the rerun)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mark_complete(tmp)
    remove_folder(target)
    os.replace(tmp, target)
    _fsync(target.parent)


def remove_folder(path: Path) -> None:
    """Delete ``path``: renamed away first (one atomic step), so it is never seen half-deleted.

    Example:
        >>> remove_folder(Path("out/round-1/heal"))  # doctest: +SKIP
    """
    if not path.exists():
        return
    trash = path.with_name(f"{TMP_PREFIX}{path.name}.removed")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    _fsync(path.parent)
    if path.name == "heal":
        crash_point("heal-removal")
    shutil.rmtree(trash)


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files and folders a crash left directly inside ``folder``.

    Example:
        >>> remove_leftovers(Path("out/round-2"))  # doctest: +SKIP
    """
    for leftover in folder.glob(TMP_PREFIX + "*") if folder.is_dir() else []:
        logger.info("Removing %s, left by an interrupted run", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def _checkpoints(heal_dir: Path) -> list[Path]:
    found = [p for p in heal_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_complete_checkpoint(heal_dir: Path) -> Path | None:
    """The newest Trainer checkpoint in ``heal_dir`` that is complete and intact; others are reported.

    Example:
        >>> last_complete_checkpoint(Path("out/round-1/heal"))  # doctest: +SKIP
        PosixPath('out/round-1/heal/checkpoint-20')
    """
    for checkpoint in _checkpoints(heal_dir):
        problem = folder_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("Not resuming from %s: %s.", checkpoint, problem)
    return None


def remove_checkpoints(heal_dir: Path, keep: Path | None) -> None:
    """Delete every checkpoint in ``heal_dir`` except ``keep`` (older, incomplete or damaged ones).

    Example:
        >>> remove_checkpoints(heal_dir, keep=last_complete_checkpoint(heal_dir))  # doctest: +SKIP
    """
    for checkpoint in _checkpoints(heal_dir):
        if checkpoint != keep:
            remove_folder(checkpoint)


class CheckpointCompletion(TrainerCallback):
    """After the Trainer saves a checkpoint: record it complete, then delete the older ones.

    The Trainer's own rotation (``save_total_limit``) would delete the last complete checkpoint before
    the new one is known to be whole; here the old one goes only after the new one is marked.
    """

    def on_step_end(self, args, state, control, **kwargs):
        crash_point("heal-step")

    def on_save(self, args, state, control, **kwargs):
        distributed = PartialState()
        distributed.wait_for_everyone()  # every rank has written its RNG state
        if distributed.is_main_process:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            crash_point("checkpoint-write")
            mark_complete(folder, CHECKPOINT_FILES)
            remove_checkpoints(folder.parent, keep=folder)
        distributed.wait_for_everyone()
