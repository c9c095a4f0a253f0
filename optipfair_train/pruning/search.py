"""Search how to spend one parameter budget across axes: every candidate allocation (shares of the removed
parameters per axis) is planned, applied to a copy of the model and ranked by a cheap proxy.

The proxy is the perplexity after one-shot pruning with the refit (``reconstruct``) on held-out
``eval_batches``; with ``distill_steps`` the best candidates (``distill_top`` of them, and the best
single-axis one) are then distilled for a few steps from the unpruned model, as Minitron compares
architectures, with the pipeline's own healing (``heal_method: kd``), and ranked by their perplexity
after it. The result holds the table of every candidate as evidence and the chosen candidate's plan.

With ``state_path`` every finished candidate is written to a JSON file at once (atomically); a rerun
with the same model, target, candidates and settings skips them, and one with anything else is refused.

Example:
    >>> result = search(model, fraction=0.25, calibration=batches, eval_batches=test_blocks)  # doctest: +SKIP
    >>> print(result.markdown()); result.save("search-out")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from ..evaluation import perplexity
from .apply import apply
from .budget import budget_requests, budget_target, parse_shares
from .calibration import as_batches
from .plan import PruningPlan, model_fingerprint, plan

logger = logging.getLogger(__name__)

__all__ = ["SearchResult", "default_candidates", "search", "shares_text"]

STATE_FORMAT = "optipfair-train search state"


def default_candidates(model: torch.nn.Module) -> list[dict[str, float]]:
    """The allocations tried when none are given, among the axes the family has.

    Each axis alone (the baselines the searched allocation must beat), then MLP width mixed with each
    other axis: width is the cheapest axis per parameter one-shot on the measured models
    (docs/benchmarks/hidden.md, depth.md), so mixtures lean on it, and the hidden axis (which holds the
    embedding) gets two ratios.

    Example:
        >>> default_candidates(model)[:2]  # doctest: +SKIP
        [{'mlp': 1.0}, {'hidden': 1.0}]
    """
    adapter = get_adapter(model)
    has = {"mlp": True, "hidden": adapter.has_hidden_axis, "heads": adapter.family.separate_qkv}
    has["depth"] = adapter.num_layers > 1
    grid = [
        {"mlp": 1.0}, {"hidden": 1.0}, {"heads": 1.0}, {"depth": 1.0},
        {"mlp": 0.75, "hidden": 0.25}, {"mlp": 0.5, "hidden": 0.5},
        {"mlp": 0.75, "heads": 0.25}, {"mlp": 0.75, "depth": 0.25},
    ]  # fmt: skip
    return [c for c in grid if all(has[a] for a in c)]


def shares_text(shares: Mapping[str, float]) -> str:
    """Shares as the pipeline's ``budget_shares`` value.

    Example:
        >>> shares_text({"mlp": 0.75, "hidden": 0.25})
        'mlp=0.75,hidden=0.25'
    """
    return ",".join(f"{a}={s:g}" for a, s in shares.items())


@dataclass
class SearchResult:
    """The table of candidates, the chosen one (lowest ranking perplexity) and its plan.

    ``rows``: one dict per candidate: ``shares``, ``counts`` (units per axis), ``parameters``,
    ``proxy_perplexity`` (one-shot + refit), ``distilled_perplexity`` (None unless distilled),
    ``seconds``, ``note`` (why a candidate could not be planned). ``ranked_by`` names the column the
    choice is made on: ``distilled_perplexity`` when any candidate was distilled, else
    ``proxy_perplexity``.

    Example:
        >>> result = search(model, fraction=0.25, calibration=batches, eval_batches=blocks)  # doctest: +SKIP
        >>> result.save("out")  # out/search.json, out/search.md, out/plan/plan.json  # doctest: +SKIP
        >>> apply(model, result.plan)  # doctest: +SKIP
    """

    parameters_before: int
    target: int
    rows: list[dict[str, Any]]
    chosen: int
    ranked_by: str
    plan: PruningPlan | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        keys = ("parameters_before", "target", "rows", "chosen", "ranked_by")
        return {k: getattr(self, k) for k in keys} | {
            "chosen_shares": shares_text(self.rows[self.chosen]["shares"])
        }

    def markdown(self) -> str:
        """The table as markdown, the chosen row marked."""
        lines = [
            f"Target: at most {self.target:,} of {self.parameters_before:,} parameters "
            f"({1 - self.target / self.parameters_before:.1%} fewer); ranked by {self.ranked_by}.",
            "",
            "| candidate | units removed | parameters | one-shot perplexity | after distillation | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for i, row in enumerate(self.rows):
            mark = " **(chosen)**" if i == self.chosen else ""
            counts = ", ".join(f"{a} {n}" for a, n in (row["counts"] or {}).items()) or row["note"]
            cells = [
                _fmt(row["parameters"], ","),
                _fmt(row["proxy_perplexity"]),
                _fmt(row["distilled_perplexity"]),
            ]
            lines.append(
                f"| {shares_text(row['shares'])}{mark} | {counts} | {' | '.join(cells)} | {row['seconds']:.0f} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``search.json``, ``search.md`` and the chosen plan (``plan/``, see :meth:`PruningPlan.save`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "search.json").write_text(json.dumps(self.to_dict(), indent=1))
        (folder / "search.md").write_text(self.markdown())
        if self.plan is not None:
            self.plan.save(folder / "plan")
        return folder


def _fmt(value: float | int | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _blocks(
    eval_batches: torch.Tensor | Iterable[Mapping[str, torch.Tensor]], name: str = "eval_batches"
) -> torch.Tensor:
    """Tokens as ``[N, S]`` full blocks (batches of dicts must carry no padding)."""
    if isinstance(eval_batches, torch.Tensor):
        blocks = eval_batches
    else:
        rows = []
        for batch in eval_batches:
            mask = batch.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError(
                    f"{name} must be full blocks (no padding): pass a [N, S] tensor of token ids."
                )
            rows.append(batch["input_ids"])
        lengths = {r.shape[-1] for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"{name} must share one sequence length, got {sorted(lengths)}.")
        blocks = torch.cat(rows)
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"{name} must be [N, S] token blocks (S >= 2), got shape {tuple(blocks.shape)}.")
    return blocks


def _settings(target: int, candidates: list, model: torch.nn.Module, settings: dict, options: dict) -> dict:
    """What a state file must match to be resumed (JSON values; request options by their repr)."""
    return {
        "model": model_fingerprint(model) | {"parameters": count_parameters(model)},
        "target": target,
        "candidates": candidates,
        "settings": settings | {"options": {k: repr(v) for k, v in sorted(options.items())}},
    }


def _read_state(path: Path, expected: dict) -> dict[int, dict]:
    if not path.is_file():
        return {}
    from ..pipeline.state import read_json  # the pipeline's JSON files, read the same way

    state = read_json(path, "delete it to search again from the start.")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a search state file (format {STATE_FORMAT!r}).")
    for key, want in expected.items():
        if state.get(key) != want:
            raise ValueError(
                f"{path} was written for another search: its {key} is {state.get(key)!r}, this search's is "
                f"{want!r}. Use another state_path, or delete the file to start over."
            )
    return {int(i): row for i, row in state["rows"].items()}


def _write_state(path: Path, expected: dict, rows: dict[int, dict]) -> None:
    from ..pipeline.state import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        path, {"format": STATE_FORMAT, **expected, "rows": {str(i): r for i, r in sorted(rows.items())}}
    )


def search(
    model: torch.nn.Module,
    target_parameters: int | None = None,
    *,
    fraction: float | None = None,
    candidates: Sequence[Mapping[str, float]] | None = None,
    calibration: Iterable,
    eval_batches: torch.Tensor | Iterable[Mapping[str, torch.Tensor]],
    reconstruct: bool = True,
    distill_steps: int = 0,
    distill_top: int | None = None,
    distill_data: torch.Tensor | None = None,
    distill_lr: float = 5e-5,
    distill_batch_size: int = 4,
    seed: int = 0,
    state_path: str | Path | None = None,
    show_progress: bool = True,
    **request_options: Any,
) -> SearchResult:
    """Plan, apply (on a copy) and rank every candidate allocation of the budget; ``model`` is not changed.

    ``target_parameters`` or ``fraction`` (of the parameters to remove): exactly one, as in
    :func:`~optipfair_train.pruning.budget.budget_requests`, which ``request_options`` also go to.
    ``candidates``: shares per axis (default :func:`default_candidates`); one the budget cannot meet is
    kept in the table with the reason. ``calibration``: batches for the scorers and refits.
    ``eval_batches``: held-out ``[N, S]`` token blocks (or unpadded batches) for the perplexities.
    ``distill_steps`` > 0 distils the ``distill_top`` best one-shot candidates (default all) and the best
    single-axis one from ``model`` (``heal_method="kd"``, ``distill_batch_size`` blocks of ``distill_data``
    a step, default the calibration tokens, at ``distill_lr``). ``seed``: scorers, refits and distillation.
    ``state_path``: a JSON file each finished candidate is written to; a rerun skips those.

    Example:
        >>> result = search(model, fraction=0.3, candidates=[{"mlp": 1.0}, {"hidden": 0.5, "mlp": 0.5}],
        ...                 calibration=batches, eval_batches=blocks)  # doctest: +SKIP
        >>> result.rows[result.chosen]["shares"]  # doctest: +SKIP
        {'mlp': 1.0}
    """
    candidates = [
        parse_shares(c) for c in (candidates if candidates is not None else default_candidates(model))
    ]
    if not candidates:
        raise ValueError("search needs at least one candidate allocation, e.g. [{'mlp': 1.0}].")
    if isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0:
        raise ValueError(f"distill_steps must be an integer >= 0, got {distill_steps!r}.")
    total = count_parameters(model)
    target = budget_target(total, target_parameters, fraction)
    blocks = _blocks(eval_batches)
    vocab = get_adapter(model).model.get_input_embeddings().num_embeddings
    batches = as_batches(calibration, vocab)
    options = dict(request_options, seed=seed)
    settings = dict(reconstruct=reconstruct, distill_steps=distill_steps, distill_top=distill_top, seed=seed)
    if distill_steps:
        settings.update(distill_lr=distill_lr, distill_batch_size=distill_batch_size)
    expected = _settings(target, candidates, model, settings, options)
    path = Path(state_path) if state_path is not None else None
    rows = _read_state(path, expected) if path is not None else {}
    if rows:
        logger.info("Resuming the search: %d of %d candidates already measured", len(rows), len(candidates))

    def pruned(i: int, measure: bool = True) -> tuple[torch.nn.Module | None, PruningPlan | None, dict]:
        """Candidate ``i`` planned and applied to a copy; its row (the proxy when ``measure``)."""
        row = {"shares": candidates[i], "counts": None, "parameters": None, "proxy_perplexity": None,
               "distilled_perplexity": None, "seconds": 0.0, "note": ""}  # fmt: skip
        start = time.perf_counter()
        try:
            requests = budget_requests(
                model, target, shares=candidates[i], calibrated=True, reconstruct=reconstruct, **options
            )
        except ValueError as err:  # this allocation cannot meet the budget: say why in the table
            row["note"] = f"not possible: {err}"
            return None, None, row
        counts = {r.kind: r.remove for r in requests}
        same = [j for j, r in sorted(rows.items()) if r["counts"] == counts and not r["note"] and j != i]
        if same and measure:  # e.g. a share too small for one unit of its axis: nothing new to measure
            row.update({k: rows[same[0]][k] for k in ("counts", "parameters", "proxy_perplexity")})
            row["note"] = f"the same units as {shares_text(candidates[same[0]])}"
            return None, None, row
        work = copy.deepcopy(model)
        torch.manual_seed(seed)
        p = plan(work, requests, batches, show_progress=False)
        apply(work, p)
        row["counts"] = counts
        row["parameters"] = count_parameters(work)
        if measure:
            row["proxy_perplexity"] = perplexity(work, input_ids=blocks, seq_len=blocks.shape[1])
        row["seconds"] = time.perf_counter() - start
        return work, p, row

    # what a later step needs: the plans of the best candidates so far, and (to distil) their models
    top = (len(candidates) if distill_top is None else distill_top) if distill_steps else 1
    plans: dict[int, PruningPlan] = {}
    models: dict[int, torch.nn.Module] = {}
    for i in tqdm(
        range(len(candidates)), desc="search: one-shot", unit="candidate", disable=not show_progress
    ):
        if i in rows:
            continue
        work, p, rows[i] = pruned(i)
        wanted = _best(rows, candidates, top)
        if i in wanted:
            plans[i] = p
            if distill_steps:
                models[i] = work
        plans = {j: v for j, v in plans.items() if j in wanted}
        models = {j: v for j, v in models.items() if j in wanted}
        if path is not None:
            _write_state(path, expected, rows)
        logger.info(
            "Candidate %s: %s", shares_text(candidates[i]), rows[i]["note"] or rows[i]["proxy_perplexity"]
        )
    if distill_steps:
        data = distill_data if distill_data is not None else _blocks(batches, "the calibration batches")
        for i in tqdm(
            sorted(_best(rows, candidates, top)), desc="search: distillation", disable=not show_progress
        ):
            if rows[i]["distilled_perplexity"] is not None:
                continue
            if i not in models:  # measured by an earlier run: prune it again (the same, for the same seed)
                models[i], plans[i], _ = pruned(i, measure=False)
            start = time.perf_counter()
            work = _distill(models.pop(i), model, data, distill_steps, distill_lr, distill_batch_size, seed)
            rows[i]["distilled_perplexity"] = perplexity(work, input_ids=blocks, seq_len=blocks.shape[1])
            rows[i]["seconds"] += time.perf_counter() - start
            if path is not None:
                _write_state(path, expected, rows)
    table = [rows[i] for i in range(len(candidates))]
    distilled = any(r["distilled_perplexity"] is not None for r in table)
    ranked_by = "distilled_perplexity" if distilled else "proxy_perplexity"
    ranked = [i for i, r in enumerate(table) if r[ranked_by] is not None]
    if not ranked:
        notes = "; ".join(r["note"] for r in table)
        raise ValueError(f"No candidate can meet the budget of {target:,} parameters: {notes}")
    best = min(ranked, key=lambda i: (table[i][ranked_by], i))
    best_plan = plans[best] if best in plans else pruned(best, measure=False)[1]
    return SearchResult(total, target, table, best, ranked_by, best_plan)


def _best(rows: dict[int, dict], candidates: list[dict], top: int) -> set[int]:
    """The ``top`` best one-shot candidates so far, and the best single-axis one."""
    done = sorted(
        (r["proxy_perplexity"], i)
        for i, r in rows.items()
        if r["proxy_perplexity"] is not None and not r["note"]
    )
    single = [i for _, i in done if len(candidates[i]) == 1]
    return {i for _, i in done[:top]} | set(single[:1])


def _distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> torch.nn.Module:
    """A short full-parameter distillation from ``teacher`` with the pipeline's healing (``kd``)."""
    from ..heal.text import lm_dataset
    from ..pipeline.config import HealConfig, RunConfig
    from ..pipeline.healing import heal

    config = HealConfig(
        heal_method="kd", heal_steps=steps, learning_rate=lr, per_device_batch_size=batch_size
    )
    run = RunConfig(seed=seed, save_steps=steps + 1, report_to="none", show_progress=False)
    # the teacher is the caller's model: distillation freezes it, so its flags and mode are put back
    # (else the caller's model, and every copy made of it later, would no longer train)
    flags = [p.requires_grad for p in teacher.parameters()]
    training = teacher.training
    student.requires_grad_(True)  # full-parameter distillation trains every weight of the copy
    teacher.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="optipfair-search-") as folder:
            student, _ = heal(
                student, None, config, Path(folder), lr, lm_dataset(data), run=run, teacher=teacher
            )
    finally:
        for param, flag in zip(teacher.parameters(), flags, strict=True):
            param.requires_grad_(flag)
        teacher.train(training)
    return unwrap_model(student).eval()
