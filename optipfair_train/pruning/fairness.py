"""Fairness-aware neuron importance: find the MLP neurons that react to a demographic term.

For each prompt pair (two prompts that differ only in a demographic term) the MLP intermediate
activation (the input of ``down_proj``) is mean-pooled over each prompt's real tokens, which works
whatever the two prompts' token counts. A neuron's *bias gap* is the mean over pairs of
``|pooled_1 - pooled_2|``; it streams over any number of pairs with one vector per layer.

The ``fairness`` scorer keeps neurons by

    importance = (1 - w) * norm(quality) + w * (1 - norm(bias_gap))

with ``norm`` the rank of a neuron within its layer scaled to [0, 1], and ``w`` = ``fairness_weight``.
``quality`` is the ``hybrid`` score (the default data-driven one) when calibration data is given, else
MAW. So the neurons that carry bias and little else go first; with ``reconstruct=True`` the kept
``down_proj`` columns are refit afterwards exactly as for any other scorer.

Why ranks: OptiPFair's fairness mode divides by the maximum (MAW with ``w = 0.8``). Activation scores are
heavy-tailed, so after that division most neurons sit near 0 and even a small bias weight decides the
ranking. Measured on the demo model (20% of MLP neurons, WikiText-2 test perplexity, 31.98 unpruned,
48.2 with ``activation`` alone): max-normalised 61.7 at ``w = 0.05``, 123.9 at 0.2, 357.7 at 0.5;
rank-normalised 60.2 at 0.2 and 67.9 at 0.5 (those runs used ``activation`` as the quality term; it
follows ``hybrid`` since that became the default). Default ``w = 0.2``.

Example:
    >>> gaps = neuron_bias_gap(model, tokenizer, pairs)  # doctest: +SKIP
    >>> prune_model(model, neuron_selection_method="fairness", bias_pairs=pairs, tokenizer=tokenizer,
    ...             dataloader=batches, pruning_percentage=10)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..bias.capture import capture_activations, eval_mode, layer_key, model_device
from ..bias.tokens import encode_texts

__all__ = ["neuron_bias_gap", "combine_fairness"]


def neuron_bias_gap(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    layer_indices: Sequence[int] | None = None,
    show_progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Per layer, the mean over pairs of ``|pooled activation of prompt 1 - of prompt 2|`` per MLP neuron.

    Example:
        >>> neuron_bias_gap(model, tokenizer, [("The man is", "The woman is")])[0].shape  # doctest: +SKIP
    """
    if not pairs:
        raise ValueError("Fairness-aware importance needs prompt pairs (bias_pairs=...), got none.")
    adapter = get_adapter(model)
    layers = list(range(adapter.num_layers)) if layer_indices is None else list(layer_indices)
    keys = {layer_key("down_proj_input", i): i for i in layers}
    totals: dict[int, torch.Tensor] = {}
    current = {"pairs": 0}

    def reducer(key: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        n = current["pairs"]
        mask = mask.to(x.device, torch.float32)
        x = x.reshape(mask.shape[0], mask.shape[1], -1).float()  # OPT flattens [batch*seq, dim]
        pooled = torch.einsum("bs,bsd->bd", mask, x) / mask.sum(1, keepdim=True).clamp_min(1)
        gap = (pooled[:n] - pooled[n:]).abs().sum(0).double().cpu()
        layer = keys[key]
        totals[layer] = totals[layer] + gap if layer in totals else gap

    device = model_device(model)
    starts = range(0, len(pairs), batch_size)
    with eval_mode(model), capture_activations(model, list(keys), reducer):
        for start in tqdm(starts, desc="bias gap", disable=not show_progress):
            chunk = pairs[start : start + batch_size]
            current["pairs"] = len(chunk)
            batch = encode_texts(tokenizer, [p[0] for p in chunk] + [p[1] for p in chunk]).to(device)
            model(**batch.model_inputs(), use_cache=False)
    return {i: (v / len(pairs)).float() for i, v in totals.items()}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Rank within the layer, scaled to [0, 1] (0 = smallest)."""
    return x.argsort().argsort().float() / max(1, len(x) - 1)


def combine_fairness(quality: torch.Tensor, bias_gap: torch.Tensor, fairness_weight: float) -> torch.Tensor:
    """Keep-importance from a quality score and a bias gap (see the module docstring).

    Example:
        >>> combine_fairness(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]), 0.25)
        tensor([0.2500, 0.7500])
    """
    if not 0 <= fairness_weight <= 1:
        raise ValueError(f"fairness_weight must be between 0 and 1, got {fairness_weight!r}.")
    return (1 - fairness_weight) * _normalise(quality) + fairness_weight * (1 - _normalise(bias_gap))
