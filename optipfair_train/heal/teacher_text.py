"""Healing text written by the teacher itself, with its top-k logits kept from the sampling.

Why: text a project can always ship (the demo's standard-library help pages) is narrow. Healing on it
wins back that domain and little else (demo: WikiText-2 ratio 1.40 after healing on it). Text sampled
from the unpruned model is its own distribution, as general as the model is, available offline for any
model, and the logits that chose every sampled token are exactly the distillation targets, so a
distillation run on it needs no separate teacher pass.

Sampling: each block starts with one token drawn uniformly from the non-special vocabulary (so blocks
do not all start alike), then ``seq_len - 1`` tokens drawn from the teacher's full distribution at
temperature 1 (no top-k/top-p truncation, so the text follows the distribution being distilled). The
logits of every position (the last one included, one extra step) are kept as top-k values/indices.

The blocks and their top-k logits are saved as a :class:`~optipfair_train.heal.teacher_cache.TeacherCache`
under the same key a teacher pass over those tokens would get, so ``build_teacher_cache`` finds and
reuses it; the sampled token blocks have their own file keyed by the teacher, sizes and seed, so a
resumed run or a later round reads the same text instead of sampling again.

Example:
    >>> blocks = sample_teacher_text(teacher, "outputs/demo/teacher-text", 240, 128, k=64)  # doctest: +SKIP
    >>> blocks.shape  # doctest: +SKIP
    torch.Size([240, 128])
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..evaluation import new_kv_cache
from .teacher_cache import save_teacher_cache, teacher_fingerprint

__all__ = ["sample_teacher_text"]

logger = logging.getLogger(__name__)


def _first_tokens(vocab: int, special: set[int], count: int, generator: torch.Generator) -> torch.Tensor:
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    return allowed[torch.randint(0, len(allowed), (count,), generator=generator)]


@torch.inference_mode()
def _sample_batch(
    teacher: torch.nn.Module,
    first: torch.Tensor,
    seq_len: int,
    k: int,
    generator: torch.Generator,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, seq_len]`` tokens, the top-k of the logits at each of their positions and the log-normaliser
    of those logits at the distillation ``temperature``."""
    device = next(teacher.parameters()).device
    cache_arg, cache = new_kv_cache(teacher)
    tokens = [first.to(device).unsqueeze(1)]
    values, indices, normalisers = [], [], []
    for position in range(seq_len):
        logits = teacher(input_ids=tokens[-1], use_cache=True, **{cache_arg: cache}).logits[:, -1].float()
        top = logits.topk(k, dim=-1)
        values.append(top.values.half().cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        normalisers.append(torch.logsumexp(logits / temperature, dim=-1).cpu())
        if position + 1 < seq_len:  # the last position's logits are a target, its sample is not needed
            probs = torch.softmax(logits, dim=-1).cpu()
            tokens.append(torch.multinomial(probs, 1, generator=generator).to(device))
    ids = torch.cat(tokens, dim=1).cpu().to(torch.int32)
    return ids, torch.stack(values, 1), torch.stack(indices, 1), torch.stack(normalisers, 1)


def sample_teacher_text(
    teacher: torch.nn.Module,
    cache_dir: str | os.PathLike,
    num_sequences: int,
    seq_len: int,
    *,
    k: int = 64,
    temperature: float = 2.0,
    special_ids: set[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> torch.Tensor:
    """``[num_sequences, seq_len]`` token blocks sampled from ``teacher`` (read from ``cache_dir`` when an
    earlier call sampled them), with the teacher's top-``k`` logits saved beside them as the teacher cache.

    Args:
        teacher: the unpruned model (eval mode while sampling; its mode is restored).
        cache_dir: folder for the blocks and the top-k logits (``output_dir/teacher-cache`` in the pipeline).
        num_sequences, seq_len: how many blocks, of how many tokens (seq_len >= 2).
        k: logits kept per position (the distillation cache's ``k``).
        temperature: the distillation temperature of the cache's log-normaliser (sampling is always at 1).
        special_ids: token ids a block never starts with (the tokenizer's ``all_special_ids``).
        seed: the sampling seed (same seed, teacher and sizes: same text).
        batch_size: blocks sampled together (one decode step costs little more for 64 blocks than for 16
            on a CPU, where per-step overhead dominates).

    Example:
        >>> ids = sample_teacher_text(model, "cache", 8, 32, k=16, special_ids=set(tok.all_special_ids))  # doctest: +SKIP
    """
    if num_sequences < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(
            f"num_sequences and batch_size must be >= 1 and seq_len >= 2, got {num_sequences}, {batch_size}, "
            f"{seq_len}."
        )
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the teacher's vocabulary size {vocab}, got {k}.")
    fingerprint = teacher_fingerprint(teacher)
    special = sorted(special_ids or ())
    # the text does not depend on k or the distillation temperature (one text, several caches); it does
    # depend on batch_size, which orders the draws of the random generator
    settings = f"{fingerprint}|{num_sequences}|{seq_len}|{seed}|{special}|batch={batch_size}"
    key = hashlib.sha256(settings.encode()).hexdigest()
    path = Path(cache_dir) / f"text-{key[:24]}.safetensors"
    if path.is_file():
        logger.info("Reusing the teacher-written text %s", path)
        return load_file(str(path))["tokens"]
    # (a text reused with another k or temperature gets its cache from build_teacher_cache's own pass)
    generator = torch.Generator().manual_seed(seed)
    first = _first_tokens(vocab, set(special), num_sequences, generator)
    was_training = teacher.training
    teacher.eval()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        starts = range(0, num_sequences, batch_size)
        for start in tqdm(
            starts,
            desc=f"teacher writes {num_sequences} x {seq_len} tokens",
            unit="batch",
            disable=not show_progress,
        ):
            batch = first[start : start + batch_size]
            parts.append(_sample_batch(teacher, batch, seq_len, k, generator, temperature))
    finally:
        teacher.train(was_training)
    tokens, values, indices, normalisers = (torch.cat(column) for column in zip(*parts, strict=True))
    save_teacher_cache(fingerprint, tokens, values, indices, normalisers, temperature, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed when whole: never half a file
    save_file({"tokens": tokens}, str(tmp))
    tmp.replace(path)
    logger.info("The teacher wrote %d healing blocks of %d tokens (%s)", num_sequences, seq_len, path)
    return tokens
