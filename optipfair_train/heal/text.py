"""Healing data: plain text cut into fixed-length language-modelling blocks.

Example:
    >>> dataset = text_dataset(tokenizer, texts, seq_len=256, num_sequences=64)  # doctest: +SKIP
    >>> dataset[0].keys()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from ..data import tokenize_for_lm

__all__ = ["lm_dataset", "text_dataset"]


def lm_dataset(blocks: torch.Tensor) -> Dataset:
    """A ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` / ``labels`` rows from ``[N, S]`` token blocks.

    Example:
        >>> lm_dataset(torch.tensor([[5, 6, 7]]))[0]["labels"]
        [5, 6, 7]
    """
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"Expected [N, S] token blocks, got shape {tuple(blocks.shape)}.")
    rows = blocks.long().tolist()
    seq_len = blocks.shape[1]
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows], "labels": rows}
    )


def text_dataset(tokenizer, texts: Sequence[str], seq_len: int, num_sequences: int | None = None) -> Dataset:
    """A ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` / ``labels`` blocks of ``seq_len`` tokens."""
    return lm_dataset(tokenize_for_lm(tokenizer, list(texts), seq_len=seq_len, num_sequences=num_sequences))
