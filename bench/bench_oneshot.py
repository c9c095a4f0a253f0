"""One-shot pruning side by side: neuron scorers, refit of kept weights, layer allocation, calibration budget.

One run, one workload (the demo model; WikiText-2 test perplexity over 16 x 512 tokens, --quick 4 x 512;
calibration 8 x 256 tokens of WikiText-2 valid, --quick 4 x 256; CrowS-Pairs on 300 seeded pairs, --quick
40, with a 95% bootstrap interval beside every row):

1. MLP width -20% and -30% (uniform): ``activation`` (the previous default), ``hybrid`` (OptiPFair 0.4.2's
   data-driven score, computed by this package with padding masked: OptiPFair itself is not run here;
   bench_optipfair.py runs it), ``fluctuation`` (FLAP) and ``reconstruction`` (OBS saliency), each without
   and — when ``prune_model`` accepts ``reconstruct=`` — with the least-squares refit of the kept weights.
2. Layer allocation for the best uniform scorer at -20% (with refit when available): ``uniform`` vs
   ``global`` vs ``sensitivity``.
3. One KV group of three removed in every layer (``activation`` heads), without and with refit.
4. Calibration budget for the best setting: perplexity, time and peak extra memory of the statistics vs
   calibration tokens (2k, 8k, 32k, 64k; --quick 512, 2k), and the Gram matrix size per layer.

Targets (ratio of perplexity to the unpruned model): MLP -20% <= 1.25, -30% <= 1.60, one KV group <= 1.60.
Scores are computed once per scorer on the unpruned model and reused for both percentages (exactly what
``prune_model`` computes). StereoSet (LMS / SS / ICAT) is not measured here yet: its column is marked.

    python bench/bench_oneshot.py --threads 2    # full run
    python bench/bench_oneshot.py --quick        # a few minutes

Flags: the shared ones of ``bench/common.py``, --crows-sample N, --parts mlp,allocation,attention,budget
(the parts to run; allocation needs mlp; the budget curve uses the best uniform scorer, else
``hybrid``, the default of ``prune_model`` with calibration data).
Writes <out>/oneshot.md (and, row by row while it runs, <out>/oneshot.partial.md).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from common import (
    PeakRSS,
    Progress,
    Report,
    base_parser,
    crows_cell,
    fmt_ppl,
    load_workload,
    measure,
    setup,
    timed,
)

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.data import calibration_dataloader
from optipfair_train.pruning import as_batches, neuron_scores, register_scorer

SCORERS = ("activation", "hybrid", "fluctuation", "reconstruction")
ALLOCATIONS = ("global", "sensitivity")
TARGETS = {"MLP -20%": 1.25, "MLP -30%": 1.60, "one KV group": 1.60}
CACHED = "bench-oneshot-cached"
STEREOSET = "not yet"  # filled in once the StereoSet scorer lands

_cached_scores: dict[int, torch.Tensor] = {}


@register_scorer(CACHED, replace=True)  # replaced when the script is imported again
def _cached(parts, context):
    """Precomputed scores of the scorer under test (bench_oneshot only)."""
    return _cached_scores[context.layer_idx]


def refit_supported() -> bool:
    return "reconstruct" in inspect.signature(prune_model).parameters


def _prune(work, refit: bool, batches=None, **kwargs) -> tuple[torch.nn.Module, float]:
    model = copy.deepcopy(work.model)
    extra = {"reconstruct": True} if refit else {}
    needs_data = (
        refit or kwargs.get("layer_allocation") == "sensitivity" or kwargs.get("pruning_type") == "ATTENTION"
    )
    _, seconds = timed(
        lambda: prune_model(
            model,
            dataloader=(batches or work.calibration) if needs_data else None,
            show_progress=False,
            **extra,
            **kwargs,
        )
    )
    return model, seconds


class Rows:
    """Measured rows: label, setting, parameters, perplexity, ratio, CrowS-Pairs, seconds."""

    def __init__(self, work, base: dict[str, float], progress, partial=None):
        self.work, self.base, self.progress, self.rows = work, base, progress, []
        self.partial = partial  # a file that holds the rows so far (a long run can be read while it goes)
        self.by_key: dict[tuple, dict[str, Any]] = {}

    def add(self, key: tuple, setting: str, label: str, model: torch.nn.Module, seconds: float) -> None:
        metrics = measure(model, self.work, crows=True)
        ratio = metrics["perplexity"] / self.base["perplexity"]
        row = {**metrics, "ratio": ratio, "seconds": seconds, "label": label, "setting": setting}
        self.rows.append(row)
        self.by_key[key] = row
        self.progress(f"{setting} {label}: perplexity {fmt_ppl(metrics['perplexity'])} (x{ratio:.2f})")
        if self.partial is not None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.partial.write_text("\n".join(self._cells()[0]) + "\n")

    def _cells(self) -> tuple[list[str], list[str], list[list[str]]]:
        header = ["setting", "method", "parameters", "perplexity", "ratio to base", "CrowS-Pairs [95% CI]"]
        header += ["StereoSet", "time (s)"]
        cells = [
            ["base", "unpruned", f"{int(self.base['parameters']):,}", fmt_ppl(self.base["perplexity"]), "1.00"]
            + [crows_cell(self.base), STEREOSET, ""]
        ]
        for r in self.rows:
            cells.append(
                [r["setting"], r["label"], f"{int(r['parameters']):,}", fmt_ppl(r["perplexity"])]
                + [f"{r['ratio']:.2f}", crows_cell(r), STEREOSET, f"{r['seconds']:.1f}"]
            )
        lines = ["| " + " | ".join(row) + " |" for row in [header, *cells]]
        lines.insert(1, "|" + "---|" * len(header))
        return lines, header, cells

    def table(self, report: Report, title: str) -> None:
        _, header, cells = self._cells()
        report.table(header, cells, title=title)


def mlp_rows(work, rows: Rows, percentages, refit: bool, progress) -> dict[str, float]:
    """Scores once per scorer on the unpruned model, then rows percentage by percentage."""
    all_scores, scoring_seconds = {}, {}
    for method in SCORERS:
        all_scores[method], scoring_seconds[method] = timed(
            lambda method=method: neuron_scores(work.model, method, batches=work.calibration)
        )
        progress(f"{method}: scores in {scoring_seconds[method]:.1f} s")
    for pct in percentages:
        for method in SCORERS:
            _cached_scores.clear()
            _cached_scores.update(all_scores[method])
            for with_refit in (False, True) if refit else (False,):
                model, cut = _prune(
                    work, with_refit, pruning_type="MLP", neuron_selection_method=CACHED, pruning_percentage=pct
                )
                label = f"`{method}`" + (" + refit" if with_refit else "")
                seconds = scoring_seconds[method] + cut
                rows.add(("mlp", method, pct, with_refit), f"MLP -{pct:g}%", label, model, seconds)
                del model
    return scoring_seconds


def allocation_rows(work, rows: Rows, method: str, percentages, refit: bool, scoring_seconds) -> None:
    scores = neuron_scores(work.model, method, batches=work.calibration)
    _cached_scores.clear()
    _cached_scores.update(scores)
    for pct in percentages:
        for allocation in ALLOCATIONS:
            model, cut = _prune(
                work,
                refit,
                pruning_type="MLP",
                neuron_selection_method=CACHED,
                pruning_percentage=pct,
                layer_allocation=allocation,
            )
            sizes = get_adapter(model).intermediate_sizes()
            label = f"`{method}`{' + refit' if refit else ''}, `{allocation}` "
            label += f"({min(sizes)}-{max(sizes)} neurons)"
            rows.add(("alloc", allocation, pct), f"MLP -{pct:g}%", label, model, scoring_seconds[method] + cut)
            del model


def attention_rows(work, rows: Rows, refit: bool, report: Report) -> None:
    adapter = get_adapter(work.model)
    counts = sorted({adapter.head_counts(i) for i in range(adapter.num_layers)})
    n_q, n_kv, _ = counts[0]
    if len(counts) > 1 or n_kv < 2 or not adapter.family.separate_qkv:
        report.text("Attention: skipped (needs equal, separate q/k/v heads and at least 2 KV groups).")
        return
    for with_refit in (False, True) if refit else (False,):
        model, seconds = _prune(
            work,
            with_refit,
            pruning_type="ATTENTION",
            head_granularity="group",
            neuron_selection_method="activation",
            pruning_percentage=100 / n_kv,
        )
        label = "`activation` heads" + (" + refit" if with_refit else "")
        rows.add(("kv", with_refit), f"1 of {n_kv} KV groups", label, model, seconds)
        del model


def budget(work, args, base, method: str, refit: bool, tokens_list, report: Report, progress) -> None:
    """Perplexity, seconds and peak extra memory vs calibration tokens (-20% always, -30% up to 32k)."""
    texts = work.valid_texts(args.data)
    out = []
    header = ["calibration tokens", "MLP cut", "perplexity", "ratio to base", "scoring + pruning (s)"]
    header.append("peak extra RSS (MB)")
    title = f"Calibration budget: `{method}`{' + refit' if refit else ''} (batches of 4 x 256 tokens)"
    for tokens in tokens_list:
        batches = as_batches(
            calibration_dataloader(
                work.tokenizer, texts, num_samples=max(1, tokens // 256), seq_len=256, batch_size=4
            )
        )
        counted = sum(int(b["attention_mask"].sum()) for b in batches)
        for pct in (20.0, 30.0) if tokens <= 32768 else (20.0,):
            model = copy.deepcopy(work.model)
            extra = {"reconstruct": True} if refit else {}
            with PeakRSS() as rss:
                _, seconds = timed(
                    lambda model=model, batches=batches, extra=extra, pct=pct: prune_model(
                        model,
                        pruning_type="MLP",
                        neuron_selection_method=method,
                        pruning_percentage=pct,
                        dataloader=batches,
                        show_progress=False,
                        **extra,
                    )
                )
            metrics = measure(model, work, crows=False)
            del model
            ratio = metrics["perplexity"] / base["perplexity"]
            out.append(
                [f"{counted:,}", f"-{pct:g}%", fmt_ppl(metrics["perplexity"]), f"{ratio:.2f}", f"{seconds:.1f}"]
                + [f"{rss.extra / 2**20:.0f}"]
            )
            progress(f"budget {counted} tokens -{pct:g}%: perplexity {fmt_ppl(metrics['perplexity'])}, {seconds:.1f} s")
            partial = ["| " + " | ".join(map(str, row)) + " |" for row in [header, *out]]
            (args.out / "oneshot.budget.partial.md").write_text("\n".join(partial) + "\n")
    report.table(header, out, title=title)
    (args.out / "oneshot.budget.partial.md").unlink(missing_ok=True)
    adapter = get_adapter(work.model)
    width = adapter.mlp(0).intermediate_size
    per_layer = 8 * width**2
    report.text(
        f"Gram matrix of the `down_proj` input (float64, `intermediate_size^2`): {per_layer / 2**20:.1f} MB "
        f"per layer, {adapter.num_layers * per_layer / 2**20:,.0f} MB for all {adapter.num_layers} layers of "
        "this model, the same for any number of tokens (streamed sums). For an 8B LLaMA (intermediate 14336, "
        f"32 layers): {8 * 14336**2 / 2**30:.2f} GiB per layer, {32 * 8 * 14336**2 / 2**30:.1f} GiB for all "
        "layers at once: such models need the statistics one layer at a time."
    )


def verdict(rows: Rows) -> list[list[str]]:
    """Each target against the best measured row of its setting."""
    out = []
    for name, limit in TARGETS.items():
        setting = {"MLP -20%": "MLP -20%", "MLP -30%": "MLP -30%"}.get(name)
        candidates = [r for r in rows.rows if (r["setting"] == setting if setting else "KV" in r["setting"])]
        if not candidates:
            out.append([name, f"<= {limit:.2f}", "not measured", ""])
            continue
        best = min(candidates, key=lambda r: r["ratio"])
        status = "met" if best["ratio"] <= limit else f"missed by {best['ratio'] - limit:.2f}"
        out.append([name, f"<= {limit:.2f}", f"{best['ratio']:.2f} ({best['label']})", status])
    return out


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--crows-sample", type=int, default=None, help="CrowS-Pairs pairs scored (0: all)")
    parser.add_argument(
        "--parts",
        default="mlp,allocation,attention,budget",
        help="comma-separated parts to run (allocation needs mlp)",
    )
    args = parser.parse_args()
    setup(args)
    progress = Progress()
    quick = args.quick
    crows_sample = args.crows_sample if args.crows_sample is not None else 40 if quick else 300
    calibration_samples = 4 if quick else 8
    work = load_workload(
        args,
        eval_tokens=4 * 512 if quick else 16 * 512,
        calibration_samples=calibration_samples,
        calibration_seq_len=256,
        crows_sample=crows_sample or None,
    )
    refit = refit_supported()
    report = Report("oneshot", "One-shot pruning: scorers, refit, allocation, calibration budget", out=args.out)
    report.text(
        f"Model `{args.model_path}`, no healing. Perplexity: WikiText-2 test, {work.test_ids.shape[0]} x "
        f"{work.eval_seq_len} tokens; calibration: {calibration_samples} x 256 tokens of WikiText-2 valid (no "
        "padding, so `hybrid` equals OptiPFair 0.4.2's data-driven score here); CrowS-Pairs: "
        f"{crows_sample or 'all'} seeded pairs, % preferring the stereotyped sentence, 95% bootstrap interval. Time: scoring on the "
        "unpruned model plus pruning (and refit). Refit of kept weights: "
        + ("`prune_model(..., reconstruct=True)`." if refit else "not available in this build (rows omitted).")
    )
    base = measure(work.model, work, crows=True)
    progress(f"unpruned: perplexity {fmt_ppl(base['perplexity'])}, CrowS-Pairs {crows_cell(base)}")
    rows = Rows(work, base, progress, partial=args.out / "oneshot.partial.md")
    percentages = (20.0, 30.0)
    parts = set(args.parts.split(","))
    best = "hybrid"  # prune_model's default with calibration data, when the mlp part does not run
    if "attention" in parts:
        attention_rows(work, rows, refit, report)
    if "mlp" in parts:
        scoring_seconds = mlp_rows(work, rows, percentages, refit, progress)
        best = min(SCORERS, key=lambda m: rows.by_key[("mlp", m, 20.0, refit)]["ratio"])
        progress(f"best uniform scorer at -20%{' with refit' if refit else ''}: {best}")
        if "allocation" in parts:
            allocation_rows(work, rows, best, percentages, refit, scoring_seconds)
    _cached_scores.clear()
    rows.table(report, "Perplexity, ratio to the unpruned model and CrowS-Pairs, every setting")
    report.table(["target", "limit", "best measured ratio", "status"], verdict(rows), title="Targets")
    if "budget" in parts:
        budget(work, args, base, best, refit, (512, 2048) if quick else (2048, 8192, 32768, 65536), report, progress)
    report.write()
    rows.partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
