"""What every optipfair-train callback shares: reporting through the Trainer, W&B and TensorBoard media.

How scalars reach the Trainer's logs
------------------------------------
A ``TrainerCallback`` gets no reference to its Trainer, and the reporting callbacks (W&B, TensorBoard,
MLflow, ...) run *before* user callbacks, so adding keys to ``logs`` inside ``on_log`` would reach
none of them. We follow TRL (``LogCompletionsCallback``): the callback takes the ``trainer`` in its
constructor (or later through :meth:`ReportingCallback.attach`) and sends its scalars with
``trainer.log(scalars)``. That is the Trainer's own path: the values land in
``trainer.state.log_history`` and every ``report_to`` backend receives them at
``state.global_step`` (W&B as ``train/<key>`` against ``train/global_step``, TensorBoard as
``train/<key>``). Other callbacks see them in ``on_log``; :class:`FairnessGuardCallback` relies on it.

Without a trainer the scalars still go to ``state.log_history`` (with ``step``), so they are saved in
``trainer_state.json``, but no backend sees them; a warning says so once.

Images and tables go to W&B only when ``"wandb" in args.report_to`` and ``wandb.run`` is active (with
``train/global_step`` so they share the Trainer's x-axis), figures to TensorBoard through the
Trainer's own ``TensorBoardCallback`` writer. Media are written by the main process only.

Example:
    >>> trainer.add_callback(BiasProbeCallback(trainer))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback

from ..bias.figures import figure_to_rgb

__all__ = ["ReportingCallback", "report_to", "wandb_active"]

logger = logging.getLogger(__name__)


def report_to(args: Any) -> list[str]:
    """``args.report_to`` as a list of backend names (it may be a string, a list or None).

    Example:
        >>> report_to(type("A", (), {"report_to": "wandb"})())
        ['wandb']
    """
    value = getattr(args, "report_to", None) or []
    if isinstance(value, str):
        value = [value]
    return [str(v) for v in value if v not in (None, "none")]


def wandb_active(args: Any) -> bool:
    """True when ``"wandb" in args.report_to`` and a W&B run is active.

    Example:
        >>> wandb_active(type("A", (), {"report_to": "none"})())
        False
    """
    if "wandb" not in report_to(args) and "all" not in report_to(args):
        return False
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return False
    return wandb.run is not None


class ReportingCallback(TrainerCallback):
    """Base class: holds the (optional) trainer and sends scalars, figures and tables to its backends.

    Args:
        trainer: the ``Trainer`` (or a TRL trainer) this callback is attached to. Needed for the scalars
            to reach the ``report_to`` backends (see the module docstring).

    Example:
        >>> cb = SomeCallback(...).attach(trainer)  # doctest: +SKIP
    """

    def __init__(self, trainer: Any | None = None):
        self.trainer = trainer
        self._warned_no_trainer = False

    def attach(self, trainer: Any) -> ReportingCallback:
        """Remember ``trainer`` (for logging) and add this callback to it if it is not there yet.

        Example:
            >>> PruningCallback(target=30, step=100).attach(trainer)  # doctest: +SKIP
        """
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ---- scalars -------------------------------------------------------------------------------
    def log_scalars(self, args: Any, state: Any, scalars: Mapping[str, float]) -> None:
        """Send ``scalars`` through ``trainer.log`` (all backends, Trainer step axis); see module doc.

        Example:
            >>> self.log_scalars(args, state, {"bias/score": 48.7})  # doctest: +SKIP
        """
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        if self.trainer is not None:
            # The callback handler's on_log clears control.should_log; keep the Trainer's own decision
            # to log its loss at this step (set by DefaultFlowCallback before our on_step_end ran).
            control = getattr(self.trainer, "control", None)
            should_log = getattr(control, "should_log", False)
            self.trainer.log(dict(clean))
            if control is not None and should_log:
                self.trainer.control.should_log = True
            return
        if not self._warned_no_trainer:
            logger.warning(
                "%s has no trainer: its scalars go to trainer.state.log_history only, not to the "
                "report_to backends. Pass trainer=... (or call .attach(trainer)).",
                type(self).__name__,
            )
            self._warned_no_trainer = True
        state.log_history.append({**clean, "step": state.global_step})

    # ---- media ---------------------------------------------------------------------------------
    def _tensorboard_writer(self, args: Any) -> Any | None:
        if self.trainer is None or "tensorboard" not in report_to(args) and "all" not in report_to(args):
            return None
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and type(callback).__name__ == "TensorBoardCallback":
                return writer
        return None

    def log_figures(self, args: Any, state: Any, figures: Mapping[str, Any]) -> list[str]:
        """Log matplotlib figures as ``wandb.Image`` (W&B active) and to TensorBoard (its backend).

        Returns the backends that received them. Figures are cleared afterwards.

        Example:
            >>> self.log_figures(args, state, {"bias/trajectory": fig})  # doctest: +SKIP
            ['wandb']
        """
        sent: list[str] = []
        if not figures or not state.is_world_process_zero:
            return sent
        try:
            if wandb_active(args):
                import wandb

                payload = {key: wandb.Image(figure_to_rgb(fig)) for key, fig in figures.items()}
                wandb.log({**payload, "train/global_step": state.global_step})
                sent.append("wandb")
            writer = self._tensorboard_writer(args)
            if writer is not None:
                for key, fig in figures.items():
                    writer.add_figure(key, fig, state.global_step, close=False)
                writer.flush()
                sent.append("tensorboard")
        finally:
            for fig in figures.values():
                fig.clear()
        return sent

    def log_table(self, args: Any, state: Any, key: str, columns: list[str], rows: list[list[Any]]) -> bool:
        """Log a ``wandb.Table`` when a W&B run is active (main process only). Returns True if logged.

        Example:
            >>> self.log_table(args, state, "pruning/layers", ["layer", "width"], [[0, 96]])  # doctest: +SKIP
        """
        if not rows or not state.is_world_process_zero or not wandb_active(args):
            return False
        import wandb

        wandb.log({key: wandb.Table(columns=columns, data=rows), "train/global_step": state.global_step})
        return True


class ScheduledProbeMixin:
    """The probe schedule shared by the measuring callbacks: ``_run`` after every ``every_n_steps``-th
    optimizer step and after each evaluation when ``at_evaluate``. Each callback keeps its own
    ``on_train_begin`` / ``on_train_end`` (what they reset and report differs) and its ``_run``.

    Example:
        >>> class MyProbe(ScheduledProbeMixin, ReportingCallback): ...  # doctest: +SKIP
    """

    every_n_steps: int | None
    at_evaluate: bool

    def on_step_end(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._run(args, state, model, processing_class, "step")

    def on_evaluate(self, args: Any, state: Any, control: Any, model=None, processing_class=None, **kwargs):
        if self.at_evaluate:
            self._run(args, state, model, processing_class, "evaluate")
