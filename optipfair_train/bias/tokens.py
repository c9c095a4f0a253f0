"""Tokenising prompt pairs and aligning the two sides of a pair.

Two prompts of a pair usually differ in one short span ("The white man ..." / "The Black man ..."),
and the two spans may tokenize to a different number of tokens. :func:`align_tokens` finds the
longest common token prefix and suffix; everything in between is the *differing span* of each side.
Activation metrics compare prefix and suffix positions one to one (position ``len - k`` of one side
with ``len - k`` of the other for the suffix), the differing spans position-wise when they have the
same length and by their mean when they do not.

Example:
    >>> a = align_tokens([5, 6, 7, 8, 9], [5, 6, 42, 43, 44, 8, 9])
    >>> a.prefix, a.suffix, a.span1, a.span2
    (2, 2, (2, 3), (2, 5))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TokenAlignment", "align_tokens", "EncodedBatch", "encode_texts", "pad_token_id"]


@dataclass(frozen=True)
class TokenAlignment:
    """Common prefix/suffix of two token sequences of lengths ``len1`` and ``len2``.

    Example:
        >>> TokenAlignment(len1=5, len2=7, prefix=2, suffix=2).span2
        (2, 5)
    """

    len1: int
    len2: int
    prefix: int
    suffix: int

    @property
    def span1(self) -> tuple[int, int]:
        """Half-open range of the differing tokens of the first sequence.

        Example:
            >>> align_tokens([1, 2, 3], [1, 4, 4, 3]).span1
            (1, 2)
        """
        return self.prefix, self.len1 - self.suffix

    @property
    def span2(self) -> tuple[int, int]:
        """Half-open range of the differing tokens of the second sequence.

        Example:
            >>> align_tokens([1, 2, 3], [1, 4, 4, 3]).span2
            (1, 3)
        """
        return self.prefix, self.len2 - self.suffix

    @property
    def equal_length(self) -> bool:
        """True when both sequences have the same number of tokens.

        Example:
            >>> align_tokens([1, 2], [1, 3]).equal_length
            True
        """
        return self.len1 == self.len2

    def pairs(self) -> list[tuple[int, int]]:
        """Position pairs compared one to one: prefix, equal-length span, suffix (in sequence order).

        Example:
            >>> align_tokens([1, 2, 3], [1, 9, 3]).pairs()
            [(0, 0), (1, 1), (2, 2)]
        """
        out = [(t, t) for t in range(self.prefix)]
        (s1, e1), (s2, e2) = self.span1, self.span2
        if e1 - s1 == e2 - s2:
            out += [(s1 + k, s2 + k) for k in range(e1 - s1)]
        out += [(self.len1 - k, self.len2 - k) for k in range(self.suffix, 0, -1)]
        return out

    @property
    def pooled_span(self) -> bool:
        """True when the spans differ in length and are both non-empty: they are compared by their mean.

        Example:
            >>> align_tokens([1, 2, 3], [1, 4, 4, 3]).pooled_span, align_tokens([1, 3], [1, 4, 3]).pooled_span
            (True, False)
        """
        (s1, e1), (s2, e2) = self.span1, self.span2
        return e1 - s1 != e2 - s2 and e1 > s1 and e2 > s2

    def as_dict(self) -> dict[str, int | bool]:
        """The alignment as a JSON-friendly dict.

        Example:
            >>> align_tokens([1, 2], [1, 3]).as_dict()["prefix"]
            1
        """
        return dict(
            len1=self.len1,
            len2=self.len2,
            prefix=self.prefix,
            suffix=self.suffix,
            equal_length=self.equal_length,
            pooled_span=self.pooled_span,
        )


def align_tokens(ids1: Sequence[int], ids2: Sequence[int]) -> TokenAlignment:
    """Longest common prefix and (non-overlapping) suffix of two token id sequences.

    Example:
        >>> align_tokens([1, 2, 3], [1, 2, 3]).suffix
        0
    """
    ids1, ids2 = list(ids1), list(ids2)
    n = min(len(ids1), len(ids2))
    prefix = 0
    while prefix < n and ids1[prefix] == ids2[prefix]:
        prefix += 1
    suffix = 0
    while suffix < n - prefix and ids1[-1 - suffix] == ids2[-1 - suffix]:
        suffix += 1
    return TokenAlignment(len(ids1), len(ids2), prefix, suffix)


@dataclass
class EncodedBatch:
    """Right-padded token ids of several texts (see :func:`encode_texts`).

    Example:
        >>> batch = EncodedBatch(torch.tensor([[5, 6], [7, 0]]), torch.tensor([[1, 1], [1, 0]]), [[5, 6], [7]])
        >>> batch.lengths
        [2, 1]
    """

    input_ids: torch.Tensor  # [B, S] long
    attention_mask: torch.Tensor  # [B, S] long
    token_ids: list[list[int]]

    @property
    def lengths(self) -> list[int]:
        """Number of real tokens of each text.

        Example:
            >>> EncodedBatch(torch.zeros(1, 3), torch.ones(1, 3), [[4, 5, 6]]).lengths
            [3]
        """
        return [len(t) for t in self.token_ids]

    def to(self, device: torch.device | str) -> EncodedBatch:
        """The batch with its tensors on ``device``.

        Example:
            >>> batch.to("cpu").input_ids.device.type  # doctest: +SKIP
            'cpu'
        """
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.token_ids)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a model's forward: ``input_ids`` and ``attention_mask``.

        Example:
            >>> model(**batch.model_inputs())  # doctest: +SKIP
        """
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0.

    Example:
        >>> pad_token_id(tokenizer)  # doctest: +SKIP
        0
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_texts(tokenizer, texts: Sequence[str], prefix_token_id: int | None = None) -> EncodedBatch:
    """Tokenize ``texts`` (with the tokenizer's own special tokens) and right-pad them.

    Right padding keeps the position ids of real tokens at 0..len-1 in a plain forward pass, so a
    padded batch gives the same activations as each text alone. ``prefix_token_id`` is prepended
    when given and not already the first token (used to score the first token of a sentence).

    Raises:
        ValueError: for an empty list or a text that tokenizes to no tokens.

    Example:
        >>> batch = encode_texts(tokenizer, ["a b", "a"])  # doctest: +SKIP
        >>> batch.attention_mask.tolist()  # doctest: +SKIP
        [[1, 1, 1], [1, 0, 0]]
    """
    if len(texts) == 0:
        raise ValueError("encode_texts needs at least one text")
    token_ids = []
    for text, ids in zip(texts, tokenizer(list(texts))["input_ids"], strict=True):
        ids = list(ids)
        if prefix_token_id is not None and (not ids or ids[0] != prefix_token_id):
            ids = [prefix_token_id] + ids
        if not ids:
            raise ValueError(f"text {text!r} tokenizes to no tokens")
        token_ids.append(ids)
    width = max(len(t) for t in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for i, ids in enumerate(token_ids):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return EncodedBatch(input_ids, mask, token_ids)
