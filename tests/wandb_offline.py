"""Read back what an offline W&B run wrote (``$WANDB_DIR/wandb/offline-run-*/run-<id>.wandb``).

The file is a header ``<4sHB>`` == (b":W&B", 0xBEE1, 0) followed by LevelDB-log-style 32 KiB blocks:
records with a 7-byte header ``<IHB>`` (crc32, length, type: 1 full, 2 first, 3 middle, 4 last; a
record may be split across blocks, block tails shorter than a header are padding). Each payload is a
``wandb.proto.wandb_internal_pb2.Record``; ``record.history.item[*]`` carries ``key`` or a
``nested_key`` path (media and tables: ``["bias/heatmap", "_type"]``, ...) and ``value_json``.
Call ``wandb.finish()`` before reading, and then still wait: measured here (wandb 0.31), ``finish()``
returns when the file holds only its full 32 KiB blocks; the tail (last history rows, ``exit``) lands
a fraction of a second later. :func:`wait_for_exit` polls until the ``exit`` record is there.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_wandb_in(monkeypatch: Any, wandb_dir: str | Path) -> None:
    """Send the next ``wandb.init`` without a ``dir`` (a Trainer's) offline into ``wandb_dir``.

    wandb reads ``WANDB_DIR`` once, when its process-wide settings are first built, so an earlier test
    of the same process that ran wandb would keep its directory; ``wandb.teardown()`` drops them.
    """
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()


def run_files(wandb_dir: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files of the offline runs under ``wandb_dir``."""
    return sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))


def read_records(path: str | Path) -> list[Any]:
    """Decode every record of one ``.wandb`` file (raises on a bad header, checksum or framing)."""
    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B log (header {ident!r}, {magic:#x}, {version})")
    pos, records, pending = HEADER.size, [], b""
    while pos + RECORD.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD.size:  # padding at the end of a block
            pos += left_in_block
            continue
        crc, length, kind = RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero fill
            pos += left_in_block
            continue
        payload = data[pos + RECORD.size : pos + RECORD.size + length]
        if len(payload) < length:
            break  # truncated tail
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at offset {pos}")
        pos += RECORD.size + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown record type {kind} at offset {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def wait_for_exit(path: str | Path, timeout: float = 30.0) -> list[Any]:
    """Records of a finished run: poll until the ``exit`` record is written and the size is stable."""
    deadline = time.monotonic() + timeout
    last_size = -1
    while True:
        size = Path(path).stat().st_size
        records = read_records(path)
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if done and size == last_size:
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no complete run after {timeout} s (exit record: {done})")
        last_size = size
        time.sleep(0.2)


def history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows (``wandb.log`` calls) of a finished run as ``{key: decoded value}`` dicts, in order."""
    rows = []
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            target = row
            for part in path[:-1]:  # media and tables arrive flattened: ["bias/heatmap", "_type"]
                target = target.setdefault(part, {})
            target[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_dir(path: str | Path) -> Path:
    """The run folder (``offline-run-*``) of a ``.wandb`` file; media live under ``files/media``."""
    return Path(path).parent


def summary(path: str | Path) -> dict[str, Any]:
    """The run's summary as written by ``run.summary.update`` (last value per key)."""
    out: dict[str, Any] = {}
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def value_and_prefix(keys: set[str]) -> set[str]:
    """Keys that are also the prefix of another key (W&B cannot show both in one section tree)."""
    return {k for k in keys if any(other.startswith(k + "/") for other in keys)}
