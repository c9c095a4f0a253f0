"""Test hook: kill the pipeline at a named point, to prove that a rerun resumes to the same model.

Only tests set ``OPTIPFAIR_TRAIN_CRASH_AT``; unset (always, in real use) :func:`crash_point` does nothing.
``OPTIPFAIR_TRAIN_CRASH_AT=model-save:3`` sends SIGKILL to the process the third time it reaches
``crash_point("model-save")`` (``:1`` when no count is given). The points:

- ``model-save``: a model's weights are written into its temporary folder, nothing else yet
  (saves are counted: 1 = round-1/pruned, 2 = round-1/model, 3 = round-2/pruned, ...);
- ``heal-step``: a healing optimizer step ended (counted over the whole process);
- ``checkpoint-write``: the Trainer wrote a checkpoint, its completion record not yet;
- ``heal-removal``: a finished round's heal folder was renamed away, not yet deleted;
- ``between-rounds``: a round is finished and recorded, the next has not started;
- ``card-write``: the final folder's weights are copied, the model card not yet written;
- ``report-write``: the final folder is in place (the speed comparison recorded), report.html not yet;
- ``teacher-cache``: kd / kd_lora: the teacher cache file is written, healing not started;
- ``teacher-text``: ``heal_data: teacher``: the sampled healing text is written, nothing after it.

Example:
    >>> crash_point("model-save")  # nothing happens unless the variable names this point
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "OPTIPFAIR_TRAIN_CRASH_AT"
_reached: Counter = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process if ``OPTIPFAIR_TRAIN_CRASH_AT`` names ``name`` (and this is its n-th visit)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
