"""The run's verdict in a few lines: what a person deciding whether to ship the final model reads first.

The console (the end of ``optipfair-train run``), the top of ``report.html`` and the W&B summary all
print the same numbers, computed here from the card dict (:mod:`.card`):

- parameters, base -> final, as a percent change;
- perplexity on general text (``perplexity/general``, e.g. WikiText-2 test, which no healing saw) as a
  ratio to the base's, beside the healing-domain one (``perplexity``, held-out text of the healing data,
  which healing can flatter);
- the StereoSet SS change vs the base with its paired 95% interval and the number of items (an interval
  that holds 0 is "no measurable change");
- zero-shot accuracy: the slot :func:`zeroshot_line` fills when the stages carry ``zeroshot/accuracy``
  (mean accuracy over the tasks, %) and ``zeroshot/accuracy_change`` with ``_ci_low`` / ``_ci_high``;
- with ``reference_run``: the final model's SS change vs that run's final model, paired
  (``reference/stereoset/ss_change``, :mod:`.reference`).

Example:
    >>> card = {"baseline": {"parameters": 100, "perplexity/general": 20.0},
    ...         "rounds": [{"round": 1, "healed": {"parameters": 80, "perplexity/general": 22.0}}],
    ...         "general_text": "WikiText-2 test"}
    >>> verdict_lines(card)[1]
    'parameters: 100 -> 80 (-20.0%)'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = [
    "named_file",
    "run_files",
    "short_text_name",
    "verdict",
    "verdict_lines",
    "wandb_summary",
    "zeroshot_line",
]


def short_text_name(name: str | None) -> str | None:
    """A text's name for a table header: ``WikiText-2 test`` without its path, a file by its file name.

    Example:
        >>> short_text_name("WikiText-2 test (../shared/data/wikitext-2/test.txt)")
        'WikiText-2 test'
        >>> short_text_name("/home/me/data/news.txt")
        'news.txt'
    """
    if not name:
        return name
    name = re.sub(r"\s*\([^()]*[/\\][^()]*\)$", "", name)  # a trailing "(some/path)"
    return Path(name).name if ("/" in name or "\\" in name) else name


def named_file(name: str | None) -> str | None:
    """A text's name for a sentence: ``WikiText-2 test (test.txt)``, the file by its name, not its path.

    Example:
        >>> named_file("WikiText-2 test (../shared/data/wikitext-2/test.txt)")
        'WikiText-2 test (test.txt)'
    """
    short = short_text_name(name)
    path = re.search(r"\(([^()]*[/\\][^()]*)\)$", name or "")
    return f"{short} ({Path(path.group(1)).name})" if path else short


def run_files(out: str | Path) -> dict[str, str]:
    """Where a pipeline run in ``out`` puts what a person opens: the final model, its card, the report.

    Example:
        >>> run_files("outputs/demo")["report"]
        'outputs/demo/report.html'
    """
    out = Path(out)
    return {
        "final model": str(out / "final"),
        "model card": str(out / "final" / "README.md"),
        "report": str(out / "report.html"),
    }


def _final(card: dict) -> tuple[str, dict]:
    rounds = card.get("rounds") or []
    if not rounds:
        return "base", card["baseline"]
    return f"round {rounds[-1]['round']} healed", rounds[-1]["healed"]


def _ratio(base: dict, final: dict, key: str) -> dict | None:
    if base.get(key) is None or final.get(key) is None:
        return None
    return {"base": base[key], "final": final[key], "ratio": final[key] / base[key]}


def _change(final: dict, key: str) -> dict | None:
    if final.get(key) is None or final.get(f"{key}_ci_low") is None:
        return None
    low, high = final[f"{key}_ci_low"], final[f"{key}_ci_high"]
    return {"change": final[key], "ci_low": low, "ci_high": high, "measurable": not low <= 0 <= high}


def verdict(card: dict[str, Any]) -> dict[str, Any]:
    """The verdict's numbers: ``parameters`` (base, final, percent change), ``general`` and
    ``heal_domain`` perplexity (base, final, ratio; None when not measured), ``stereoset_ss`` change
    (change, interval, ``measurable``, ``n``), ``zeroshot`` (change, interval, or None), ``reference_ss``
    (the SS change vs ``reference_run``'s same stage, or None) and ``final_stage``.

    Example:
        >>> verdict({"baseline": {"parameters": 10}, "rounds": []})["parameters"]["percent_change"]
        0.0
    """
    base = card["baseline"]
    stage, final = _final(card)
    params = {"base": base.get("parameters"), "final": final.get("parameters"), "percent_change": None}
    if params["base"] and params["final"] is not None:
        params["percent_change"] = 100.0 * (params["final"] - params["base"]) / params["base"]
    ss = _change(final, "stereoset/ss_change")
    if ss is not None:
        ss["n"] = final.get("stereoset/num_items")
    reference = _change(final, "reference/stereoset/ss_change")
    if reference is not None:
        reference["n"] = final.get("reference/stereoset/num_items")
    zeroshot = _change(final, "zeroshot/accuracy_change")
    if zeroshot is not None:  # items over every task (zeroshot/<task>/num_items)
        zeroshot["n"] = sum(
            v for k, v in final.items() if k.startswith("zeroshot/") and k.endswith("/num_items")
        )
    return {
        "final_stage": stage,
        "parameters": params,
        "general": _ratio(base, final, "perplexity/general"),
        "heal_domain": _ratio(base, final, "perplexity"),
        "stereoset_ss": ss,
        "zeroshot": zeroshot,
        "reference_ss": reference,
        "final_has_ss": final.get("stereoset/ss") is not None,
    }


def _perplexity_line(label: str, entry: dict | None, missing: str) -> str:
    if entry is None:
        return f"{label}: {missing}"
    return f"{label}: {entry['base']:.2f} -> {entry['final']:.2f} ({entry['ratio']:.2f}x base)"


def _change_line(label: str, entry: dict | None, unit: str, up: str, down: str, missing: str) -> str:
    if entry is None:
        return f"{label}: {missing}"
    meaning = "no measurable change (the interval holds 0)"
    if entry["measurable"]:
        meaning = up if entry["change"] > 0 else down
    n = f", n={entry['n']} items" if entry.get("n") else ""
    return (
        f"{label}: {entry['change']:+.1f}{unit} [{entry['ci_low']:+.1f}, {entry['ci_high']:+.1f}] "
        f"(paired 95% CI{n}): {meaning}"
    )


def zeroshot_line(v: dict[str, Any]) -> str:
    """The zero-shot accuracy line of the verdict (a slot until the stages carry zero-shot scores).

    Example:
        >>> zeroshot_line({"zeroshot": None})
        'zero-shot accuracy change vs base: not measured'
    """
    return _change_line(
        "zero-shot accuracy change vs base", v["zeroshot"], " points",
        "measurably higher", "measurably lower", "not measured",
    )  # fmt: skip


def verdict_lines(card: dict[str, Any], files: dict[str, str] | None = None) -> list[str]:
    """The verdict as plain lines (the console prints them; the report shows them first).

    ``files``: label -> path (final model folder, model card, report) added at the end.

    Example:
        >>> verdict_lines({"baseline": {"parameters": 10}, "rounds": []})[0]
        'Verdict, base -> base:'
    """
    v = verdict(card)
    p = v["parameters"]
    general = card.get("general_text")
    lines = [f"Verdict, base -> {v['final_stage']}:"]
    if p["percent_change"] is not None:
        lines.append(f"parameters: {p['base']:,} -> {p['final']:,} ({p['percent_change']:+.1f}%)")
    lines += [
        _perplexity_line(
            f"perplexity, general text ({short_text_name(general) or 'none'}; no healing saw it)",
            v["general"],
            "not measured (" + (card.get("general_note") or "no general_eval_data given") + ")",
        ),
        _perplexity_line(
            f"perplexity, healing domain ({short_text_name(card.get('heal_text')) or '?'}, held out)",
            v["heal_domain"],
            "not measured",
        ),
        _change_line(
            "StereoSet SS change vs base", v["stereoset_ss"], "",
            "more stereotyped choices", "fewer stereotyped choices",
            "no paired change recorded" if v["final_has_ss"] else "not measured (no stereoset_data)",
        ),
        zeroshot_line(v),
    ]  # fmt: skip
    if card.get("reference_run"):
        lines.append(_change_line(
            f"StereoSet SS change vs the reference run ({card['reference_run']})", v["reference_ss"], "",
            "more stereotyped choices", "fewer stereotyped choices", "not paired (the run's log says why)",
        ))  # fmt: skip
    for label, path in (files or {}).items():
        lines.append(f"{label}: {path}")
    return lines


def wandb_summary(card: dict[str, Any]) -> dict[str, float]:
    """The verdict's numbers as W&B summary keys (``verdict/*``); missing ones are left out.

    Example:
        >>> wandb_summary({"baseline": {"parameters": 10}, "rounds": []})
        {'verdict/parameters_change_percent': 0.0}
    """
    v = verdict(card)
    out = {"verdict/parameters_change_percent": v["parameters"]["percent_change"]}
    for name in ("general", "heal_domain"):
        if v[name] is not None:
            out[f"verdict/perplexity_ratio/{name}"] = v[name]["ratio"]
    for name in ("stereoset_ss", "zeroshot", "reference_ss"):
        if v[name] is not None:
            for key in ("change", "ci_low", "ci_high"):
                out[f"verdict/{name}_{key}"] = v[name][key]
    return {k: val for k, val in out.items() if val is not None}
