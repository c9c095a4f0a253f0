"""Log-likelihoods of ``(context, continuation)`` requests, as lm-evaluation-harness 0.4.13 computes them.

How a request is encoded (the harness's ``loglikelihood`` requests of an HF causal model):

- the continuation is ``" " + choice`` (the target delimiter); trailing spaces of the context move to
  the start of the continuation;
- the model reads the encoded context followed by the tokens of ``context + continuation`` (encoded
  whole) after the context's length, so a token that straddles the boundary counts to the continuation
  (the tokenizer's default special tokens are kept, as the harness does without ``add_bos_token``; an
  empty context is the BOS token, else EOS);
- the score is the summed log-probability of the continuation tokens, each given everything before it
  (a sequence longer than the model's window is cut from the left).

How it is computed: the choices of one item share their first tokens (the question of ARC, HellaSwag
and PIQA; WinoGrande's sentence up to the blank), so by default that shared prefix is run once per item
and every choice continues from its cached keys and values (``share_prefix``), instead of reading the
whole sequence once per choice. Both ways give the same log-likelihoods up to float rounding
(``tests/test_zeroshot.py``); the time saved is in ``docs/benchmarks/zeroshot.md``. A model that takes
no KV cache (or a batch wider than its sliding window) is scored whole-sequence.

Example:
    >>> loglikelihoods(model, tokenizer, [("The sky is", " blue"), ("The sky is", " green")])  # doctest: +SKIP
    array([-2.1, -6.3])
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..bias.capture import eval_mode, model_device
from ..bias.tokens import pad_token_id

__all__ = ["encode_request", "loglikelihoods"]

Encoded = tuple[list[int], int]  # token ids of context + continuation, index of the first scored token


def encode_request(tokenizer, context: str, continuation: str) -> Encoded:
    """Token ids of ``context + continuation`` and the index of the first continuation token, split as
    the harness splits them (see the module docstring).

    Example:
        >>> ids, start = encode_request(tokenizer, "Question: 2+2?\\nAnswer:", " 4")  # doctest: +SKIP
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [int(prefix)] + list(tokenizer(continuation)["input_ids"]), 1
    # the context's own encoding, then what the whole string encodes to after it: a token merged across
    # the boundary counts to the continuation, and every choice of an item shares the same context tokens
    whole = list(tokenizer(context + continuation)["input_ids"])
    head = list(tokenizer(context)["input_ids"])
    return head + whole[len(head) :], len(head)


def _config_value(model: nn.Module, name: str) -> int | None:
    return getattr(getattr(model, "config", None), name, None)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _groups(requests: Sequence[tuple[str, str]], group_sizes: Sequence[int] | None) -> list[list[int]]:
    """Consecutive requests scored from one shared prefix: ``group_sizes`` of them, or by default the
    runs of requests with the same context."""
    if group_sizes is None:
        groups: list[list[int]] = []
        for i, (context, _) in enumerate(requests):
            if groups and requests[groups[-1][0]][0] == context:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    if any(int(s) <= 0 for s in group_sizes) or sum(group_sizes) != len(requests):
        raise ValueError(
            f"group_sizes must be positive and add up to the {len(requests)} requests, "
            f"got {list(group_sizes)}"
        )
    bounds = np.cumsum([0, *group_sizes])
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _shared_length(seqs: Sequence[Encoded]) -> int:
    """Tokens a group can read once: its common token prefix, stopping one token before the first scored
    token (so every scored logit comes from the per-choice pass)."""
    first = seqs[0][0]
    limit = min(start for _, start in seqs) - 1
    n = 0
    while n < limit and all(ids[n] == first[n] for ids, _ in seqs):
        n += 1
    return n


def _sum_scored(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> np.ndarray:
    """Per row, the summed log-probability of ``targets`` at the ``scored`` positions (float64)."""
    where = scored.to(logits.device)
    picked = logits[where].float()
    lp = picked.gather(-1, targets.to(logits.device)[where][:, None]).squeeze(-1) - torch.logsumexp(
        picked, -1
    )
    rows = where.nonzero()[:, 0]
    sums = torch.zeros(len(scored), dtype=torch.float64, device=logits.device).index_add_(
        0, rows, lp.double()
    )
    return sums.cpu().numpy()


def _right_padded(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


def _whole(model: nn.Module, seqs: Sequence[Encoded], pad: int) -> np.ndarray:
    """Each sequence read whole (one right-padded forward pass); logit t predicts token t + 1."""
    inputs, attention = _right_padded([ids[:-1] for ids, _ in seqs], pad)
    targets, _ = _right_padded([ids[1:] for ids, _ in seqs], pad)
    scored = torch.zeros_like(inputs, dtype=torch.bool)
    for r, (ids, start) in enumerate(seqs):
        scored[r, start - 1 : len(ids) - 1] = True
    device = model_device(model)
    logits = model(input_ids=inputs.to(device), attention_mask=attention.to(device), use_cache=False).logits
    return _sum_scored(logits, targets, scored)


def _cache_argument(model: nn.Module) -> str | None:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers, ``past_key_values``
    before (and in remote-code models)."""
    return next((name for name in ("cache", "past_key_values") if _accepts(model, name)), None)


def _shared(
    model: nn.Module,
    seqs: Sequence[Encoded],
    groups: Sequence[tuple[list[int], int]],
    pad: int,
    batch_size: int,
) -> np.ndarray | None:
    """Every group's shared prefix in one forward pass, then the requests' remaining tokens from the
    cached keys and values of their group, in batches of similar length (results in the order of the
    groups' members).

    The prefixes are right-padded, so a request's tokens sit after its padded prefix: the attention mask
    hides the padding and ``position_ids`` carry the true positions, which is exact while the batch fits
    in the model's attention window (checked by the caller). None when the model's cache cannot be
    copied per request (a legacy tuple cache)."""
    device = model_device(model)
    prefix, prefix_mask = _right_padded([seqs[g[0]][0][:n] for g, n in groups], pad)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}  # the prefix's logits go unused
    argument = _cache_argument(model)
    out = model(input_ids=prefix.to(device), attention_mask=prefix_mask.to(device), use_cache=True, **keep)
    cache = getattr(out, argument, None) or getattr(out, "past_key_values", None)
    if not hasattr(cache, "reorder_cache"):
        return None
    rows = [(k, seqs[i], n) for k, (g, n) in enumerate(groups) for i in g]  # (group, request, shared)
    lls = np.zeros(len(rows))
    parts = _batches([len(ids) - n for _, (ids, _), n in rows], batch_size)
    for j, part in enumerate(parts):
        owner = torch.tensor([rows[r][0] for r in part], dtype=torch.long)
        past = cache if j == len(parts) - 1 else copy.deepcopy(cache)
        past.reorder_cache(owner.to(device))  # one copy of its group's prefix per request
        members = [rows[r][1:] for r in part]
        inputs, mask = _right_padded([ids[n:-1] for (ids, _), n in members], pad)
        targets, _ = _right_padded([ids[n + 1 :] for (ids, _), n in members], pad)
        scored = torch.zeros_like(inputs, dtype=torch.bool)
        for r, ((ids, start), n) in enumerate(members):
            scored[r, start - 1 - n : len(ids) - 1 - n] = True
        positions = torch.tensor([n for _, n in members])[:, None] + torch.arange(inputs.shape[1])[None, :]
        logits = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([prefix_mask[owner], mask], 1).to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **{argument: past},
        ).logits
        lls[part] = _sum_scored(logits, targets, scored)
    return lls


# a batch ends before a sequence shorter than this share of its longest one, so no row is mostly padding
_MIN_FILL = 0.7


def _batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted longest first, at most ``budget`` per batch, each batch's shortest at least
    ``_MIN_FILL`` of its longest.

    Example:
        >>> _batches([10, 4, 9, 3], 3)
        [[0, 2], [1, 3]]
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not batches or len(batches[-1]) == budget or lengths[i] < _MIN_FILL * lengths[batches[-1][0]]:
            batches.append([])
        batches[-1].append(i)
    return batches


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    show_progress: bool = False,
    desc: str = "zero-shot",
    group_sizes: Sequence[int] | None = None,
    share_prefix: bool = True,
) -> np.ndarray:
    """Summed log-probability of each request's continuation given its context (float64 array).

    Requests come in groups of consecutive requests that share their first tokens (the choices of one
    item): ``group_sizes`` gives their sizes, by default the runs of requests with the same context.
    With ``share_prefix`` a group's shared tokens are read once and each request continues from the
    cache (see the module docstring); ``share_prefix=False`` reads every sequence whole. At most
    ``batch_size`` sequences share one right-padded forward pass, longest first, and a batch ends before
    a sequence shorter than 70% of its longest, so batches pad little.
    Only the continuation positions' log-softmax is computed (in float32).

    Raises:
        ValueError: for a continuation that encodes to no token, or group sizes that do not cover the
            requests.

    Example:
        >>> loglikelihoods(model, tokenizer, [("The sky is", " blue"), ("The sky is", " green")])  # doctest: +SKIP
        array([-2.1, -6.3])
    """
    seqs = [encode_request(tokenizer, c, x) for c, x in requests]
    for (ids, start), request in zip(seqs, requests, strict=True):
        if len(ids) <= start:
            raise ValueError(f"the continuation {request[1]!r} encodes to no token")
    groups = _groups(requests, group_sizes)
    window = _config_value(model, "max_position_embeddings")
    if window:  # cut from the left, keeping the scored tokens and what fits before them
        seqs = [(ids[-(window + 1) :], max(1, start - max(0, len(ids) - window - 1))) for ids, start in seqs]
    share = share_prefix and _cache_argument(model) is not None and _accepts(model, "position_ids")
    sliding = _config_value(model, "sliding_window") or None
    shared, whole = [], []
    for group in groups:
        n = _shared_length([seqs[i] for i in group]) if share and len(group) > 1 else 0
        if n:
            shared.append((group, n))
        else:
            whole += group
    out = np.zeros(len(seqs))
    work = [("whole", [whole[k] for k in b]) for b in _batches([len(seqs[i][0]) for i in whole], batch_size)]
    work += [("shared", b) for b in _batches([n for _, n in shared], batch_size)]  # by shared length
    pad = pad_token_id(tokenizer)
    with eval_mode(model):
        for kind, batch in tqdm(work, desc=desc, disable=not show_progress):
            if kind == "shared":
                part = [shared[k] for k in batch]
                batch = [i for g, _ in part for i in g]
                width = max(n for _, n in part) + max(len(seqs[i][0]) - n for g, n in part for i in g)
                if share and (sliding is None or width <= sliding):  # else read whole
                    lls = _shared(model, seqs, part, pad, batch_size)
                    if lls is not None:
                        out[batch] = lls
                        continue
                    share = False  # a cache that cannot be copied per request: read the rest whole
            for sub in _batches([len(seqs[i][0]) for i in batch], batch_size):
                rows = [batch[k] for k in sub]
                out[rows] = _whole(model, [seqs[i] for i in rows], pad)
    return out
