"""Per-pair activation-difference statistics and OptiPFair's result structure built from them.

:class:`_DiffPlan` says which positions of a batch laid out as [prompt1 of pairs..., prompt2 of pairs...]
are compared (see :mod:`~optipfair_train.bias.metrics` for the definitions) and reduces one layer's
activation to a few numbers per pair inside a forward hook; ``_metrics_from_stats`` turns those numbers
into the ``layer_metrics`` / ``component_metrics`` / ``overall_metrics`` structure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .capture import parse_layer_key
from .tokens import TokenAlignment

# ----------------------------------------------------------------------------------------------
# The difference plan: which positions of a [2n, S, dim] batch (pair i: rows i and n+i) are compared.
# ----------------------------------------------------------------------------------------------


class _DiffPlan:
    """Index plan for one batch; ``stats`` reduces one layer's activation to per-pair numbers."""

    def __init__(self, alignments: Sequence[TokenAlignment], width: int):
        n = len(alignments)
        idx1, idx2, row_pair = [], [], []
        span_rows: list[tuple[int, list[int], list[int]]] = []  # (pair, side-1 positions, side-2 positions)
        pooled = torch.zeros(n, 2 * n * width)
        for i, a in enumerate(alignments):
            base1, base2 = i * width, (n + i) * width
            for t1, t2 in a.pairs():
                idx1.append(base1 + t1)
                idx2.append(base2 + t2)
                row_pair.append(i)
            if a.pooled_span:
                (s1, e1), (s2, e2) = a.span1, a.span2
                span_rows.append(
                    (i, list(range(base1 + s1, base1 + e1)), list(range(base2 + s2, base2 + e2)))
                )
            pooled[i, base1 : base1 + a.len1] = 1.0 / a.len1
            pooled[i, base2 : base2 + a.len2] = -1.0 / a.len2
        self.n = n
        self.idx1 = torch.tensor(idx1, dtype=torch.long)
        self.idx2 = torch.tensor(idx2, dtype=torch.long)
        # span means of each side, separately (their difference is the span row; their sizes its scale)
        self.span1 = torch.zeros(len(span_rows), 2 * n * width)
        self.span2 = torch.zeros(len(span_rows), 2 * n * width)
        for r, (_, cols1, cols2) in enumerate(span_rows):
            self.span1[r, cols1] = 1.0 / len(cols1)
            self.span2[r, cols2] = 1.0 / len(cols2)
        self.row_pair = torch.tensor(row_pair + [i for i, _, _ in span_rows], dtype=torch.long)
        self.pooled = pooled

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per aligned row ``mean_features |a1 - a2|`` and its scale ``mean_features (|a1| + |a2|) / 2``
        [rows], and per pair pooled difference [n] of one layer's activation ``x`` [2n, S, dim] (few
        tensor ops: this runs inside a forward hook)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        a, b = flat[self.idx1], flat[self.idx2]
        if len(self.span1):
            a = torch.cat([a, self.span1.to(flat.device) @ flat])
            b = torch.cat([b, self.span2.to(flat.device) @ flat])
        rows = (a - b).abs().mean(-1)
        scale = (a.abs() + b.abs()).mean(-1) / 2
        pooled = (self.pooled.to(flat.device) @ flat).abs().mean(-1)
        return rows.cpu(), scale.cpu(), pooled.cpu()

    def reduce(self, rows_by_key: Mapping[str, tuple[torch.Tensor, ...]]) -> list[dict[str, _Stats]]:
        """Per pair, per key: count, sum, sum of squares, max and min of the row differences, the sum of
        their scales, and pooled."""
        keys = list(rows_by_key)
        rows = torch.stack([rows_by_key[k][0] for k in keys]).double()  # [K, R]
        scale = torch.stack([rows_by_key[k][1] for k in keys]).double()  # [K, R]
        pooled = torch.stack([rows_by_key[k][2] for k in keys]).double()  # [K, n]
        onehot = torch.nn.functional.one_hot(self.row_pair, self.n).double()  # [R, n]
        index = self.row_pair.expand_as(rows)
        table = {
            "count": onehot.sum(0).expand(len(keys), -1),
            "sum": rows @ onehot,
            "sum_sq": (rows * rows) @ onehot,
            "scale_sum": scale @ onehot,
            "max": torch.full((len(keys), self.n), -math.inf, dtype=torch.float64).scatter_reduce(
                1, index, rows, "amax"
            ),
            "min": torch.full((len(keys), self.n), math.inf, dtype=torch.float64).scatter_reduce(
                1, index, rows, "amin"
            ),
            "pooled": pooled,
        }
        values = {name: t.tolist() for name, t in table.items()}  # [K][n] floats
        return [
            {key: {name: values[name][k][i] for name in values} for k, key in enumerate(keys)}
            for i in range(self.n)
        ]


_Stats = dict[str, float]


# ----------------------------------------------------------------------------------------------
# From per-layer statistics to OptiPFair's result structure.
# ----------------------------------------------------------------------------------------------


def _combine(stats: Sequence[_Stats]) -> _Stats:
    return {
        "count": sum(s["count"] for s in stats),
        "sum": sum(s["sum"] for s in stats),
        "sum_sq": sum(s["sum_sq"] for s in stats),
        "scale_sum": sum(s["scale_sum"] for s in stats),
        "max": max(s["max"] for s in stats),
        "min": min(s["min"] for s in stats),
        "pooled": float(np.mean([s["pooled"] for s in stats])),
    }


def _describe(s: _Stats) -> dict[str, float]:
    n = max(s["count"], 1.0)
    var = (s["sum_sq"] - s["sum"] ** 2 / n) / (n - 1) if n > 1 else 0.0
    return {
        "mean_difference": s["sum"] / n,
        "max_difference": s["max"],
        "min_difference": s["min"],
        "std_difference": math.sqrt(max(var, 0.0)),
        "l1_norm": s["sum"],
        "l2_norm": math.sqrt(s["sum_sq"]),
        "pooled_difference": s["pooled"],
        "normalized_difference": s["sum"] / s["scale_sum"] if s["scale_sum"] > 0 else 0.0,
        "num_positions": int(s["count"]),
    }


def _progression(mean_by_key: Mapping[str, float]) -> dict | None:
    keys = sorted(mean_by_key, key=lambda k: parse_layer_key(k)[1])
    if len(keys) < 2:
        return None
    values = [mean_by_key[k] for k in keys]
    first, last, top = values[0], values[-1], max(values)
    return {
        "first_to_last_ratio": last / first if first != 0 else math.inf,
        "max_to_first_ratio": top / first if first != 0 else math.inf,
        "is_increasing": bool(last > first),
        "layer_with_max_diff": keys[values.index(top)],
        "mean_diffs_by_layer": dict(zip(keys, values, strict=True)),
    }


def _group_keys(keys: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(parse_layer_key(key)[0], []).append(key)
    return groups


def _mean_normalized(layer: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> float:
    # the mean of the layers' ratios, not a ratio of sums: a layer whose activations shrink keeps its weight
    return float(np.mean([layer[k]["normalized_difference"] for k in keys]))


def _metrics_from_stats(stats: Mapping[str, _Stats]) -> dict:
    layer = {key: _describe(s) for key, s in stats.items()}
    components = {}
    for component, keys in _group_keys(list(stats)).items():
        entry = _describe(_combine([stats[k] for k in keys])) | {"num_layers": len(keys)}
        entry["normalized_difference"] = _mean_normalized(layer, keys)
        progression = _progression({k: layer[k]["mean_difference"] for k in keys})
        if progression:
            entry["progression_metrics"] = progression
        components[component] = entry
    overall = _describe(_combine(list(stats.values()))) | {"total_layers": len(stats)}
    overall["normalized_difference"] = _mean_normalized(layer, list(stats))
    return {"layer_metrics": layer, "component_metrics": components, "overall_metrics": overall}
