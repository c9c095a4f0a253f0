"""Zero-shot accuracy at every pipeline stage: the stage metrics it adds and the card's table of them.

Stage metrics (plain JSON numbers in ``state.json``, so the card, the report and W&B read the same):

- ``zeroshot/accuracy`` with ``_ci_low`` / ``_ci_high``: mean ``acc`` over the tasks (%), 95% bootstrap;
- ``zeroshot/accuracy_change`` with ``_ci_low`` / ``_ci_high``: its change since the base, paired (the same
  items resampled for both models), for every stage after the base;
- per task: ``zeroshot/<task>/acc`` (``_ci_low`` / ``_ci_high``), ``zeroshot/<task>/acc_norm`` when the
  task reports it, ``zeroshot/<task>/acc_change`` (paired, with its interval), ``zeroshot/<task>/num_items``;
- ``zeroshot/seconds``: what the measurement cost.

The base model's per-item answers are kept (``ZeroShotStage.base``; the pipeline stores them in
``state.json``), so a resumed run pairs later stages against the same base answers without re-measuring.

Example:
    >>> stage = ZeroShotStage(["arc_easy", "piqa"], sample_size=100, seed=0)  # doctest: +SKIP
    >>> stage.measure(model, tokenizer, is_base=True)["zeroshot/accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ZeroShotStage", "parse_task_data", "zeroshot_card_lines", "zeroshot_tasks_of"]

_PREFIX = "zeroshot/"


def parse_task_data(text: str) -> dict[str, str]:
    """``"arc_easy=PATH,piqa=NAME"`` -> ``{"arc_easy": "PATH", "piqa": "NAME"}`` ('' -> {}).

    Raises:
        ValueError: for an entry that is not ``TASK=SOURCE``.

    Example:
        >>> parse_task_data("arc_easy=a.arrow, piqa=ybisk/piqa")
        {'arc_easy': 'a.arrow', 'piqa': 'ybisk/piqa'}
    """
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        task, sep, source = entry.partition("=")
        if not sep or not task.strip() or not source.strip():
            raise ValueError(f"zeroshot_data takes TASK=SOURCE entries separated by commas, got {entry!r}")
        out[task.strip()] = source.strip()
    return out


class ZeroShotStage:
    """Loads the task items once (a bad source fails before any folder is written) and measures a model.

    Example:
        >>> ZeroShotStage(["piqa"], sample_size=50, seed=0, sources={"piqa": "piqa.arrow"})  # doctest: +SKIP
    """

    def __init__(
        self,
        tasks: Sequence[str],
        sample_size: int | None,
        seed: int,
        sources: Mapping[str, str] | None = None,
    ):
        from ..zeroshot import load_tasks

        self.tasks, self.sample_size, self.seed = load_tasks(tasks, sources), sample_size, seed
        # the base model's per-item answers: {"tasks": {name: {"acc_items": [...], "item_keys": [...]}}}
        self.base: dict | None = None
        self.last: dict | None = None  # the last measured stage's, as the same mapping

    def measure(self, model, tokenizer, is_base: bool = False) -> dict[str, Any]:
        """The stage metrics of the module docstring; the base's answers are kept for later pairing, and
        every stage's in :attr:`last` (for the run folder's per-item files)."""
        from ..zeroshot import zeroshot_change, zeroshot_scalars, zeroshot_scores

        result = zeroshot_scores(model, tokenizer, self.tasks, sample_size=self.sample_size, seed=self.seed)
        change = None
        self.last = {
            "tasks": {n: {k: e[k] for k in ("acc_items", "item_keys")} for n, e in result["tasks"].items()}
        }
        if is_base:
            self.base = self.last
        elif self.base is not None:
            change = zeroshot_change(self.base, result, seed=self.seed)
        return zeroshot_scalars(result, change)


def zeroshot_tasks_of(metrics: Mapping[str, Any]) -> list[str]:
    """The task names a stage's metrics hold, in the order measured.

    Example:
        >>> zeroshot_tasks_of({"zeroshot/piqa/acc": 60.0, "zeroshot/accuracy": 60.0})
        ['piqa']
    """
    return [k[len(_PREFIX) : -len("/acc")] for k in metrics if k.startswith(_PREFIX) and k.endswith("/acc")]


def _cell(m: Mapping[str, Any], key: str) -> str:
    if m.get(key) is None:
        return "-"
    return f"{m[key]:.1f} [{m[key + '_ci_low']:.1f}, {m[key + '_ci_high']:.1f}]"


def _change(m: Mapping[str, Any], key: str) -> str:
    if m.get(key) is None:
        return ""
    return f" ({m[key]:+.1f} [{m[key + '_ci_low']:+.1f}, {m[key + '_ci_high']:+.1f}])"


def zeroshot_card_lines(card: Mapping[str, Any]) -> list[str]:
    """The card's zero-shot section: one row per stage, per task ``acc [95% CI]`` and, after the base,
    its paired change vs base in parentheses, then the mean over tasks and its paired change. Empty
    when no stage measured zero-shot accuracy.

    Example:
        >>> m = {"zeroshot/piqa/acc": 60.0, "zeroshot/piqa/acc_ci_low": 50.0, "zeroshot/piqa/acc_ci_high": 70.0,
        ...      "zeroshot/piqa/num_items": 100, "zeroshot/accuracy": 60.0, "zeroshot/accuracy_ci_low": 50.0,
        ...      "zeroshot/accuracy_ci_high": 70.0}
        >>> zeroshot_card_lines({"baseline": m, "rounds": []})[-1]
        '| base | 60.0 [50.0, 70.0] | 60.0 [50.0, 70.0] | - |'
    """
    stages = [("base", card["baseline"])]
    for r in card.get("rounds", []):
        stages += [(f"round {r['round']} pruned", r["pruned"]), (f"round {r['round']} healed", r["healed"])]
    measured = [(name, m) for name, m in stages if m.get(f"{_PREFIX}accuracy") is not None]
    if not measured:
        return []
    tasks = zeroshot_tasks_of(measured[0][1])
    sizes = ", ".join(f"{t} {measured[0][1].get(f'{_PREFIX}{t}/num_items', '?')}" for t in tasks)
    lines = [
        "## Zero-shot accuracy",
        "",
        "Accuracy (`acc`, %) on lm-evaluation-harness 0.4.13's prompts, zero-shot, the same seeded items at "
        f"every stage (items per task: {sizes}); in parentheses the change vs base, paired (the same items "
        "resampled for both models: an interval that holds 0 means no measurable change). 95% bootstrap "
        "intervals.",
        "",
        "| stage | " + " | ".join(tasks) + " | mean | mean change vs base |",
        "|" + "---|" * (len(tasks) + 3),
    ]
    for name, m in measured:
        cells = [_cell(m, f"{_PREFIX}{t}/acc") + _change(m, f"{_PREFIX}{t}/acc_change") for t in tasks]
        change = _change(m, f"{_PREFIX}accuracy_change").strip(" ()") or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(m, f'{_PREFIX}accuracy')} | {change} |")
    return lines
