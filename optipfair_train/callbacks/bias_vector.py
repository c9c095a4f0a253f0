"""``BiasVectorCallback``: when a Trainer finishes, subtract the trained model's bias vector from its weights.

At ``on_train_end`` it fits the model's bias vector on StereoSet **build** items and subtracts ``strength``
times it (:mod:`optipfair_train.bias.bias_vector`: two short fine-tunes of copies of the model, on the
items' stereotype and on their anti-stereotype sentences; their difference is removed). Any Trainer or TRL
trainer that trains the full model; a model with PEFT adapters is refused at ``on_train_begin``, before the
first step (merge the adapters and call :func:`~optipfair_train.bias.debias_with_bias_vector` instead, as
the pipeline does). Several processes each compute the same vector (the fit is deterministic), so their
models stay equal.

Example:
    >>> build, held_out = split_items(load_stereoset("default"), seed=0)  # doctest: +SKIP
    >>> trainer.add_callback(BiasVectorCallback(build[:1000], tokenizer, strength=0.5))  # doctest: +SKIP
    >>> trainer.train()  # the returned model has the vector removed  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import TrainerCallback

from ..bias.bias_vector import check_bias_vector_settings, debias_with_bias_vector
from ..bias.stereoset_data import StereoSetItem

__all__ = ["BiasVectorCallback"]

logger = logging.getLogger(__name__)


class BiasVectorCallback(TrainerCallback):
    """Subtract ``strength`` times the trained model's bias vector (fitted on ``items``) when training ends.

    Raises:
        ValueError: no items (at construction); a bad strength or fit setting, or a model with PEFT
            adapters (at train begin, before any step).

    Example:
        >>> cb = BiasVectorCallback(build[:1000], tokenizer, strength=0.5, epochs=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        items: Sequence[StereoSetItem],
        tokenizer,
        strength: float,
        epochs: int = 2,
        learning_rate: float = 2e-5,
        batch_size: int = 16,
        seed: int = 0,
        show_progress: bool = False,
    ):
        if len(items) == 0:
            raise ValueError("BiasVectorCallback needs StereoSet build items; none were given")
        self.items, self.tokenizer, self.strength = list(items), tokenizer, strength
        self.fit = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
        self.seed, self.show_progress = seed, show_progress

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_bias_vector_settings(model, self.strength, **self.fit)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        debias_with_bias_vector(
            model, self.tokenizer, self.items, self.strength, seed=self.seed, show_progress=self.show_progress,
            **self.fit,
        )  # fmt: skip
        logger.info("bias vector x%g subtracted after step %d", self.strength, state.global_step)
