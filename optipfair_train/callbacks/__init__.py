"""Trainer callbacks: pruning on a schedule, bias probes, gradient importance, a fairness guard,
a fairness loss added to healing, the bias vector removed when training ends.

They decide *when*; the engine (:func:`optipfair_train.prune_model`, :mod:`optipfair_train.bias`) decides
*what*. Scalars go through ``trainer.log`` so every ``report_to`` backend receives them on the Trainer's
step axis (pass the trainer, as TRL's ``LogCompletionsCallback`` does); figures and tables go to W&B
when a run is active, figures to TensorBoard when it is a backend. See :mod:`.base`.

Example:
    >>> from optipfair_train.callbacks import BiasProbeCallback, PruningCallback
    >>> trainer.add_callback(PruningCallback(trainer, target=30, step=100, dataloader=calibration))  # doctest: +SKIP
    >>> trainer.add_callback(BiasProbeCallback(trainer, every_n_steps=50))  # doctest: +SKIP
"""

from .base import ReportingCallback, report_to, wandb_active
from .bias_probe import PROBES, BiasProbeCallback
from .bias_vector import BiasVectorCallback
from .fairness_guard import GUARD_FILE, FairnessGuardCallback
from .fairness_loss import FairnessLossCallback
from .importance import GradientImportanceCallback
from .pruning import DistributedPruningError, PruningCallback
from .schedule import (
    SCHEDULE_KINDS,
    PruningEvent,
    PruningSchedule,
    make_schedule,
    units_to_remove,
)
from .stats import PRUNING_TABLE_COLUMNS, model_structure, pruning_scalars, pruning_table_rows
from .zeroshot import ZeroShotCallback

__all__ = [
    "BiasVectorCallback",
    "ZeroShotCallback",
    "PruningCallback",
    "BiasProbeCallback",
    "GradientImportanceCallback",
    "FairnessGuardCallback",
    "FairnessLossCallback",
    "DistributedPruningError",
    "ReportingCallback",
    "PROBES",
    "GUARD_FILE",
    "SCHEDULE_KINDS",
    "PruningEvent",
    "PruningSchedule",
    "make_schedule",
    "units_to_remove",
    "PRUNING_TABLE_COLUMNS",
    "model_structure",
    "pruning_scalars",
    "pruning_table_rows",
    "report_to",
    "wandb_active",
]
