"""``PruneThenHeal``: rounds of prune -> heal -> evaluate, resumable, with a model card at the end.

Layout of ``output_dir``::

    state.json                 what is finished (baseline, rounds), the config, the W&B run id
    round-K/pruned/            the model right after round K's pruning (saved before healing starts)
    round-K/heal/checkpoint-N  Trainer checkpoints while healing (resume continues from the last)
    round-K/model/             the healed model, LoRA merged; round K is finished once it exists
    final/                     the last round's model, tokenizer, pruning_manifest.json, README.md card

A fresh ``Trainer`` heals each round, so the structural change never happens inside a DDP run: every
rank prunes identically (calibration statistics are all-reduced) and the next Trainer wraps the new
shapes. Rerunning the same command after a crash resumes where it stopped; nothing finished is redone.

Example:
    >>> from optipfair_train.pipeline import PruneThenHeal, load_config
    >>> result = PruneThenHeal(load_config("configs/demo.yaml")).run()  # doctest: +SKIP
    >>> result["final_dir"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from ..analysis import count_parameters
from ..arch import get_adapter
from ..callbacks import BiasProbeCallback
from ..callbacks.base import figure_to_rgb
from ..data import calibration_dataloader, load_texts, tokenize_for_lm
from ..evaluation import perplexity, tokens_per_second
from ..heal import DistillationTrainer, add_lora, sft_dataset, text_dataset
from ..models import load_model_and_tokenizer
from ..pruning import load_pruned_model, prune_model, save_pruned_model
from .card import write_model_card
from .config import LORA_METHODS, PipelineConfig
from .rounds import round_prunings

logger = logging.getLogger(__name__)

__all__ = ["PruneThenHeal", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Healing kept producing NaN/inf losses after every allowed retry."""


class _NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first logged NaN/inf loss (the pipeline then rolls the round back)."""

    def __init__(self):
        self.tripped = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.tripped = True
            control.should_training_stop = True
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.tripped:  # a checkpoint after a NaN must not be resumed from
            raise NonFiniteLossError("non-finite loss before a checkpoint")


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
        # cpu=True on a CPU-only machine: without it, ranks of a multi-process CPU run all see index 0
        self.distributed = PartialState(cpu=not torch.cuda.is_available())
        self.state: dict[str, Any] = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.out / "state.json"

    def _save_state(self) -> None:
        if self.distributed.is_main_process:
            tmp = self._state_path().with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.replace(self._state_path())
        self.distributed.wait_for_everyone()

    def _comparable(self) -> dict:
        settings = self.config.to_dict()
        settings["run"] = {k: v for k, v in settings["run"].items() if k in ("seed",)}
        return settings

    def _prepare_output_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"  # one per process: ranks never race
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise OSError(
                f"Output directory {self.out} is not writable ({err}); choose another output_dir."
            ) from err
        if self._state_path().exists():
            self.state = json.loads(self._state_path().read_text())
            if self.state.get("config") != self._comparable():
                raise ValueError(
                    f"{self.out} holds a run with different settings; use a new output_dir "
                    "(or delete it) to start over."
                )
            logger.info("Resuming the run in %s", self.out)
        else:
            self.state = {"config": self._comparable(), "rounds": []}

    # -- data ----------------------------------------------------------------------------------------
    def _load_data(self, tokenizer) -> None:
        d = self.config.data
        from ..bias import load_pairs

        self.calibration = list(
            calibration_dataloader(
                tokenizer,
                load_texts(d.calibration_data, split="calibration"),
                num_samples=d.num_calibration_samples,
                seq_len=d.calibration_seq_len,
            )
        )
        self.eval_ids = tokenize_for_lm(
            tokenizer,
            load_texts(d.eval_data, split="evaluation"),
            seq_len=d.eval_seq_len,
            num_sequences=max(1, d.eval_tokens // d.eval_seq_len),
        )
        h = self.config.heal
        sequences = h.heal_steps * h.per_device_batch_size * h.gradient_accumulation_steps
        if h.heal_method in ("sft", "sft_lora"):  # the user's own examples, formatted by TRL
            self.heal_dataset = sft_dataset(
                d.heal_data, num_examples=sequences * self.distributed.num_processes
            )
        elif h.heal_method != "none":
            self.heal_dataset = text_dataset(
                tokenizer,
                load_texts(d.heal_data, split="calibration"),
                seq_len=d.heal_seq_len,
                num_sequences=sequences,
            )
        self.bias_pairs = load_pairs(d.bias_pairs)
        self.behaviour_pairs = load_pairs(d.behaviour_pairs) if d.behaviour_pairs else None

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, model, tokenizer) -> dict[str, Any]:
        """Parameters, perplexity on the held-out text, activation bias and behavioural bias (with CI).

        Only the main process measures (every rank holds the same weights); the others get ``{}``.
        """
        from ..bias import behavioural_bias_score, probe_activation_bias, summary_scalars

        if not self.distributed.is_main_process:
            return {}

        d = self.config.data
        activation = probe_activation_bias(model, tokenizer, self.bias_pairs, layers="first_middle_last")
        behaviour = None
        if self.behaviour_pairs:
            behaviour = behavioural_bias_score(
                model,
                tokenizer,
                self.behaviour_pairs,
                seed=self.config.run.seed,
                sample_size=min(d.behaviour_sample_size, len(self.behaviour_pairs)),
            )
        metrics = {
            "parameters": count_parameters(model),
            "perplexity": perplexity(model, input_ids=self.eval_ids, seq_len=d.eval_seq_len),
        }
        metrics.update(summary_scalars(activation=activation, behaviour=behaviour))
        return metrics

    # -- healing -------------------------------------------------------------------------------------
    def _training_args(self, round_dir: Path, learning_rate: float) -> TrainingArguments:
        h, r = self.config.heal, self.config.run
        sft = h.heal_method in ("sft", "sft_lora")
        if sft:
            from trl import SFTConfig

            # TRL's own defaults (bf16, gradient checkpointing) are for GPUs; keep the pipeline's settings.
            # Transformers 5.24 renamed gradient_checkpointing to activation_checkpointing.
            checkpointing = (
                "activation_checkpointing"
                if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
                else "gradient_checkpointing"
            )
            arguments_class, extra = (
                SFTConfig,
                {
                    "max_length": self.config.data.heal_seq_len,
                    "packing": False,
                    "bf16": False,
                    checkpointing: False,
                },
            )
        else:
            arguments_class, extra = TrainingArguments, dict(remove_unused_columns=False)
        return arguments_class(
            **extra,
            output_dir=str(round_dir / "heal"),
            max_steps=h.heal_steps,
            learning_rate=learning_rate,
            per_device_train_batch_size=h.per_device_batch_size,
            gradient_accumulation_steps=h.gradient_accumulation_steps,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, h.heal_steps // 10),
            optim="adamw_torch",
            logging_steps=1,
            logging_nan_inf_filter=False,  # the guard must see a NaN loss, not a filtered average
            save_strategy="steps",
            save_steps=r.save_steps,
            save_total_limit=1,
            seed=r.seed,
            data_seed=r.seed,
            report_to=[] if r.report_to == "none" else [r.report_to],
            run_name=r.run_name,
            disable_tqdm=not r.show_progress,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",  # the tokens healing really used (card, W&B)
            use_cpu=not torch.cuda.is_available(),
        )

    def _heal(self, model, tokenizer, round_dir: Path, learning_rate: float) -> tuple[torch.nn.Module, int]:
        """Heal ``model`` with the configured method; returns the healed (merged) model and the number
        of (non-padding) tokens healing trained on."""
        h = self.config.heal
        if h.heal_method == "none":
            return model, 0
        if h.heal_method in LORA_METHODS:
            model = add_lora(model, r=h.lora_r, alpha=h.lora_alpha, target_modules=h.lora_target_modules)
        guard = _NonFiniteLossGuard()
        kwargs = dict(
            model=model,
            args=self._training_args(round_dir, learning_rate),
            train_dataset=self.heal_dataset,
            callbacks=[guard, *self.callbacks],
        )
        if h.heal_method in ("sft", "sft_lora"):
            from trl import SFTTrainer

            trainer = SFTTrainer(processing_class=tokenizer, **kwargs)
        elif h.heal_method in ("kd", "kd_lora"):
            trainer = DistillationTrainer(
                teacher=self.teacher,
                temperature=h.kd_temperature,
                alpha=h.kd_alpha,
                data_collator=default_data_collator,
                **kwargs,
            )
        else:
            trainer = Trainer(data_collator=default_data_collator, **kwargs)
        if self.behaviour_pairs:  # watch fairness while the model recovers, on the Trainer's step axis
            trainer.add_callback(
                BiasProbeCallback(
                    trainer,
                    tokenizer=tokenizer,
                    pairs=self.behaviour_pairs,
                    seed=self.config.run.seed,
                    sample_size=min(self.config.data.behaviour_sample_size, len(self.behaviour_pairs)),
                    every_n_steps=max(1, h.heal_steps // 4),
                    at_train_begin=False,
                    at_train_end=False,
                )
            )
        checkpoints = sorted(
            (round_dir / "heal").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
        )
        try:
            trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
        except NonFiniteLossError:
            guard.tripped = True
        if guard.tripped:
            raise NonFiniteLossError(f"non-finite healing loss at lr={learning_rate:g}")
        model = trainer.model
        tokens = int(trainer.state.num_input_tokens_seen)
        return (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model), tokens

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) every round; returns the final model (in memory and its folder) and the
        baseline and per-round metrics."""
        config = self.config
        start = time.perf_counter()
        self._prepare_output_dir()
        torch.manual_seed(config.run.seed)
        model, tokenizer = load_model_and_tokenizer(config.model.model_path, dtype=config.model.dtype)
        adapter = get_adapter(model)
        base = {
            "width": adapter.mlp(0).intermediate_size,
            "kv_heads": adapter.head_counts(0)[1],
            "parameters": count_parameters(model),
        }
        if config.pruning.target_parameters and config.pruning.target_parameters >= base["parameters"]:
            raise ValueError(
                f"target_parameters {config.pruning.target_parameters:,} is already reached: the model "
                f"has {base['parameters']:,} parameters."
            )
        self._load_data(tokenizer)
        self._prepare_teacher(config, tokenizer)
        self._init_tracking()
        if "baseline" not in self.state:
            self.state["baseline"] = self.evaluate(model, tokenizer)
            self._save_state()
            self._log_round(0, self.state["baseline"])

        ran = False
        for k in range(1, config.pruning.num_rounds + 1):
            round_dir = self.out / f"round-{k}"
            if k <= len(self.state["rounds"]):
                continue
            model = self._run_round(k, round_dir, model, tokenizer, base)
            ran = True

        final_dir = self.out / "final"
        last = self.out / f"round-{config.pruning.num_rounds}" / "model"
        if not ran:  # every round was finished by an earlier run
            model = load_pruned_model(last)
        if self.distributed.is_main_process:
            # base and final speed measured side by side, so machine load affects both alike
            base_model, _ = load_model_and_tokenizer(config.model.model_path, dtype=config.model.dtype)
            speed = {
                "base": tokens_per_second(base_model, tokenizer),
                "final": tokens_per_second(model, tokenizer),
            }
            del base_model
            if final_dir.exists():
                shutil.rmtree(final_dir)
            shutil.copytree(last, final_dir)
            write_model_card(final_dir, config, self.state, speed)
        self.distributed.wait_for_everyone()
        logger.info("Finished in %.0f s; final model in %s", time.perf_counter() - start, final_dir)
        self._finish_tracking()
        return {
            "model": model,
            "final_dir": str(final_dir),
            "baseline": self.state["baseline"],
            "rounds": self.state["rounds"],
        }

    def _prepare_teacher(self, config: PipelineConfig, tokenizer) -> None:
        self.teacher = None
        if config.heal.heal_method not in ("kd", "kd_lora"):
            return
        teacher_path = config.heal.teacher_model_path or config.model.model_path
        self.teacher, teacher_tokenizer = load_model_and_tokenizer(teacher_path, dtype=config.model.dtype)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"The teacher {teacher_path!r} uses a different tokenizer from the student "
                f"{config.model.model_path!r}; distillation needs the same vocabulary."
            )

    def _run_round(self, k: int, round_dir: Path, model, tokenizer, base: dict) -> torch.nn.Module:
        config = self.config
        pruned_dir = round_dir / "pruned"
        if (pruned_dir / "config.json").exists():
            model = load_pruned_model(pruned_dir)
            events = json.loads((round_dir / "events.json").read_text())
        else:
            events = []
            for step in round_prunings(model, base, config, k):
                _, stats = prune_model(
                    model,
                    dataloader=self.calibration,
                    return_stats=True,
                    show_progress=config.run.show_progress,
                    seed=config.run.seed,
                    bias_pairs=self.bias_pairs,
                    tokenizer=tokenizer,
                    fairness_weight=config.pruning.fairness_weight,
                    **step,
                )
                events.append(stats["event"])
            if self.distributed.is_main_process:
                save_pruned_model(model, pruned_dir, tokenizer=tokenizer)
                (round_dir / "events.json").write_text(json.dumps(events, indent=2))
            self.distributed.wait_for_everyone()
        pruned_metrics = self.evaluate(model, tokenizer)

        learning_rate = config.heal.learning_rate
        for attempt in range(config.heal.nan_retries + 1):
            try:
                torch.manual_seed(config.run.seed + k)
                model, heal_tokens = self._heal(model, tokenizer, round_dir, learning_rate)
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
                    shutil.rmtree(round_dir / "heal", ignore_errors=True)
                self.distributed.wait_for_everyone()
                model = load_pruned_model(pruned_dir)

        healed = self.evaluate(model, tokenizer)
        if self.distributed.is_main_process:
            save_pruned_model(model, round_dir / "model", tokenizer=tokenizer)
            shutil.rmtree(round_dir / "heal", ignore_errors=True)
        record = {
            "round": k,
            "events": events,
            "pruned": pruned_metrics,
            "healed": healed,
            "learning_rate": learning_rate,
            "heal_tokens": heal_tokens,
        }
        self.state["rounds"].append(record)
        self._save_state()
        self._log_round(k, healed, record)
        return model

    # -- tracking ------------------------------------------------------------------------------------
    def _init_tracking(self) -> None:
        self.wandb_run = None
        if self.config.run.report_to != "wandb" or not self.distributed.is_main_process:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = self.state.setdefault("wandb_run_id", uuid.uuid4().hex[:8])
        self.wandb_run = wandb.run or wandb.init(
            project="optipfair-train",
            name=self.config.run.run_name,
            id=run_id,
            resume="allow",
            dir=str(self.out),
            config=self.config.to_dict(),
        )
        self.wandb_run.define_metric("round")
        self.wandb_run.define_metric("round/*", step_metric="round")

    def _log_round(self, k: int, metrics: dict, record: dict | None = None) -> None:
        if self.wandb_run is None:
            return
        import wandb

        from ..bias import trajectory_figure

        scalars = {
            f"round/{name}": value for name, value in metrics.items() if isinstance(value, (int, float))
        }
        history = [self.state["baseline"]] + [r["healed"] for r in self.state["rounds"]]
        figure = trajectory_figure(
            list(range(len(history))),
            {"activation mean difference": [h.get("bias/activation_mean_difference", 0.0) for h in history]},
            xlabel="round",
            ylabel="bias",
            title="Bias across rounds",
        )
        columns = [
            "round",
            "parameters",
            "perplexity",
            "bias/activation_mean_difference",
            "bias/score",
            "bias/score_ci_low",
            "bias/score_ci_high",
        ]
        rows = [[i] + [h.get(c) for c in columns[1:]] for i, h in enumerate(history)]
        payload = {
            "round": k,
            **scalars,
            "round/bias_trajectory": wandb.Image(figure_to_rgb(figure)),
            "round/summary": wandb.Table(columns=columns, data=rows),
        }
        if record is not None:
            payload["round/pruning"] = wandb.Table(
                columns=["pruning_type", "method", "parameters_before", "parameters_after"],
                data=[
                    [e["pruning_type"], e["method"], e["parameters_before"], e["parameters_after"]]
                    for e in record["events"]
                ],
            )
        self.wandb_run.log(payload)

    def _finish_tracking(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
