"""Activation-difference bias metrics, per pair and aggregated over many pairs.

How two prompts are compared (also when they tokenize to different lengths): the token sequences
are aligned by their common prefix and suffix (:func:`~optipfair_train.bias.tokens.align_tokens`).
Each *aligned row* is one compared position: prefix tokens one to one, suffix tokens one to one
counted from the end (the tokens *after* the differing span, where the attribute's influence on the
context shows), and the differing spans position-wise when they have equal length, else as a single
row comparing the mean of each span (no row when one span is empty, as for an inserted word). For
every layer key the per-row difference is ``mean_features |a1 - a2|``; the layer's
``mean_difference`` is their mean. For equal-length pairs every position is a row, so this is
OptiPFair's mean absolute difference. ``pooled_difference`` compares the mean-pooled
representations of the two prompts (length-agnostic). Prefix rows are exactly 0 in a causal model.

``normalized_difference`` (added; the OptiPFair keys keep their meaning) is the same difference relative
to the activations' size: per pair and layer, ``sum_rows mean_features |a1 - a2|`` divided by ``sum_rows
mean_features (|a1| + |a2|) / 2``; per component and overall the mean of the layers' ratios. It is 0 for
identical activations, at most 2, and unchanged when a layer's activations are scaled, so pruning that
merely shrinks activations (removed neurons) does not read as less bias, as ``mean_difference`` does.
It is chosen over ``1 - cosine`` because it keeps the L1 numerator of ``mean_difference`` (the two are
directly comparable) and still sees a change of size between the two prompts, which a cosine ignores.

Result structure (OptiPFair's, extended): ``layer_metrics[key]`` and the groups in
``component_metrics[component]`` / ``overall_metrics`` hold ``mean_difference``, ``max_difference``,
``min_difference``, ``std_difference``, ``l1_norm``, ``l2_norm`` (over the per-row differences),
``pooled_difference`` and ``num_positions``; components add ``num_layers`` and
``progression_metrics`` (``first_to_last_ratio``, ``max_to_first_ratio``, ``is_increasing``,
``layer_with_max_diff``, ``mean_diffs_by_layer``); ``overall_metrics`` adds ``total_layers``.

Example:
    >>> act1, act2 = get_activation_pairs(model, tokenizer, "The white man", "The Black man")  # doctest: +SKIP
    >>> calculate_bias_metrics(act1, act2)["overall_metrics"]["mean_difference"]  # doctest: +SKIP
    0.0123
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import capture_activations, eval_mode, model_device, select_layer_keys
from .capture import check_layer_keys as _check_keys
from .diffstats import _DiffPlan, _group_keys, _metrics_from_stats, _progression
from .pairs import sample_pairs
from .tokens import TokenAlignment, align_tokens, encode_texts

__all__ = [
    "ActivationDict",
    "get_activation_pairs",
    "calculate_bias_metrics",
    "probe_activation_bias",
    "aggregate_bias_metrics",
    "bootstrap_ci",
    "paired_change_fields",
]

logger = logging.getLogger(__name__)


class ActivationDict(dict):
    """A dict ``layer key -> activation [1, S, dim]`` that also remembers the prompt's ``token_ids``
    and display ``tokens``; :func:`calculate_bias_metrics` aligns unequal-length prompts with them.

    Example:
        >>> act1, act2 = get_activation_pairs(model, tokenizer, "He ran", "She ran")  # doctest: +SKIP
        >>> act1.token_ids, sorted(act1)[0]  # doctest: +SKIP
    """

    token_ids: list[int]
    tokens: list[str]


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _resolve_targets(model: nn.Module, target_layers: Sequence[str] | str | None) -> list[str]:
    if target_layers is None:
        return select_layer_keys(model, "all")
    if isinstance(target_layers, str):
        target_layers = [target_layers]
    keys = [t for t in target_layers if "_layer_" in t]
    _check_keys(model, keys)
    components = [t for t in target_layers if "_layer_" not in t]
    return keys + (select_layer_keys(model, "all", components) if components else [])


def _clean_token(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n")


def get_activation_pairs(
    model: nn.Module,
    tokenizer,
    prompt1: str,
    prompt2: str,
    target_layers: Sequence[str] | str | None = None,
) -> tuple[ActivationDict, ActivationDict]:
    """Full activations ``{layer key: [1, S_i, dim]}`` of both prompts (one forward pass of both).

    ``target_layers`` takes component names (all their layers) and/or exact layer keys; None means all
    layers of OptiPFair's six components. Store full activations only for a few prompts (figures);
    :func:`probe_activation_bias` streams statistics over many pairs instead.

    Example:
        >>> a1, a2 = get_activation_pairs(model, tokenizer, "He is a nurse", "She is a nurse", ["mlp_output_layer_0"])  # doctest: +SKIP
        >>> a1["mlp_output_layer_0"].shape, a1.token_ids  # doctest: +SKIP
    """
    keys = _resolve_targets(model, target_layers)
    batch = encode_texts(tokenizer, [prompt1, prompt2])
    stored: dict[str, torch.Tensor] = {}

    def keep(key: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        stored[key] = x.float().cpu()

    with eval_mode(model), capture_activations(model, keys, keep):
        model(**batch.to(model_device(model)).model_inputs(), use_cache=False)
    out = []
    for side, ids in enumerate(batch.token_ids):
        acts = ActivationDict({k: stored[k][side : side + 1, : len(ids)] for k in keys})
        acts.token_ids = list(ids)
        acts.tokens = [_clean_token(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]
        out.append(acts)
    return out[0], out[1]


def _alignment_for(act1: Mapping, act2: Mapping, len1: int, len2: int) -> TokenAlignment:
    ids1, ids2 = getattr(act1, "token_ids", None), getattr(act2, "token_ids", None)
    if ids1 is not None and ids2 is not None:
        return align_tokens(ids1, ids2)
    if len1 == len2:
        return TokenAlignment(len1, len2, prefix=len1, suffix=0)  # every position one to one
    logger.debug("no token ids for an unequal-length pair: comparing whole-prompt means only")
    return TokenAlignment(len1, len2, prefix=0, suffix=0)


def calculate_bias_metrics(
    act1: Mapping[str, torch.Tensor],
    act2: Mapping[str, torch.Tensor],
    alignment: TokenAlignment | None = None,
) -> dict:
    """OptiPFair-style bias metrics from the activations of the two prompts of a pair.

    ``act1``/``act2`` map layer keys to [1, S, dim] or [S, dim] tensors. The alignment comes from
    ``alignment``, else from the ``token_ids`` that :func:`get_activation_pairs` attaches, else (plain
    dicts) positions are compared one to one for equal lengths and by whole-prompt means otherwise.
    See the module docstring for the definitions.

    Raises:
        ValueError: when the two dicts share no layer key.

    Example:
        >>> m = calculate_bias_metrics({"mlp_output_layer_0": torch.zeros(1, 3, 4)},
        ...                            {"mlp_output_layer_0": torch.ones(1, 3, 4)})
        >>> m["layer_metrics"]["mlp_output_layer_0"]["mean_difference"]
        1.0
    """
    keys = [k for k in act1 if k in act2]
    if not keys:
        raise ValueError("the two activation dicts share no layer key")
    first1, first2 = act1[keys[0]], act2[keys[0]]
    len1, len2 = first1.shape[-2], first2.shape[-2]
    alignment = alignment or _alignment_for(act1, act2, len1, len2)
    if (alignment.len1, alignment.len2) != (len1, len2):
        raise ValueError(
            f"alignment is for lengths {alignment.len1}/{alignment.len2}, activations have {len1}/{len2}"
        )
    plan = _DiffPlan([alignment], max(len1, len2))
    rows = {}
    for key in keys:
        a, b = act1[key].reshape(len1, -1).float(), act2[key].reshape(len2, -1).float()
        x = torch.zeros(2, max(len1, len2), a.shape[-1])
        x[0, :len1], x[1, :len2] = a, b
        rows[key] = plan.rows(x)
    metrics = _metrics_from_stats(plan.reduce(rows)[0])
    metrics["alignment"] = alignment.as_dict()
    return metrics


class _PairStatsReducer:
    """Reducer for batches laid out as [prompt1 of pairs..., prompt2 of pairs...]."""

    def __init__(self):
        self.plan: _DiffPlan | None = None
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.rows[key] = self.plan.rows(x)


def probe_activation_bias(
    model: nn.Module,
    tokenizer,
    prompt_pairs: Sequence[tuple[str, str]],
    layers: str | Sequence[int] = "all",
    components: Sequence[str] | str | None = None,
    batch_size: int = 8,
    sample_size: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    show_progress: bool = False,
) -> dict:
    """Activation-difference metrics for many pairs, streamed: no [batch, seq, dim] tensor is kept.

    Both prompts of ``batch_size`` pairs go through one forward pass; each hook reduces its layer's
    activation to a few numbers per pair right away. Returns ``{"pairs": [{"prompt1", "prompt2",
    "bias_type", "metrics"}], "aggregate": aggregate_bias_metrics(...)}`` where ``metrics`` has the
    structure of :func:`calculate_bias_metrics`.

    Raises:
        ValueError: for an empty pair list or a bad layer/component selection.

    Example:
        >>> result = probe_activation_bias(model, tokenizer, DEFAULT_PROMPT_PAIRS)  # doctest: +SKIP
        >>> result["aggregate"]["overall_metrics"]["mean_difference_ci"]  # doctest: +SKIP
    """
    pairs = sample_pairs(prompt_pairs, sample_size, seed)
    keys = select_layer_keys(model, layers, components)
    if not keys:
        raise ValueError(f"no layer keys selected for layers={layers!r}, components={components!r}")
    texts1, texts2 = [p[0] for p in pairs], [p[1] for p in pairs]
    reducer = _PairStatsReducer()
    per_pair: list[dict | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(texts1[i]) + len(texts2[i]))
    device = model_device(model)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with eval_mode(model), capture_activations(model, keys, reducer):
        for idx in tqdm(batches, desc="activation bias", disable=not show_progress):
            batch = encode_texts(tokenizer, [texts1[i] for i in idx] + [texts2[i] for i in idx])
            ids = batch.token_ids
            alignments = [align_tokens(ids[j], ids[len(idx) + j]) for j in range(len(idx))]
            reducer.plan = _DiffPlan(alignments, batch.input_ids.shape[1])
            model(**batch.to(device).model_inputs(), use_cache=False)
            for j, (i, stats) in enumerate(zip(idx, reducer.plan.reduce(reducer.rows), strict=True)):
                metrics = _metrics_from_stats(stats)
                metrics["alignment"] = alignments[j].as_dict()
                per_pair[i] = metrics
    results = [
        {"prompt1": p[0], "prompt2": p[1], "bias_type": getattr(p, "bias_type", None), "metrics": m}
        for p, m in zip(pairs, per_pair, strict=True)
    ]
    aggregate = aggregate_bias_metrics([r["metrics"] for r in results], confidence, n_bootstrap, seed)
    return {"pairs": results, "aggregate": aggregate}


def paired_change_fields(
    point_before: Mapping[str, np.ndarray],
    point_after: Mapping[str, np.ndarray],
    boot_before: Mapping[str, np.ndarray],
    boot_after: Mapping[str, np.ndarray],
    names: Sequence[str],
    confidence: float,
) -> dict[str, float]:
    """``<name>_change`` (after - before, from the ``[1]``-shaped point values) with the percentile interval
    ``_ci_low`` / ``_ci_high`` of the paired bootstrap differences (the same resamples for both models;
    resamples where a score is undefined, NaN, are left out).

    Example:
        >>> one = {"ss": np.array([50.0])}
        >>> paired_change_fields(one, {"ss": np.array([47.0])}, {"ss": np.array([50.0, 52.0])},
        ...                      {"ss": np.array([46.0, 49.0])}, ["ss"], 0.95)["ss_change"]
        -3.0
    """
    alpha = (1 - confidence) / 2
    out: dict[str, float] = {}
    for name in names:
        low, high = np.nanquantile(boot_after[name] - boot_before[name], [alpha, 1 - alpha])
        out |= {
            f"{name}_change": float(point_after[name][0] - point_before[name][0]),
            f"{name}_change_ci_low": float(low),
            f"{name}_change_ci_high": float(high),
        }
    return out


def bootstrap_ci(
    values: np.ndarray | Sequence[float],
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile-bootstrap confidence interval over the last axis of ``values`` ([n] or [m, n]).

    All rows share the same resamples (one multinomial count matrix), so this is fast for many series.

    Example:
        >>> mean, lo, hi = bootstrap_ci([0, 1, 1, 0, 1, 1, 1, 0])
        >>> float(mean), bool(lo <= mean <= hi)
        (0.625, True)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.shape[-1] == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    n = v.shape[-1]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64)  # [B, n]
    boot = v @ counts.T / n  # [..., B]
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=-1)
    return v.mean(-1), lo, hi


def aggregate_bias_metrics(
    pair_metrics: Sequence[Mapping],
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Mean over pairs of ``mean_difference`` and ``pooled_difference`` per layer, component and overall,
    each with a percentile-bootstrap confidence interval (``*_ci`` = [low, high]).

    Components also get ``progression_metrics`` computed on the averaged layer values, so figures and
    reports can treat an aggregate like one pair's metrics.

    Example:
        >>> agg = aggregate_bias_metrics([m1, m2, m3])  # doctest: +SKIP
        >>> agg["overall_metrics"]["mean_difference"], agg["overall_metrics"]["mean_difference_ci"]  # doctest: +SKIP
    """
    if not pair_metrics:
        raise ValueError("aggregate_bias_metrics needs at least one pair's metrics")
    layer_keys = [
        k for k in pair_metrics[0]["layer_metrics"] if all(k in m["layer_metrics"] for m in pair_metrics)
    ]
    components = list(pair_metrics[0]["component_metrics"])
    groups = (
        [("layer_metrics", k) for k in layer_keys]
        + [("component_metrics", c) for c in components]
        + [("overall_metrics", None)]
    )

    def entry(m: Mapping, group: str, name: str | None) -> Mapping:
        return m[group] if name is None else m[group][name]

    fields = ("mean_difference", "pooled_difference", "normalized_difference")
    values = np.array([[entry(m, g, k)[f] for m in pair_metrics] for g, k in groups for f in fields])
    mean, lo, hi = bootstrap_ci(values, confidence, n_bootstrap, seed)
    out: dict = {
        "num_pairs": len(pair_metrics),
        "confidence": confidence,
        "layer_metrics": {},
        "component_metrics": {},
        "overall_metrics": {},
    }
    row = 0
    for group, name in groups:
        e = {}
        for f in fields:
            e[f], e[f + "_ci"] = float(mean[row]), [float(lo[row]), float(hi[row])]
            row += 1
        if name is None:
            out[group] = e | {"total_layers": len(layer_keys)}
        else:
            out[group][name] = e
    for component, keys in _group_keys(layer_keys).items():
        out["component_metrics"][component]["num_layers"] = len(keys)
        progression = _progression({k: out["layer_metrics"][k]["mean_difference"] for k in keys})
        if progression:
            out["component_metrics"][component]["progression_metrics"] = progression
    return out
