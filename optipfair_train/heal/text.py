"""Healing data: plain text cut into fixed-length language-modelling blocks.

Example:
    >>> dataset = text_dataset(tokenizer, texts, seq_len=256, num_sequences=64)  # doctest: +SKIP
    >>> dataset[0].keys()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset

from ..data import tokenize_for_lm

__all__ = ["text_dataset"]


def text_dataset(tokenizer, texts: Sequence[str], seq_len: int, num_sequences: int | None = None) -> Dataset:
    """A ``datasets.Dataset`` of ``input_ids`` / ``attention_mask`` / ``labels`` blocks of ``seq_len`` tokens."""
    ids = tokenize_for_lm(tokenizer, list(texts), seq_len=seq_len, num_sequences=num_sequences)
    rows = ids.tolist()
    return Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows], "labels": rows}
    )
