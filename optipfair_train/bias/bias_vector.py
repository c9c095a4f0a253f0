"""Debiasing by task arithmetic: the bias vector, estimated on StereoSet build items and subtracted.

**Estimate** (:func:`fit_bias_vector`). Two copies of the model are fine-tuned with the same items, order,
steps and learning rate: one on the items' stereotype sentences, the other on their anti-stereotype
sentences (the mean per-token negative log-likelihood of the sentence given its context, the tokens the
StereoSet probe scores: :func:`~optipfair_train.bias.stereoset.item_sequences`). Each copy also adapts to
StereoSet's style, contexts and targets; that part is common to both and cancels in the difference of
their weight changes, the **bias vector** ``v = (theta_stereo - theta) - (theta_anti - theta)``: the
direction in weight space that makes stereotype continuations more likely than their alternatives
(task arithmetic, Ilharco et al. 2023; a bias vector in this sense, Shirafuji et al. 2024).

**Remove** (:func:`subtract_bias_vector`): ``theta <- theta - strength * v``. Only weights change, so the
model keeps its family, shapes and parameter count and reloads with plain ``from_pretrained``; the event
is appended to ``config.debias_history``. ``strength`` is chosen on build items that did not fit the
vector (``bench/bench_bias_vector.py`` does so) and never on the items that judge it; too large a strength
reverses the preference (SS below 50) and costs language modelling, measured in
``docs/benchmarks/bias-vector.md``.

Only **build-half** items (:func:`~optipfair_train.bias.split_items`) may fit the vector; the held-out
half judges it. The unrelated option is never trained on.

Example:
    >>> build, held_out = split_items(load_stereoset("default"), seed=0)  # doctest: +SKIP
    >>> vector = fit_bias_vector(model, tokenizer, build[:1000])  # doctest: +SKIP
    >>> subtract_bias_vector(model, vector, strength=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..names import MAX_BIAS_VECTOR_STRENGTH
from .stereoset import item_sequences, padded_options, scored_log_probs
from .stereoset_data import StereoSetItem
from .tokens import pad_token_id

__all__ = ["check_bias_vector_settings", "fit_bias_vector", "subtract_bias_vector", "debias_with_bias_vector"]

logger = logging.getLogger(__name__)


def check_bias_vector_settings(
    model: nn.Module,
    strength: float,
    epochs: int = 2,
    learning_rate: float = 2e-5,
    batch_size: int = 16,
) -> None:
    """Refuse settings the bias vector cannot use, before anything is computed or changed.

    Raises:
        ValueError: a strength outside (0, MAX_BIAS_VECTOR_STRENGTH], epochs or batch size below 1, a learning rate that
            is not a positive finite number, or a model with PEFT adapters (merge them first: the vector is
            a change of the plain model's weights).

    Example:
        >>> check_bias_vector_settings(model, strength=0.5)  # doctest: +SKIP
    """
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0 < strength <= MAX_BIAS_VECTOR_STRENGTH
    ):
        raise ValueError(
            f"bias vector strength must be a number in (0, {MAX_BIAS_VECTOR_STRENGTH:g}], got {strength!r}"
        )
    for name, value in (("epochs", epochs), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bias vector {name} must be an integer >= 1, got {value!r}")
    if not isinstance(learning_rate, (int, float)) or not (
        learning_rate > 0 and math.isfinite(learning_rate)
    ):
        raise ValueError(f"bias vector learning rate must be a positive number, got {learning_rate!r}")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "the bias vector changes a plain model's weights; this model has PEFT adapters: merge them first "
            "(model = model.merge_and_unload())"
        )


def _parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Floating-point parameters by name, each tensor once (tied embeddings appear under one name)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


def _fine_tuned_change(
    model: nn.Module,
    sequences: list[tuple[list[int], int]],
    pad: int,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: tqdm,
) -> dict[str, torch.Tensor]:
    """The weight change of a copy of ``model`` fine-tuned (AdamW, no weight decay) on ``sequences``."""
    tuned = copy.deepcopy(model)
    tuned.eval()  # no dropout: the two fine-tunes differ only in their sentences
    for p in tuned.parameters():
        p.requires_grad_(p.is_floating_point())
    optimizer = torch.optim.AdamW(
        [p for p in tuned.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            input_ids, attention, scored = padded_options(batch, pad)
            sums = scored_log_probs(tuned, input_ids, attention, scored)  # on the model's device
            loss = -(sums / scored[:, 1:].sum(1).to(sums)).mean()  # mean token NLL per sentence, then items
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    before = _parameters(model)
    with torch.no_grad():
        change = {n: (p.detach() - before[n].detach()).float() for n, p in _parameters(tuned).items()}
    del tuned, optimizer
    return change


def fit_bias_vector(
    model: nn.Module,
    tokenizer,
    items: Sequence[StereoSetItem],
    epochs: int = 2,
    learning_rate: float = 2e-5,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The bias vector of ``model`` on StereoSet build ``items`` (the module docstring says how): float32
    tensors by parameter name. The model itself is not changed; two copies are trained in turn.

    Raises:
        ValueError: no items, or settings :func:`check_bias_vector_settings` refuses.

    Example:
        >>> vector = fit_bias_vector(model, tokenizer, build[:1000], epochs=2)  # doctest: +SKIP
        >>> sorted(vector)[0]  # doctest: +SKIP
        'model.embed_tokens.weight'
    """
    check_bias_vector_settings(model, 1.0, epochs, learning_rate, batch_size)
    if len(items) == 0:
        raise ValueError("the bias vector needs StereoSet build items; none were given")
    sequences = item_sequences(tokenizer, items)
    pad = pad_token_id(tokenizer)
    steps = epochs * math.ceil(len(items) / batch_size)
    with tqdm(total=2 * steps, desc="bias vector", disable=not show_progress) as progress:
        stereo = _fine_tuned_change(
            model, [s[0] for s in sequences], pad, epochs, learning_rate, batch_size, seed, progress
        )
        anti = _fine_tuned_change(
            model, [s[1] for s in sequences], pad, epochs, learning_rate, batch_size, seed, progress
        )
    vector = {name: stereo[name] - anti[name] for name in stereo}
    logger.info(
        "bias vector from %d items (%d steps per fine-tune): norm %.4f",
        len(items),
        steps,
        math.sqrt(sum(float(v.double().pow(2).sum()) for v in vector.values())),
    )
    return vector


def subtract_bias_vector(model: nn.Module, vector: dict[str, torch.Tensor], strength: float) -> None:
    """``theta <- theta - strength * vector`` in place, and the event appended to
    ``config.debias_history``.

    Raises:
        ValueError: a strength :func:`check_bias_vector_settings` refuses, or a vector whose names or shapes
            do not match the model's parameters (checked before any weight changes).

    Example:
        >>> subtract_bias_vector(model, vector, strength=0.5)  # doctest: +SKIP
    """
    check_bias_vector_settings(model, strength)
    params = _parameters(model)
    if set(vector) != set(params):
        missing, extra = sorted(set(params) - set(vector)), sorted(set(vector) - set(params))
        raise ValueError(
            f"the bias vector does not match this model's parameters (missing {missing[:3]}, unknown {extra[:3]})"
        )
    for name, p in params.items():
        if tuple(vector[name].shape) != tuple(p.shape):
            raise ValueError(
                f"the bias vector's {name} has shape {tuple(vector[name].shape)}, the model's {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.sub_(strength * vector[name].to(device=p.device, dtype=p.dtype))
    config = getattr(model, "config", None)
    if config is not None:
        history = list(getattr(config, "debias_history", None) or [])
        history.append({"method": "bias_vector", "strength": float(strength)})
        config.debias_history = history


def debias_with_bias_vector(
    model: nn.Module,
    tokenizer,
    items: Sequence[StereoSetItem],
    strength: float,
    epochs: int = 2,
    learning_rate: float = 2e-5,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = False,
) -> None:
    """Fit the bias vector on build ``items`` and subtract ``strength`` times it from ``model``'s weights
    (every setting checked before the fit starts).

    Example:
        >>> debias_with_bias_vector(model, tokenizer, build[:1000], strength=0.5)  # doctest: +SKIP
    """
    check_bias_vector_settings(model, strength, epochs, learning_rate, batch_size)
    vector = fit_bias_vector(model, tokenizer, items, epochs, learning_rate, batch_size, seed, show_progress)
    subtract_bias_vector(model, vector, strength)
