"""The model card written next to the final model: compact YAML metadata plus one row per stage.

The card is rendered from one plain dict (what the pipeline logged; JSON-serialisable)::

    {
      "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "heal_text": "demo",                 # the healing domain; "perplexity" is measured on its held-out split
      "general_text": "WikiText-2",        # held-out general text of "perplexity/general" (None: not measured)
      "eval_tokens": 4096,
      "healing": {"method": "lora", "data": "demo", "steps_per_round": 30, ...},
      "baseline": {metrics},               # metrics: see STAGE_KEYS
      "rounds": [{"round": 1, "events": [...], "heal_tokens": 15360, "pruned": {metrics}, "healed": {metrics}}],
      "speed": {...} or None,              # optipfair_train.speed.compare_speed(...)
      "reference_run": "outputs/demo",     # the run each stage is paired with ('': none; .reference)
    }

A stage's metrics: ``parameters``, ``perplexity`` (healing domain), ``perplexity/general``, StereoSet
``stereoset/ss`` with ``stereoset/ss_ci_low`` / ``stereoset/ss_ci_high``, ``stereoset/lms``,
``stereoset/icat``, CrowS-Pairs ``bias/score`` with ``bias/score_ci_low`` / ``bias/score_ci_high``.
Missing values print as ``-``. A stereotype score is only printed beside its language-modelling
counterpart (SS needs LMS), since a model that stops modelling language drifts towards 50.

Example:
    >>> write_model_card(Path("final"), card_inputs(config, state, speed))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..models import DEMO_MODEL_ID
from ..speed import speed_line
from .config import LORA_METHODS, TEACHER_TEXT
from .reference import reference_card_lines
from .run_state import RunState
from .verdict import named_file, short_text_name
from .zeroshot_stage import zeroshot_card_lines

__all__ = [
    "STAGE_KEYS",
    "FINAL_MARK",
    "base_model_name",
    "card_header",
    "card_inputs",
    "card_rows",
    "has_crows",
    "render_model_card",
    "shown_metrics",
    "write_model_card",
]

STAGE_KEYS = (
    "parameters",
    "perplexity",
    "perplexity/general",
    "stereoset/ss",
    "stereoset/ss_ci_low",
    "stereoset/ss_ci_high",
    "stereoset/ss_change",
    "stereoset/ss_change_ci_low",
    "stereoset/ss_change_ci_high",
    "stereoset/lms",
    "stereoset/icat",
    "bias/score",
    "bias/score_ci_low",
    "bias/score_ci_high",
    "zeroshot/accuracy",
    "zeroshot/accuracy_change",
)
_EVENT_KEYS = (
    "pruning_type",
    "method",
    "pruning_percentage",
    "removed_layers",
    "intermediate_sizes",
    "kept_kv_heads",
    "parameters_before",
    "parameters_after",
    "target_parameters",
)


FINAL_MARK = " (final, shipped)"  # after the stage name of the model in final/
KD_METHODS = ("kd", "kd_lora")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _interval(m: dict, key: str) -> str:
    if m.get(key) is None:
        return "-"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    bounds = f" [{low:.1f}, {high:.1f}]" if low is not None and high is not None else ""
    return f"{m[key]:.1f}{bounds}"


def _signed_interval(m: dict, key: str) -> str:
    if m.get(key) is None:
        return "-"
    return f"{m[key]:+.1f} [{m[f'{key}_ci_low']:+.1f}, {m[f'{key}_ci_high']:+.1f}]"


def base_model_name(config) -> str:
    """The name of the model the run started from, as the card and the pruning manifest give it.

    Example:
        >>> base_model_name(load_config(None, ["--model_path", "demo"]))  # doctest: +SKIP
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    return DEMO_MODEL_ID if config.model.model_path == "demo" else config.model.model_path


def shown_metrics(m: dict) -> dict:
    """The stage metrics the card and the report may print: StereoSet SS and ICAT only beside an LMS.

    Example:
        >>> shown_metrics({"stereoset/ss": 60.0, "perplexity": 20.0})
        {'perplexity': 20.0}
    """
    if m.get("stereoset/lms") is not None:
        return dict(m)
    return {k: v for k, v in m.items() if not (k.startswith("stereoset/ss") or k == "stereoset/icat")}


def card_rows(card: dict) -> list[dict[str, str]]:
    """The stage table as cells (base, then every round pruned / healed), exactly as the card prints it.

    Example:
        >>> card_rows({"baseline": {"parameters": 10, "perplexity": 2.5}, "rounds": []})[0]["parameters"]
        '10'
    """
    stages = [("base", card["baseline"])]
    for r in card.get("rounds", []):
        stages += [(f"round {r['round']} pruned", r["pruned"]), (f"round {r['round']} healed", r["healed"])]
    name, final = stages[-1]
    stages[-1] = (name + FINAL_MARK, final)
    rows = []
    for name, logged in stages:
        m = shown_metrics(logged)  # no SS without its LM score
        rows.append(
            {
                "stage": name,
                "parameters": _fmt(m.get("parameters")),
                "perplexity": _fmt(m.get("perplexity")),
                "perplexity/general": _fmt(m.get("perplexity/general")),
                "stereoset/ss": _interval(m, "stereoset/ss"),
                "stereoset/ss_change": _signed_interval(m, "stereoset/ss_change"),
                "stereoset/lms": _fmt(m.get("stereoset/lms"), 1),
                "stereoset/icat": _fmt(m.get("stereoset/icat"), 1),
                "bias/score": _interval(m, "bias/score"),
            }
        )
    if not has_crows(card):  # a column of dashes reads as a failure: it is left out, and the text says why
        for row in rows:
            del row["bias/score"]
    return rows


def has_crows(card: dict) -> bool:
    """Whether any stage carries the CrowS-Pairs-style score (``bias/score``; needs ``behaviour_pairs``)."""
    stages = [card["baseline"]] + [m for r in card.get("rounds", []) for m in (r["pruned"], r["healed"])]
    return any(m.get("bias/score") is not None for m in stages)


def _heals_on_eval_text(card: dict) -> bool:
    """Whether the first perplexity is measured on the healing domain (held-out part of the healing text)."""
    return card.get("healing", {}).get("data", card.get("heal_text")) == card.get("heal_text")


def _text_name(data: str | None) -> str:
    if data == TEACHER_TEXT:
        return "text written by the unpruned model (sampled at temperature 1)"
    return f"`{data}`"


# methods that choose from weights or positions alone (heads: L2, random; blocks: last, first, custom)
_NO_CALIBRATION = {"last", "first", "custom"}


def _used_calibration(event: dict) -> bool:
    """Whether a pruning event read the calibration text (data-driven scores, a refit, a fitted map)."""
    from ..pruning.scorers import weight_only_scorers

    method = event.get("method")
    data_driven = method not in _NO_CALIBRATION and method not in weight_only_scorers()
    return bool(event.get("reconstruct") or event.get("linear_replacement") or data_driven)


def card_header(card: dict) -> list[str]:
    """Column titles of :func:`card_rows`, named after the texts they were measured on."""
    general = short_text_name(card.get("general_text")) or "general text (none given)"
    header = [
        "stage",
        "parameters",
        f"perplexity, {short_text_name(card.get('heal_text', 'healing domain'))}"
        + (" (healing domain)" if _heals_on_eval_text(card) else ""),
        f"perplexity, {general}",
        "StereoSet SS [95% CI]",
        "SS change vs base [paired 95% CI]",
        "StereoSet LMS",
        "StereoSet ICAT",
    ]
    return header + ["CrowS-Pairs [95% CI]"] if has_crows(card) else header


def _compact_event(event: dict) -> dict:
    # floats rounded: a measured ratio like 19.986979166666668 % reads as noise on a card
    out = {
        k: round(event[k], 2) if isinstance(event[k], float) else event[k] for k in _EVENT_KEYS if k in event
    }
    for key in ("intermediate_sizes", "kept_kv_heads"):
        sizes = out.get(key)
        if isinstance(sizes, list) and sizes and all(s == sizes[0] for s in sizes):
            out[key] = {"every_layer": sizes[0], "layers": len(sizes)}  # uniform: one number, not 30
    return out


def _what_remains(event: dict) -> str:
    if event.get("removed_layers"):
        return f"removed layers {event['removed_layers']}"
    for key, name in (("intermediate_sizes", "MLP width"), ("kept_kv_heads", "KV heads")):
        sizes = _compact_event(event).get(key)
        if isinstance(sizes, dict) and "every_layer" in sizes:  # compacted above; else a per-layer map
            return f"{name} {sizes['every_layer']:,} in all {sizes['layers']} layers"
        if sizes:
            return f"{name} per layer {sizes}"
    return "?"


def card_inputs(config, state: RunState | Mapping[str, Any], speed: dict | None) -> dict[str, Any]:
    """The plain card dict from the pipeline's config, its state (a :class:`~.run_state.RunState` or the
    parsed ``state.json``) and ``compare_speed``.

    ``state.general_text`` (optional) names the text of ``perplexity/general``.

    Example:
        >>> card = card_inputs(config, json.loads(Path("outputs/demo/state.json").read_text()), speed)  # doctest: +SKIP
    """
    state = RunState.of(state)
    heal = config.heal
    healing = {
        "method": heal.heal_method,
        "data": config.data.heal_data,
        "steps_per_round": heal.heal_steps,
        "learning_rate": heal.learning_rate,
    }
    if heal.heal_method in LORA_METHODS:  # only the settings the method used
        healing["lora_r"] = heal.lora_r
    if heal.heal_method in KD_METHODS:
        healing |= {"kd_temperature": heal.kd_temperature, "kd_alpha": heal.kd_alpha}
    return {
        "base_model": base_model_name(config),
        "heal_text": config.data.eval_data,
        "general_text": state.general_text,
        "general_note": state.general_note,
        "eval_tokens": config.data.eval_tokens,
        "calibration": {
            "data": config.data.calibration_data,
            "tokens": config.data.num_calibration_samples * config.data.calibration_seq_len,
        },
        "healing": healing,
        "baseline": state.baseline,
        "rounds": state.rounds,
        "speed": speed if speed and "decode" in speed else None,
        "reference_run": config.data.reference_run,
    }


def render_model_card(card: dict[str, Any]) -> str:
    """The card's markdown (YAML front matter, stage table, pruning, healing and speed lines)."""
    base_model, rounds, baseline = card["base_model"], card.get("rounds", []), card["baseline"]
    final = rounds[-1]["healed"] if rounds else baseline
    metadata = {
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["optipfair-train", "pruned", "structured-pruning"],
        "optipfair_train": {
            "rounds": [
                {
                    "round": r["round"],
                    "pruning": [_compact_event(e) for e in r["events"]],
                    "heal_tokens": r.get("heal_tokens"),
                    **{f"healed_{k.replace('/', '_')}": r["healed"].get(k) for k in STAGE_KEYS[1:3]},
                }
                for r in rounds
            ],
            "healing": card.get("healing", {}),
            "parameters": {"base": baseline.get("parameters"), "final": final.get("parameters")},
            "speed": {k: card["speed"][k]["verdict"] for k in ("prefill", "decode")}
            if card.get("speed")
            else None,
        },
    }
    header = card_header(card)
    rows = card_rows(card)
    general = card.get("general_text")
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, default_flow_style=None, width=110).strip(),
        "---",
        "",
        f"# {base_model}, pruned and healed with optipfair-train",
        "",
        f"Perplexity on held-out `{card.get('heal_text')}` text ("
        + ("the healing domain, " if _heals_on_eval_text(card) else "")
        + f"{_fmt(card.get('eval_tokens'))} tokens) and on "
        + (
            f"{named_file(general)}, text no healing saw"
            if general
            else card.get("general_note") or "no general held-out text (none was given)"
        )
        + ". StereoSet: SS = % stereotyped choices (50 = none), LMS = % meaningful over meaningless "
        "choices, ICAT = LMS x min(SS, 100 - SS) / 50; an SS is shown only with its LMS; its change vs base "
        "is paired (the same items resampled for both models), so an interval that holds 0 means no "
        "measurable change. "
        + (
            "CrowS-Pairs: % of pairs where the stereotyped sentence is more likely. "
            if has_crows(card)
            else "CrowS-Pairs-style score: not measured (no behaviour_pairs given). "
        )
        + "Intervals are 95% bootstrap.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    zeroshot = zeroshot_card_lines(card)
    lines += ["", *zeroshot] if zeroshot else []
    reference = reference_card_lines(card)
    lines += ["", *reference] if reference else []
    lines += ["", "## What was pruned", ""]
    for r in rounds:
        for e in r["events"]:
            what = _what_remains(e)
            refit = ""
            if e.get("reconstruct"):
                target = "o_proj" if e["pruning_type"] == "ATTENTION" else "down_proj"
                refit = f"; kept {target} columns refit to the unpruned outputs, damping {e.get('damping')}"
            elif e.get("linear_replacement"):
                refit = "; the removed run replaced by a fitted linear map"
            lines.append(
                f"- round {r['round']}: {e['pruning_type']} by `{e['method']}` "
                f"({_fmt(e['parameters_before'])} -> {_fmt(e['parameters_after'])} parameters; {what}{refit})"
            )
    calibration = card.get("calibration")
    if calibration and any(_used_calibration(e) for r in rounds for e in r["events"]):
        lines += [
            "",
            f"Calibration (scores, refits): {_fmt(calibration['tokens'])} tokens of {_text_name(calibration['data'])}.",
        ]
    healing = card.get("healing", {})
    lines += [
        "",
        f"Healing: `{healing.get('method')}` on {_text_name(healing.get('data'))}, "
        f"{healing.get('steps_per_round')} steps "
        f"per round, {sum(r.get('heal_tokens') or 0 for r in rounds):,} tokens in all.",
        "",
        "Speed on this machine: "
        + (speed_line(card["speed"]) if card.get("speed") else "not measured side by side (no verdict)."),
    ]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: Path, card: dict[str, Any], state: dict | None = None, speed: dict | None = None
) -> Path:
    """Write ``folder/README.md`` from the plain ``card`` dict (see the module doc) and return its path.

    For the pipeline's older call ``write_model_card(folder, config, state, speed)`` the dict is built
    with :func:`card_inputs`.

    Example:
        >>> write_model_card(Path("final"), {"base_model": "m", "baseline": {"parameters": 10}})  # doctest: +SKIP
    """
    if not isinstance(card, dict):
        card = card_inputs(card, state or {}, speed)
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(card))
    return path
