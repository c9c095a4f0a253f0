"""A run's stages paired with the same stages of another run (``reference_run``), item by item.

With ``reference_run`` naming another run's ``output_dir`` (for example the same settings without a
fairness mode), every stage whose same-named stage that run measured on the same items
(:mod:`.stage_items`: equal fingerprints) gets, beside its change vs base:

- ``reference/stereoset/ss_change``, ``reference/stereoset/lms_change``, ``reference/stereoset/icat_change``
  with ``_ci_low`` / ``_ci_high``: this stage minus the reference's, paired (the same items resampled
  for both, :func:`~optipfair_train.bias.stereoset_change`); per bias type
  ``reference/stereoset/ss_change/<type>`` (and ``_ci_low`` / ``_ci_high``, lms, icat);
  ``reference/stereoset/num_items`` and ``reference/stereoset/ss_flipped`` (percent of items whose
  stereotype preference differs between the two models);
- ``reference/zeroshot/accuracy_change`` (the mean over tasks) and ``reference/zeroshot/<task>/acc_change``
  with paired intervals (:func:`~optipfair_train.zeroshot.zeroshot_change`);
- ``reference/perplexity_ratio`` (healing-domain text) and ``reference/perplexity/general_ratio``: this
  stage's perplexity over the reference's, when both were measured on the same text.

A stage that cannot be paired (the reference has no such stage, judged other items, or measured no such
probe) gets no ``reference/*`` value, and a warning says why. :func:`check_reference_run` refuses a
``reference_run`` that is not a run folder before anything is written. :func:`reference_card_lines`
is the card's section.

Example:
    >>> folder = check_reference_run("outputs/demo", output_dir="outputs/demo-fair")  # doctest: +SKIP
    >>> reference_metrics(folder, record, seed=0)["reference/stereoset/ss_change"]  # doctest: +SKIP
    -3.1
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .run_state import STATE_NAME, RunState
from .stage_items import ITEMS_DIR, read_stage_items, saved_stages

logger = logging.getLogger(__name__)

__all__ = [
    "PREFIX",
    "check_reference_run",
    "reference_card_lines",
    "reference_metrics",
]

PREFIX = "reference/"
_RATIOS = {
    "perplexity": "reference/perplexity_ratio",
    "perplexity/general": "reference/perplexity/general_ratio",
}


def check_reference_run(reference: str, output_dir: str | Path) -> Path | None:
    """The folder of ``reference_run`` (``None`` for ''), checked before the run writes anything.

    Raises:
        ValueError: naming ``reference_run`` when it is not a folder, is this run's own ``output_dir``,
            holds no ``state.json`` (not a run folder) or a malformed one.

    Example:
        >>> check_reference_run("", "outputs/demo-fair") is None
        True
    """
    if not reference:
        return None
    folder = Path(reference)
    accepted = "it takes the output_dir of another pipeline run (a folder with state.json), or '' for none"
    if not folder.is_dir():
        raise ValueError(f"reference_run: {reference} is not a folder; {accepted}.")
    if os.path.realpath(folder) == os.path.realpath(output_dir):
        raise ValueError(f"reference_run: {reference} is this run's own output_dir; {accepted}.")
    try:
        state = RunState.load(folder / STATE_NAME)
    except ValueError as err:
        raise ValueError(f"reference_run: {reference} is not a readable run folder ({err})") from err
    if state is None:
        raise ValueError(
            f"reference_run: {reference} holds no {STATE_NAME}, so it is not a run folder; {accepted}."
        )
    if not saved_stages(folder):
        logger.warning(
            "reference_run: %s holds no per-item results (%s/): no stage can be paired with it; rerun it.",
            reference,
            ITEMS_DIR,
        )
    return folder


def _stereoset(ref: Mapping[str, Any], mine: Mapping[str, Any], seed: int) -> tuple[dict[str, float], str]:
    from ..bias import STEREOSET_SCORES, stereoset_change, stereoset_change_scalars

    if ref["fingerprint"] != mine["fingerprint"]:
        return {}, (
            f"StereoSet: it judged other items ({len(ref['ids'])} items, fingerprint {ref['fingerprint']}; "
            f"here {len(mine['ids'])}, {mine['fingerprint']}): the same stereoset_data, "
            "stereoset_sample_size and seed are needed"
        )
    change = stereoset_change(ref, mine, seed=seed)
    out = stereoset_change_scalars(change, f"{PREFIX}stereoset/", STEREOSET_SCORES)
    out[f"{PREFIX}stereoset/num_items"] = change["num_items"]
    out[f"{PREFIX}stereoset/ss_flipped"] = change["ss_flipped"]
    return out, ""


def _zeroshot(ref: Mapping[str, Any], mine: Mapping[str, Any], seed: int) -> tuple[dict[str, float], str]:
    from ..zeroshot import zeroshot_change, zeroshot_change_scalars

    if ref["fingerprint"] != mine["fingerprint"]:
        return {}, (
            f"zero-shot: it answered other items (tasks {', '.join(ref['tasks'])}; here "
            f"{', '.join(mine['tasks'])}): the same zeroshot_tasks, zeroshot_sample_size and seed are needed"
        )
    return zeroshot_change_scalars(zeroshot_change(ref, mine, seed=seed), f"{PREFIX}zeroshot/"), ""


def reference_metrics(reference_dir: Path, record: Mapping[str, Any], seed: int = 0) -> dict[str, float]:
    """The ``reference/*`` metrics of one stage (the module docstring): ``record`` is this stage's
    per-item record (:func:`~optipfair_train.pipeline.stage_items.stage_record`), paired with the
    reference run's record of the same stage; what cannot be paired is left out with a warning.

    Example:
        >>> m = reference_metrics(Path("outputs/demo"), record, seed=0)  # doctest: +SKIP
        >>> m["reference/stereoset/ss_change"], m["reference/perplexity/general_ratio"]  # doctest: +SKIP
    """
    stage = record["stage"]
    ref = read_stage_items(reference_dir, stage)
    if ref is None:
        have = ", ".join(saved_stages(reference_dir)) or "none"
        logger.warning(
            "reference_run %s has no per-item results of stage %s (it has: %s); %s is not paired.",
            reference_dir, stage, have, stage,
        )  # fmt: skip
        return {}
    out: dict[str, float] = {}
    reasons = []
    for probe, pair in (("stereoset", _stereoset), ("zeroshot", _zeroshot)):
        if probe not in record:
            continue
        if probe not in ref:
            reasons.append(f"{probe}: the reference run did not measure it")
            continue
        metrics, reason = pair(ref[probe], record[probe], seed)
        out |= metrics
        reasons += [reason] if reason else []
    mine, theirs = record.get("perplexity") or {}, ref.get("perplexity") or {}
    for key, name in _RATIOS.items():
        if mine.get(key) is None or theirs.get(key) is None:
            continue
        texts = (mine.get("texts", {}).get(key), theirs.get("texts", {}).get(key))
        if texts[0] != texts[1]:
            reasons.append(f"{key}: measured on other text ({texts[1]}; here {texts[0]})")
            continue
        out[name] = mine[key] / theirs[key]
    for reason in reasons:
        logger.warning("reference_run %s, stage %s: not paired on %s.", reference_dir, stage, reason)
    return out


def _signed(m: Mapping[str, Any], key: str, part: str = "") -> str:
    """``change [low, high]`` of ``key`` (of its breakdown ``/part``: ``key_ci_low/part``...), or '-'."""
    value = m.get(key + part)
    if value is None:
        return "-"
    return f"{value:+.1f} [{m[f'{key}_ci_low{part}']:+.1f}, {m[f'{key}_ci_high{part}']:+.1f}]"


def _ratio(m: Mapping[str, Any], key: str) -> str:
    return "-" if m.get(key) is None else f"{m[key]:.3f}"


def reference_card_lines(card: Mapping[str, Any]) -> list[str]:
    """The card's section "vs the run without the mode": per stage, the paired change vs the reference
    run's same stage (StereoSet SS / LMS / ICAT with n, SS per bias type with its n, zero-shot mean,
    perplexity ratios). Empty when the run has no ``reference_run``.

    Example:
        >>> m = {"reference/stereoset/ss_change": -2.0, "reference/stereoset/ss_change_ci_low": -5.0,
        ...      "reference/stereoset/ss_change_ci_high": 1.0, "reference/stereoset/num_items": 300}
        >>> reference_card_lines({"reference_run": "outputs/demo", "baseline": m, "rounds": []})[6]
        '| base | 300 | -2.0 [-5.0, +1.0] | - | - | - | - | - |'
    """
    if not card.get("reference_run"):
        return []
    stages = [("base", card["baseline"])]
    for r in card.get("rounds", []):
        stages += [(f"round {r['round']} pruned", r["pruned"]), (f"round {r['round']} healed", r["healed"])]
    lines = [
        "## vs the run without the mode",
        "",
        f"Each stage paired with the same stage of the run in `{card['reference_run']}` (`reference_run`), "
        "on the same items: the change is this run's value minus the reference run's, its 95% interval "
        "from resampling the same items for both models (an interval that holds 0 means no measurable "
        "difference); perplexity as the ratio of the two. n = items paired. '-' = not paired (the run's "
        "log says why).",
        "",
        "| stage | n | SS change | LMS change | ICAT change | zero-shot mean change | perplexity ratio "
        "| general perplexity ratio |",
        "|" + "---|" * 8,
    ]
    p = f"{PREFIX}stereoset/"
    for name, m in stages:
        n = m.get(f"{p}num_items")
        cells = [name, "-" if n is None else str(n)]
        cells += [_signed(m, f"{p}{s}_change") for s in ("ss", "lms", "icat")]
        cells += [_signed(m, f"{PREFIX}zeroshot/accuracy_change")]
        cells += [_ratio(m, key) for key in _RATIOS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    types = sorted({k.rsplit("/", 1)[1] for _, m in stages for k in m if k.startswith(f"{p}ss_change/")})
    if types:
        last = stages[-1][1]
        sizes = [f"{t} (n={last.get(f'stereoset/num_items/{t}', '?')})" for t in types]
        lines += [
            "",
            "SS change vs the reference run by bias type (paired, 95% interval; each type's own, wider):",
            "",
            "| stage | " + " | ".join(sizes) + " |",
            "|" + "---|" * (len(types) + 1),
        ]
        for name, m in stages:
            lines.append(
                f"| {name} | " + " | ".join(_signed(m, f"{p}ss_change", f"/{t}") for t in types) + " |"
            )
    return lines
