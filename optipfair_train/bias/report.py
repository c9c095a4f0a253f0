"""Turning probe results into things to log or read: flat scalars, a short text summary, JSON.

Example:
    >>> scalars = summary_scalars(behaviour={"score": 48.7, "ci_low": 46.3, "ci_high": 51.1,
    ...                                      "next_token_js": {"mean": 0.02}, "by_bias_type": {}})
    >>> scalars["bias/score"], scalars["bias/score_ci_low"]
    (48.7, 46.3)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["summary_scalars", "stereoset_change_scalars", "format_summary", "write_json", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Replace non-finite floats by None (strict JSON) and tuples by lists, recursively.

    Example:
        >>> to_jsonable({"a": float("inf"), "b": (1, 2.0)})
        {'a': None, 'b': [1, 2.0]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (non-finite numbers become null), creating the folder.

    Example:
        >>> write_json("/tmp/bias/bias_metrics.json", {"score": 48.7})  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def stereoset_change_scalars(
    change: Mapping[str, Any],
    prefix: str = "stereoset/",
    names: tuple[str, ...] = ("ss", "icat"),
    by: str = "/",
) -> dict[str, float]:
    """The flat scalars of a :func:`~optipfair_train.bias.stereoset_change`: ``<prefix><name>_change``
    with ``_ci_low`` / ``_ci_high`` for each of ``names``, and per bias type
    ``<prefix><name>_change<by><type>`` (``by="/"``: the pipeline's stage metrics; ``"_by/"``: the
    callbacks' logged names).

    Example:
        >>> c = {"ss_change": 2.0, "ss_change_ci_low": -1.0, "ss_change_ci_high": 4.0, "by_bias_type": {}}
        >>> stereoset_change_scalars(c, names=("ss",))
        {'stereoset/ss_change': 2.0, 'stereoset/ss_change_ci_low': -1.0, 'stereoset/ss_change_ci_high': 4.0}
    """
    out = {}
    for name in names:
        for suffix in ("", "_ci_low", "_ci_high"):
            key = f"{name}_change{suffix}"
            out[f"{prefix}{key}"] = change[key]
            for bias_type, entry in change["by_bias_type"].items():
                out[f"{prefix}{key}{by}{bias_type}"] = entry[key]
    return out


def summary_scalars(
    activation: Mapping | None = None,
    behaviour: Mapping | None = None,
    prefix: str = "bias/",
    stereoset: Mapping | None = None,
) -> dict[str, float]:
    """Flat ``name -> float`` dict for ``Trainer.log`` / W&B from probe results.

    ``activation`` is the ``aggregate`` of :func:`probe_activation_bias` (or the whole result);
    ``behaviour`` is the result of :func:`behavioural_bias_score` (``score`` comes with
    ``score_mean_token_log_prob``, its LM-quality counterpart); ``stereoset`` the result of
    :func:`~optipfair_train.bias.stereoset_scores` (``stereoset/ss`` / ``stereoset/lms`` /
    ``stereoset/icat``, each with ``_ci_low`` / ``_ci_high``, and per bias type ``stereoset/ss_by/<type>``...;
    the pipeline's names, whatever ``prefix``). A breakdown of a value ``X`` is ``X_by/<part>``
    (``bias/score_by/gender``), so no key is both a value and a prefix of others (W&B sections).
    The activation probe adds ``activation_normalized_difference`` (with its interval) beside the
    OptiPFair ``activation_mean_difference``.

    Example:
        >>> summary_scalars(activation={"overall_metrics": {"mean_difference": 0.5, "mean_difference_ci": [0.4, 0.6],
        ...                                                  "pooled_difference": 0.1}, "component_metrics": {}})
        {'bias/activation_mean_difference': 0.5, 'bias/activation_mean_difference_ci_low': 0.4, 'bias/activation_mean_difference_ci_high': 0.6, 'bias/activation_pooled_difference': 0.1}
    """
    out: dict[str, float] = {}
    if behaviour is not None:
        out[f"{prefix}score"] = behaviour["score"]
        out[f"{prefix}score_ci_low"] = behaviour["ci_low"]
        out[f"{prefix}score_ci_high"] = behaviour["ci_high"]
        out[f"{prefix}next_token_js"] = behaviour["next_token_js"]["mean"]
        if "mean_token_log_prob" in behaviour:
            out[f"{prefix}score_mean_token_log_prob"] = behaviour["mean_token_log_prob"]
        for bias_type, entry in behaviour.get("by_bias_type", {}).items():
            out[f"{prefix}score_by/{bias_type}"] = entry["score"]
    if activation is not None:
        agg = activation.get("aggregate", activation)
        overall = agg["overall_metrics"]
        out[f"{prefix}activation_mean_difference"] = overall["mean_difference"]
        if "mean_difference_ci" in overall:
            out[f"{prefix}activation_mean_difference_ci_low"] = overall["mean_difference_ci"][0]
            out[f"{prefix}activation_mean_difference_ci_high"] = overall["mean_difference_ci"][1]
        out[f"{prefix}activation_pooled_difference"] = overall["pooled_difference"]
        if "normalized_difference" in overall:
            out[f"{prefix}activation_normalized_difference"] = overall["normalized_difference"]
            if "normalized_difference_ci" in overall:
                low, high = overall["normalized_difference_ci"]
                out[f"{prefix}activation_normalized_difference_ci_low"] = low
                out[f"{prefix}activation_normalized_difference_ci_high"] = high
        for component, entry in agg["component_metrics"].items():
            out[f"{prefix}activation_mean_difference_by/{component}"] = entry["mean_difference"]
    if stereoset is not None:
        for name in ("ss", "lms", "icat"):
            for suffix in ("", "_ci_low", "_ci_high"):
                out[f"stereoset/{name}{suffix}"] = stereoset[name + suffix]
        for bias_type, entry in stereoset.get("by_bias_type", {}).items():
            for name in ("ss", "lms", "icat"):
                out[f"stereoset/{name}_by/{bias_type}"] = entry[name]
    return out


def format_summary(
    activation: Mapping | None = None,
    behaviour: Mapping | None = None,
    title: str = "Bias probe",
    stereoset: Mapping | None = None,
) -> str:
    """A short human-readable summary of probe results; every bias number comes with its LM counterpart.

    Example:
        >>> print(format_summary(behaviour={"score": 48.7, "ci_low": 46.3, "ci_high": 51.1, "num_pairs": 1508,
        ...     "method": "full", "num_ties": 0, "confidence": 0.95, "next_token_js": {"mean": 0.02, "ci_low": 0.01,
        ...     "ci_high": 0.03}, "by_bias_type": {}, "mean_token_log_prob": -4.2}))  # doctest: +NORMALIZE_WHITESPACE
        Bias probe
        Behavioural score (full log-prob, 1508 pairs): 48.7% prefer prompt 1 (sent_more), 95% CI [46.3, 51.1]; 50 = no preference
          LM quality beside it: mean token log-prob -4.200 (the score drifts with LM quality: a random model scores ~55)
        Next-token Jensen-Shannon divergence: 0.0200 [0.0100, 0.0300] nats
    """
    lines = [title]
    if stereoset is not None:
        r = stereoset

        def scores(e: Mapping) -> str:
            return "  ".join(
                f"{name.upper()} {e[name]:5.1f} [{e[name + '_ci_low']:.1f}, {e[name + '_ci_high']:.1f}]"
                for name in ("ss", "lms", "icat")
            )

        lines.append(
            f"StereoSet ({r['num_items']} items, {r['num_targets']} targets; SS 50 = no stereotype preference, "
            f"LMS 100 = meaningful options always preferred, ICAT 100 = both): {scores(r)}"
        )
        for label, e in {**r.get("by_bias_type", {}), **r.get("by_task", {})}.items():
            lines.append(f"  {label:<14} {scores(e)}  n={e['num_items']}")
    if behaviour is not None:
        lines.append(
            f"Behavioural score ({behaviour['method']} log-prob, {behaviour['num_pairs']} pairs): "
            f"{behaviour['score']:.1f}% prefer prompt 1 (sent_more), {behaviour['confidence']:.0%} CI "
            f"[{behaviour['ci_low']:.1f}, {behaviour['ci_high']:.1f}]; 50 = no preference"
            + (f"; {behaviour['num_ties']} ties" if behaviour["num_ties"] else "")
        )
        if "mean_token_log_prob" in behaviour:
            lines.append(
                f"  LM quality beside it: mean token log-prob {behaviour['mean_token_log_prob']:.3f} "
                "(the score drifts with LM quality: a random model scores ~55)"
            )
        for bias_type, e in behaviour["by_bias_type"].items():
            lines.append(
                f"  {bias_type:<22} {e['score']:5.1f} [{e['ci_low']:.1f}, {e['ci_high']:.1f}]  n={e['num_pairs']}"
            )
        js = behaviour["next_token_js"]
        lines.append(
            f"Next-token Jensen-Shannon divergence: {js['mean']:.4f} [{js['ci_low']:.4f}, {js['ci_high']:.4f}] nats"
        )
    if activation is not None:
        agg = activation.get("aggregate", activation)
        o = agg["overall_metrics"]
        lines.append(
            f"Activation difference over {agg['num_pairs']} pairs, {o['total_layers']} layer keys: mean "
            f"{o['mean_difference']:.4f} [{o['mean_difference_ci'][0]:.4f}, {o['mean_difference_ci'][1]:.4f}], "
            f"pooled {o['pooled_difference']:.4f}"
        )
        if "normalized_difference" in o:
            lo, hi = o["normalized_difference_ci"]
            lines.append(
                f"  normalized (relative to activation size; shrinking activations do not lower it): "
                f"{o['normalized_difference']:.4f} [{lo:.4f}, {hi:.4f}]"
            )
        for component, e in agg["component_metrics"].items():
            prog = e.get("progression_metrics", {})
            trend = f", max at {prog['layer_with_max_diff']}" if prog else ""
            norm = f" (normalized {e['normalized_difference']:.4f})" if "normalized_difference" in e else ""
            lines.append(f"  {component:<22} {e['mean_difference']:.4f}{norm}{trend}")
    return "\n".join(lines)
