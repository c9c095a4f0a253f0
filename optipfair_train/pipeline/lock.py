"""One run at a time per output folder: an exclusive lock held while a run writes there.

Two runs writing the same ``output_dir`` would overwrite each other's files (or fail renaming the
same temporary file), so the second one is refused at once, naming the first one's pid and host. The
lock is an ``flock`` on ``output_dir/optipfair-train.lock``: the kernel releases it when the holding
process ends, however it ends, so a killed run never blocks the next one. The file itself stays (deleting
a lock file lets a third process lock a new file while a second still holds the old one).

Example:
    >>> lock = lock_output_dir(Path("out"), PartialState())  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from accelerate import PartialState

from ..pruning.io import disk_full, write_error

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "OutputInUseError", "OutputLock", "lock_output_dir", "OutputGuard"]

LOCK_NAME = "optipfair-train.lock"


class OutputInUseError(OSError):
    """Another run holds the output folder's lock."""


class OutputLock:
    """An exclusive ``flock`` on ``out/LOCK_NAME``; the file records the holder's pid and host.

    Raises:
        OutputInUseError: another process holds it (the message names the folder, pid and host).

    Example:
        >>> lock = OutputLock(Path("out"))  # doctest: +SKIP
        >>> lock.release()  # doctest: +SKIP
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUseError(
                f"{out} is in use by another optipfair-train run ({self._holder()}); wait for it to end "
                "or choose another output_dir."
            ) from None
        except OSError as err:  # a file system without locks (some network mounts): run, but say so
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            logger.warning("Cannot lock %s (%s): a second run on this folder would not be refused.", out, err)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd: int | None = fd

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
            return "a process that is just starting"

    def release(self) -> None:
        """Let the next run in (closing the file releases the lock); returns ``None``."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_output_dir(out: Path, distributed: PartialState) -> OutputLock | None:
    """Lock ``out`` for this run: the main process holds the lock, every rank gets the same refusal.

    Returns the lock on the main process, ``None`` on the others.

    Raises:
        OutputInUseError: another run holds the lock.

    Example:
        >>> lock = lock_output_dir(Path("out"), PartialState())  # doctest: +SKIP
    """
    lock, refusal = None, None
    if distributed.is_main_process:
        try:
            lock = OutputLock(out)
        except OutputInUseError as err:
            refusal = str(err)
    if distributed.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise OutputInUseError(refusal)
    return lock


class OutputGuard:
    """A run's hold on its output folder: the lock (taken by :meth:`lock`, released when the ``with``
    block ends, however it ends) and a full disk reported with the folder's name.

    Example:
        >>> guard = OutputGuard(Path("out"), PartialState())  # doctest: +SKIP
        >>> with guard:  # doctest: +SKIP
        ...     guard.lock()
    """

    def __init__(self, out: Path, distributed: PartialState):
        self.out, self.distributed = out, distributed
        self.held: OutputLock | None = None  # on the main process
        self.taken = False  # on every rank: each must call lock_output_dir (a collective) exactly once

    def lock(self, early: bool = False) -> None:
        """Take the lock, once (see :func:`lock_output_dir`).

        ``early``: before the run's first write, in a folder that exists already, so that a second run is
        refused before it loads anything. Skipped in multi-process runs: ranks could see the folder at
        different moments and so disagree on taking it; they all take it when the folder is opened.
        """
        if self.taken or (early and self.distributed.num_processes > 1):
            return
        self.held = lock_output_dir(self.out, self.distributed)
        self.taken = True

    def __enter__(self) -> OutputGuard:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if self.held is not None:
            self.held = self.held.release()
        self.taken = False
        # torch and safetensors report a full disk in words that name no folder
        if isinstance(err, (OSError, RuntimeError)) and disk_full(err) and str(self.out) not in str(err):
            raise write_error(self.out, err) from err
