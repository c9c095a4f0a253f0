"""``PruneThenHeal``: rounds of prune -> heal -> evaluate, resumable, with a model card at the end.

Layout of ``output_dir``::

    state.json                 the config, the baseline (and its StereoSet item scores), finished rounds,
                               the W&B run id, ``finished``
    stage-items/<stage>.json   each stage's per-item probe results (:mod:`.stage_items`), for pairing runs
    round-K/pruned/            the model right after round K's pruning, with its events.json
    round-K/heal/checkpoint-N  Trainer checkpoints while healing (resume continues from the last complete)
    round-K/model/             the healed model, LoRA merged, with round.json; round K is finished once
                               it exists
    teacher-cache/             teacher-written text and the teacher's top-k logits on the healing set
                               (:mod:`.teacher`), built once
    final/                     the last round's model, tokenizer, pruning_manifest.json, README.md card
    report.html                the self-contained dashboard (stage table, trajectories, heatmaps, card)
    optipfair-train.lock       locked by the run writing the folder: a second run there is refused (:mod:`.lock`)

Every folder and state file is written under a temporary name and renamed into place once whole
(:mod:`.state`), so a crash at any point leaves finished steps intact and nothing half-written that a
rerun would trust; rerunning the same command resumes from the last finished step and reaches the
same final model, and rerunning a finished run changes nothing (a deleted ``final/`` is rebuilt). Every setting is checked, and every
round's pruning dry-run on the model's shapes (:mod:`.validate`), before the output folder is created.

A fresh ``Trainer`` heals each round, so the structural change never happens inside a DDP run: every
rank prunes identically (calibration statistics are all-reduced) and the next Trainer wraps the new
shapes.

Example:
    >>> from optipfair_train.pipeline import PruneThenHeal, load_config
    >>> result = PruneThenHeal(load_config("configs/demo.yaml")).run()  # doctest: +SKIP
    >>> result["final_dir"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments

from ..analysis import count_parameters
from ..arch import get_adapter, unwrap_model
from ..data import block_dataloader
from ..heal import lm_dataset
from ..models import load_model_and_tokenizer
from ..pruning import apply, load_pruned_model, plan, save_pruned_model
from ..speed import compare_speed
from .card import base_model_name, card_inputs, write_model_card
from .config import PipelineConfig
from .evaluate import StageEvaluator
from .faults import crash_point
from .figures import report_figures
from .healing import NonFiniteLossError, heal, remove_bias_vector, training_args
from .lock import OutputGuard
from .report import write_report
from .rounds import round_requests
from .run_data import load_run_data
from .run_state import STATE_NAME, Retry, RunState, changed_settings, comparable_settings
from .stage_items import ITEMS_DIR
from .state import (
    COMPLETE_NAME,
    EVENTS_NAME,
    ROUND_RECORD,
    atomic_folder,
    atomic_write_json,
    check_writable,
    final_ready,
    finished_rounds,
    folder_problem,
    read_json,
    remove_folder,
    remove_leftovers,
)
from .teacher import cache_teacher_logits, load_teacher, write_teacher_text
from .tracking import RoundTracker
from .validate import preflight
from .verdict import run_files

logger = logging.getLogger(__name__)

__all__ = ["PruneThenHeal", "NonFiniteLossError"]


class PruneThenHeal:
    """Iterative structured pruning with healing and fairness monitoring.

    Args:
        config: a :class:`~optipfair_train.pipeline.config.PipelineConfig` (see ``load_config``).
        callbacks: extra ``TrainerCallback`` objects given to every healing Trainer (for example a
            ``BiasProbeCallback`` to watch fairness during recovery).

    Example:
        >>> PruneThenHeal(load_config(None, ["--heal_method", "none"])).run()  # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, callbacks: list[TrainerCallback] | None = None):
        self.config = config
        self.callbacks = list(callbacks or [])
        self.out = Path(config.run.output_dir)
        self.base_name = base_model_name(config)
        # cpu=True on a CPU-only machine: without it, ranks of a multi-process CPU run all see index 0
        self.distributed = PartialState(cpu=not torch.cuda.is_available())
        self.state = RunState()
        self.guard = OutputGuard(self.out, self.distributed)  # the folder's lock, and a full disk named

    # -- the output folder ---------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.out / STATE_NAME

    def _save_state(self) -> None:
        if self.distributed.is_main_process:
            self.state.save(self._state_path())
        self.distributed.wait_for_everyone()

    def _read_state(self) -> RunState | None:
        """The state of an earlier run in ``output_dir`` (``None`` if there is none); reads only."""
        state = RunState.load(self._state_path())
        changes = changed_settings(state.config, self.config) if state is not None else []
        if changes:
            raise ValueError(
                f"{self.out} holds a run with different settings ({'; '.join(changes)}); use a new "
                "output_dir (or delete it) to start over."
            )
        return state

    def _open_output_dir(self, existing: RunState | None) -> None:
        """Create ``output_dir`` (the first write of a run) or clear what a crash left in it."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"Output directory {self.out} is not writable ({err}); choose another output_dir."
            ) from err
        self.guard.lock()  # before anything else is written; a run started alongside this one is refused
        if self.distributed.is_main_process:
            for folder in [self.out, self.out / ITEMS_DIR, *self.out.glob("round-*")]:
                remove_leftovers(folder)
        self.distributed.wait_for_everyone()
        if existing is not None:
            logger.info("Resuming the run in %s", self.out)
        self.state = existing or RunState(config=comparable_settings(self.config))
        self._save_state()

    def _load_saved(self, folder: Path) -> torch.nn.Module:
        """A model folder this pipeline wrote, checked file by file first."""
        problem = folder_problem(folder)
        if problem is None:
            try:
                model = load_pruned_model(folder)
            except Exception as err:  # e.g. safetensors' own errors, which name no file
                problem = f"{folder} cannot be loaded ({err})"
        if problem is not None:
            raise ValueError(f"{problem}. Delete {folder} to redo the step that wrote it.")
        unwrap_model(model).config._name_or_path = self.base_name  # the manifest names the original
        return model

    def _save_model(self, model, tokenizer, folder: Path, records: dict[str, Any]) -> None:
        """Save ``model`` (with JSON ``records`` beside it) into ``folder``, all at once or not at all."""
        if self.distributed.is_main_process:
            with atomic_folder(folder) as tmp:
                save_pruned_model(model, tmp, tokenizer=tokenizer)
                crash_point("model-save")
                for name, data in records.items():
                    atomic_write_json(tmp / name, data)
        self.distributed.wait_for_everyone()

    # -- data ----------------------------------------------------------------------------------------
    def _load_data(self, tokenizer) -> None:
        self.evaluator = StageEvaluator(self.config, tokenizer, self.distributed.is_main_process, self.out)
        self.bias_pairs = self.evaluator.bias_pairs
        self.behaviour_pairs = self.evaluator.behaviour_pairs
        data = load_run_data(self.config, tokenizer, self.distributed.num_processes)
        if data.calibration is not None:  # else teacher text: _prepare_teacher_data
            self.calibration = data.calibration
        if data.heal_dataset is not None:
            self.heal_dataset = data.heal_dataset
        self.fairness_items, self.bias_vector_items = data.fairness_items, data.bias_vector_items

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, stage: str = "base") -> dict[str, Any]:
        """Every stage metric (:mod:`.evaluate`) of ``stage`` (``base``, ``round-K-pruned``...), its
        per-item results saved in the run folder; only the main process measures, the others get ``{}``."""
        return self.evaluator.measure(model, tokenizer, is_base=stage == "base", stage=stage)

    # -- healing -------------------------------------------------------------------------------------
    def _training_args(self, round_dir: Path, learning_rate: float) -> TrainingArguments:
        c = self.config
        return training_args(c.heal, round_dir, learning_rate, run=c.run, seq_len=c.data.heal_seq_len)

    def _heal(
        self, model, tokenizer, round_dir: Path, learning_rate: float, curve: TrainerCallback
    ) -> tuple[torch.nn.Module, int]:
        c = self.config
        return heal(
            model,
            tokenizer,
            c.heal,
            round_dir,
            learning_rate,
            getattr(self, "heal_dataset", None),
            run=c.run,
            seq_len=c.data.heal_seq_len,
            behaviour_sample_size=c.data.behaviour_sample_size,
            teacher=self.teacher,
            teacher_cache=self.teacher_cache,
            behaviour_pairs=self.behaviour_pairs,
            callbacks=[*self.callbacks, curve],
            fairness_items=self.fairness_items,
        )

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) every round; returns the final model (in memory and its folder) and the
        baseline and per-round metrics (``already_finished`` is true when an earlier run had done it all).

        Raises:
            OutputInUseError: another run is writing ``output_dir`` (its pid and host are named).
        """
        with self.guard:
            return self._run()

    def _run(self) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        existing = self._read_state()
        if not final_ready(self.out, existing) and self.out.is_dir():
            self.guard.lock(early=True)  # another run here is refused at once; the state is read again
            existing = self._read_state()
        if final_ready(self.out, existing):
            return self._already_finished(existing)
        if existing is not None and existing.finished:
            logger.warning("%s is missing; rebuilding it from the last round's model", self.out / "final")
        check_writable(self.out)
        torch.manual_seed(config.run.seed)
        model, tokenizer = load_model_and_tokenizer(config.model.model_path, dtype=config.model.dtype)
        unwrap_model(model).config._name_or_path = self.base_name
        adapter = get_adapter(model)
        base = {
            "width": adapter.mlp(0).intermediate_size,
            "kv_heads": adapter.head_counts(0)[1],
            "parameters": count_parameters(model),
        }
        planned = preflight(model, base, config)
        logger.info("Parameters after each round, as planned: %s", ", ".join(f"{n:,}" for n in planned))
        self._load_data(tokenizer)
        self.teacher, self.teacher_cache = load_teacher(config, tokenizer), None
        self._open_output_dir(existing)  # nothing was written before this point
        self._prepare_teacher_data(model, tokenizer)
        if self.evaluator.general_ids is not None:
            self.state.general_text = self.evaluator.general_text
        else:
            self.state.general_note = f"no general held-out text ({self.evaluator.general_text})"
        self.tracker = RoundTracker(config, self.state, self.out, self.distributed.is_main_process)
        if self.state.baseline is None:
            self.state.baseline = self.evaluate(model, tokenizer, stage="base")
            if self.evaluator.stereoset_base is not None:  # kept so a resumed run pairs against the same
                self.state.stereoset_base_items = self.evaluator.stereoset_base["items"]
            if self.evaluator.zeroshot is not None and self.evaluator.zeroshot.base is not None:
                self.state.zeroshot_base_items = self.evaluator.zeroshot.base
            self._save_state()
            self.tracker.log_round(0, self.state.baseline, self.state)
        elif self.state.stereoset_base_items and self.evaluator.is_main:
            self.evaluator.stereoset_base = {"items": self.state.stereoset_base_items}
        if self.state.zeroshot_base_items and self.evaluator.zeroshot is not None:
            self.evaluator.zeroshot.base = self.state.zeroshot_base_items

        self.state.rounds = finished_rounds(self.out, config.pruning.num_rounds)
        if self.state.rounds:  # continue from the last finished round's model
            model = self._load_saved(self.out / f"round-{len(self.state.rounds)}" / "model")
        for k in range(len(self.state.rounds) + 1, config.pruning.num_rounds + 1):
            model = self._run_round(k, self.out / f"round-{k}", model, tokenizer, base)

        final_dir = self.out / "final"
        if self.distributed.is_main_process:
            self._write_final(model, tokenizer, final_dir)
        self.distributed.wait_for_everyone()
        self.state.finished = True
        self._save_state()
        logger.info("Finished in %.0f s; final model in %s", time.perf_counter() - start, final_dir)
        self.tracker.finish(card_inputs(config, self.state, self.state.speed))
        return self._result(model, final_dir, already_finished=False)

    def _write_final(self, model, tokenizer, final_dir: Path) -> None:
        """Speed (base vs final, interleaved), the final folder with its card, then ``report.html``."""
        config = self.config
        if self.state.speed is None:  # measured once: a rerun after a crash reuses it
            base_model, _ = load_model_and_tokenizer(config.model.model_path, dtype=config.model.dtype)
            self.state.speed = compare_speed(base_model, model, tokenizer)
            del base_model
            self.state.save(self._state_path())  # main process only (the caller)
        card = card_inputs(config, self.state, self.state.speed)
        last = self.out / f"round-{config.pruning.num_rounds}" / "model"
        with atomic_folder(final_dir) as tmp:
            shutil.copytree(
                last, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COMPLETE_NAME, ROUND_RECORD)
            )
            crash_point("card-write")
            write_model_card(tmp, card)
        crash_point("report-write")
        write_report(self.out, card, figures=report_figures(self.state), files=run_files(self.out))

    def _result(self, model, final_dir: Path, already_finished: bool) -> dict[str, Any]:
        return {
            "model": model,
            "final_dir": str(final_dir),
            "baseline": self.state.baseline,
            "rounds": self.state.rounds,
            "already_finished": already_finished,
        }

    def _already_finished(self, state: RunState) -> dict[str, Any]:
        """A finished run's result, read back; nothing is written and no tracking run is started."""
        self.state = state
        final_dir = self.out / "final"
        logger.info("%s holds a finished run; nothing to do.", self.out)
        return self._result(self._load_saved(final_dir), final_dir, already_finished=True)

    def _prepare_teacher_data(self, model, tokenizer) -> None:
        """Teacher-written calibration / healing text, then the teacher's cached top-k logits; the
        teacher is dropped once cached (healing needs only the cache)."""
        folder = self.out / "teacher-cache"
        writer = self.teacher if self.teacher is not None else model
        blocks = write_teacher_text(self.config, writer, tokenizer, folder, self.distributed)
        if "calibration" in blocks:
            self.calibration = list(block_dataloader(blocks["calibration"]))
        if "heal" in blocks:
            self.heal_dataset = lm_dataset(blocks["heal"])
        if self.teacher is not None and self.config.heal.kd_top_k:
            self.heal_dataset, self.teacher_cache = cache_teacher_logits(
                self.config, self.teacher, self.heal_dataset, folder, self.distributed
            )
            self.teacher = None

    def _run_round(self, k: int, round_dir: Path, model, tokenizer, base: dict) -> torch.nn.Module:
        config = self.config
        pruned_dir = round_dir / "pruned"
        if pruned_dir.is_dir():
            model = self._load_saved(pruned_dir)
            events = read_json(pruned_dir / EVENTS_NAME, f"delete {pruned_dir} to prune round {k} again.")
        else:
            events = []
            # one plan per request, each applied before the next is planned: a plan of several axes
            # would plan the later ones on a full copy of the model
            for request in round_requests(
                model,
                base,
                config,
                k,
                bias_pairs=self.bias_pairs,
                tokenizer=tokenizer,
                bias_items=self.evaluator.fairness_items,
            ):
                planned = plan(model, request, self.calibration, show_progress=config.run.show_progress)
                events += apply(model, planned)
            self._save_model(model, tokenizer, pruned_dir, {EVENTS_NAME: events})
        pruned_metrics = self.evaluate(model, tokenizer, stage=f"round-{k}-pruned")

        learning_rate, first = config.heal.learning_rate, 0
        retry = self.state.retry
        if retry is not None and retry.round == k:  # a crash interrupted a retry: go on with it, at its rate
            learning_rate, first = retry.learning_rate, retry.attempt
        for attempt in range(first, config.heal.nan_retries + 1):
            try:
                torch.manual_seed(config.run.seed + k)
                curve = self.tracker.heal_curve(k)  # healing loss: W&B on the pipeline's step, the report
                model, heal_tokens = self._heal(model, tokenizer, round_dir, learning_rate, curve)
                break
            except NonFiniteLossError as err:
                if attempt == config.heal.nan_retries:
                    raise NonFiniteLossError(
                        f"Round {k}: healing loss stayed non-finite after {attempt + 1} "
                        "attempts; nothing of this round was saved. Lower learning_rate."
                    ) from err
                learning_rate *= config.heal.nan_lr_factor
                logger.warning(
                    "Round %d: non-finite loss; rolling back and retrying with lr=%g", k, learning_rate
                )
                if self.distributed.is_main_process:
                    remove_folder(round_dir / "heal")  # before the state says "retry", never after
                self.state.retry = Retry(round=k, attempt=attempt + 1, learning_rate=learning_rate)
                self._save_state()
                model = self._load_saved(pruned_dir)

        model = remove_bias_vector(
            model,
            tokenizer,
            config.heal,
            self.bias_vector_items,
            config.run.seed + k,
            config.run.show_progress,
        )
        healed = self.evaluate(model, tokenizer, stage=f"round-{k}-healed")
        record = {
            "round": k,
            "events": events,
            "pruned": pruned_metrics,
            "healed": healed,
            "learning_rate": learning_rate,
            "heal_tokens": heal_tokens,
            "heal_loss": curve.losses,
        }
        self._save_model(model, tokenizer, round_dir / "model", {ROUND_RECORD: record})
        self.state.rounds.append(record)
        self.state.retry = None
        self._save_state()
        if self.distributed.is_main_process:
            remove_folder(round_dir / "heal")
        self.distributed.wait_for_everyone()
        self.tracker.log_round(k, healed, self.state, record)
        crash_point("between-rounds")
        return model
