"""What the pipeline measures at every stage (base, each round's pruned and healed model).

- ``parameters``;
- ``perplexity``: held-out text of the healing domain (``eval_data``);
- ``perplexity/general``: held-out general text no healing saw (``general_eval_data``; ``wikitext`` is
  WikiText-2 test from ``$OPTIPFAIR_TRAIN_DATA`` or ``../shared/data``); :attr:`StageEvaluator.general_text`
  names the text, or says that none was given or found, for the card;
- StereoSet on a fixed seeded sample (``stereoset_data``, ``stereoset_sample_size``) of the held-out half
  of :func:`~optipfair_train.bias.split_items` (seeded by the run's seed; the build half is reserved for
  the fairness modes, which choose or train on it, so a run with a mode and one without judge the same
  items and pair): ``stereoset/ss``,
  ``stereoset/lms``, ``stereoset/icat``, each with ``_ci_low`` / ``_ci_high`` (95% bootstrap), and per
  bias type ``stereoset/ss/<type>`` (and lms, icat, ``stereoset/num_items/<type>``,
  ``stereoset/ss_ci_low/<type>``, ``stereoset/ss_ci_high/<type>``); for every stage after the base, the change since
  the base ``stereoset/ss_change`` and ``stereoset/icat_change`` with a paired 95% interval (the same
  items resampled for both models, :func:`~optipfair_train.bias.stereoset_change`), which says whether
  pruning or healing moved bias, where two overlapping intervals cannot; the same per bias type,
  ``stereoset/ss_change/<type>``, ``stereoset/ss_change_ci_low/<type>``... (its own, wider interval:
  gender is about 12% of the items);
- the activation probe on ``bias_pairs`` over every layer: ``bias/activation_mean_difference``, the
  scale-invariant ``bias/activation_normalized_difference`` with its interval, and
  ``bias/layers`` (layer key -> normalised difference, for the heatmaps);
- with ``behaviour_pairs``: the behavioural score ``bias/score`` with its interval;
- with ``zeroshot_tasks``: zero-shot accuracy per task, its mean and paired change vs the base
  (``zeroshot/*``, :mod:`.zeroshot_stage`);
- with ``reference_run``: the paired change vs the same stage of that run (``reference/*``,
  :mod:`.reference`).

Given the run folder (``out``) and a stage name, each stage's per-item results are written to
``out/stage-items/<stage>.json`` (:mod:`.stage_items`), which is what another run pairs with.

Every value is a plain JSON number (or the one ``bias/layers`` mapping), so the metrics go into
``state.json`` as they are and the card, the report and W&B all read the same numbers.

Example:
    >>> evaluator = StageEvaluator(config, tokenizer)  # doctest: +SKIP
    >>> evaluator.measure(model, tokenizer, is_base=True, stage="base")["stereoset/ss"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..analysis import count_parameters
from ..data import load_texts, tokenize_for_lm
from ..evaluation import perplexity
from .config import PipelineConfig, fairness_heads
from .reference import check_reference_run, reference_metrics
from .stage_items import stage_record, write_stage_items
from .zeroshot_stage import ZeroShotStage, parse_task_data

logger = logging.getLogger(__name__)

__all__ = ["LAYERS_KEY", "StageEvaluator", "resolve_general_text"]

LAYERS_KEY = "bias/layers"
_ROOT = Path(__file__).resolve().parents[2]


def _wikitext_candidates() -> list[Path]:
    roots = [Path(os.environ["OPTIPFAIR_TRAIN_DATA"])] if os.environ.get("OPTIPFAIR_TRAIN_DATA") else []
    roots += [Path("..") / "shared" / "data", _ROOT.parent / "shared" / "data"]
    return [root / "wikitext-2" / "test.txt" for root in roots]


def resolve_general_text(source: str) -> tuple[str | None, str]:
    """``(what to load, how the card names it)`` for ``general_eval_data``; nothing to load: ``None``.

    Example:
        >>> resolve_general_text("")
        (None, 'none given')
    """
    if not source:
        return None, "none given"
    if source != "wikitext":
        return source, source
    candidates = _wikitext_candidates()
    for path in candidates:
        if path.is_file():
            shown = os.path.relpath(os.path.abspath(path))  # no home folders; symlinks kept as named
            return str(path), f"WikiText-2 test ({shown})"
    tried = ", ".join(str(p) for p in candidates)
    return None, f"none available (general_eval_data: wikitext, but no WikiText-2 test.txt at {tried})"


class StageEvaluator:
    """Loads the held-out texts and probe items once, and checks ``reference_run`` (every rank, so a bad
    source fails before any folder is written), and measures a model; only the main process measures,
    the others get ``{}``. With ``out`` (the run folder, written once the run opens it) each measured
    stage's per-item results are saved there.

    Example:
        >>> metrics = StageEvaluator(config, tokenizer).measure(model, tokenizer)  # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, tokenizer, is_main: bool = True, out: Path | None = None):
        from ..bias import held_out_sample, item_id, load_pairs, load_stereoset, sample_items, split_items

        self.config, self.is_main, self.out = config, is_main, out
        self.reference = check_reference_run(config.data.reference_run, config.run.output_dir)
        d = config.data
        num_sequences = max(1, d.eval_tokens // d.eval_seq_len)
        self.eval_ids = tokenize_for_lm(
            tokenizer, load_texts(d.eval_data, split="evaluation"), seq_len=d.eval_seq_len,
            num_sequences=num_sequences,
        )  # fmt: skip
        source, self.general_text = resolve_general_text(d.general_eval_data)
        self.general_ids = None
        if source is None:
            logger.warning("No general held-out text: %s", self.general_text)
        else:
            self.general_ids = tokenize_for_lm(
                tokenizer, load_texts(source, split="evaluation"), seq_len=d.eval_seq_len,
                num_sequences=num_sequences,
            )  # fmt: skip
        self.bias_pairs = load_pairs(d.bias_pairs)
        self.behaviour_pairs = load_pairs(d.behaviour_pairs) if d.behaviour_pairs else None
        self.stereoset_items = []
        # the base model's per-item StereoSet scores: every later stage's change is paired against them
        self.stereoset_base: dict | None = None
        self.fairness_items = []  # StereoSet build items the fairness head scorer reads (never probed)
        self.stereoset_ids: list[str] = []
        if d.stereoset_data:
            # every run judges the held-out half (so runs with and without a fairness mode pair); the
            # build half is the fairness modes' only
            items = load_stereoset(d.stereoset_data)
            if fairness_heads(config):
                build = split_items(items, seed=config.run.seed)[0]
                self.fairness_items = sample_items(build, config.pruning.fairness_items, seed=config.run.seed)
            self.stereoset_items = held_out_sample(items, d.stereoset_sample_size, seed=config.run.seed)
            self.stereoset_ids = [item_id(item) for item in self.stereoset_items]
        self.zeroshot = None  # zero-shot accuracy (.zeroshot_stage); its base answers are kept for pairing
        if d.zeroshot_tasks:
            tasks = [t.strip() for t in d.zeroshot_tasks.split(",") if t.strip()]
            sources = parse_task_data(d.zeroshot_data)
            self.zeroshot = ZeroShotStage(tasks, d.zeroshot_sample_size, config.run.seed, sources)

    def measure(
        self, model: torch.nn.Module, tokenizer, is_base: bool = False, stage: str | None = None
    ) -> dict[str, Any]:
        """Every stage metric of ``model`` (see the module doc); ``is_base`` marks the unpruned model,
        whose per-item StereoSet scores later stages' changes are paired against; ``stage``
        (:func:`~optipfair_train.pipeline.stage_items.stage_name`) names the stage for its per-item
        file and for pairing with ``reference_run``."""
        from ..bias import (
            behavioural_bias_score,
            probe_activation_bias,
            stereoset_change,
            stereoset_change_scalars,
            stereoset_scores,
            summary_scalars,
        )

        if not self.is_main:
            return {}
        d, seed = self.config.data, self.config.run.seed
        metrics: dict[str, Any] = {
            "parameters": count_parameters(model),
            "perplexity": perplexity(model, input_ids=self.eval_ids, seq_len=d.eval_seq_len),
        }
        if self.general_ids is not None:
            metrics["perplexity/general"] = perplexity(
                model, input_ids=self.general_ids, seq_len=d.eval_seq_len
            )
        result = None
        if self.stereoset_items:
            result = stereoset_scores(model, tokenizer, self.stereoset_items, seed=seed)
            for name in ("ss", "lms", "icat"):
                for suffix in ("", "_ci_low", "_ci_high"):
                    metrics[f"stereoset/{name}{suffix}"] = result[name + suffix]
                for bias_type, entry in result["by_bias_type"].items():
                    metrics[f"stereoset/{name}/{bias_type}"] = entry[name]
            for bias_type, entry in result["by_bias_type"].items():  # the per-type figure prints n and CI
                metrics[f"stereoset/num_items/{bias_type}"] = entry["num_items"]
                metrics[f"stereoset/ss_ci_low/{bias_type}"] = entry["ss_ci_low"]
                metrics[f"stereoset/ss_ci_high/{bias_type}"] = entry["ss_ci_high"]
            metrics["stereoset/num_items"] = result["num_items"]
            if is_base:
                self.stereoset_base = {"items": result["items"]}
            elif self.stereoset_base is not None:
                metrics |= stereoset_change_scalars(stereoset_change(self.stereoset_base, result, seed=seed))
        if self.zeroshot is not None:
            metrics.update(self.zeroshot.measure(model, tokenizer, is_base=is_base))
        activation = probe_activation_bias(model, tokenizer, self.bias_pairs, layers="all", seed=seed)
        behaviour = None
        if self.behaviour_pairs:
            behaviour = behavioural_bias_score(
                model, tokenizer, self.behaviour_pairs, seed=seed,
                sample_size=min(d.behaviour_sample_size, len(self.behaviour_pairs)),
            )  # fmt: skip
        metrics.update(summary_scalars(activation=activation, behaviour=behaviour))
        metrics[LAYERS_KEY] = {
            key: entry["normalized_difference"]
            for key, entry in activation["aggregate"]["layer_metrics"].items()
        }
        if stage is not None:
            metrics |= self._save_and_pair(stage, metrics, result)
        return metrics

    def _save_and_pair(self, stage: str, metrics: dict[str, Any], stereoset: dict | None) -> dict[str, float]:
        """Write the stage's per-item file (when the run folder is known); its ``reference/*`` metrics."""
        d = self.config.data
        texts = {
            "perplexity": f"{d.eval_data} ({d.eval_tokens} tokens, windows of {d.eval_seq_len})",
            "perplexity/general": f"{d.general_eval_data} ({d.eval_tokens} tokens, windows of {d.eval_seq_len})",
        }
        perplexity = {k: metrics[k] for k in texts if k in metrics}
        record = stage_record(
            stage,
            self.config.run.seed,
            stereoset=(self.stereoset_ids, stereoset["items"]) if stereoset is not None else None,
            zeroshot=self.zeroshot.last["tasks"] if self.zeroshot is not None else None,
            perplexity=perplexity | {"texts": {k: texts[k] for k in perplexity}},
        )
        if self.out is not None:
            write_stage_items(self.out, record)
        return reference_metrics(self.reference, record, self.config.run.seed) if self.reference else {}
