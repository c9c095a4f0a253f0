"""The teacher's top-k logits, computed once per healing block and kept on disk for distillation.

Online distillation runs the teacher forward at every step (a KD step cost 1.9x a LoRA step on the demo
model). The teacher's output on a fixed healing set never changes, so :func:`build_teacher_cache`
computes it once: for every block, the ``k`` largest logits (float16 values, int32 vocabulary indices)
of every position. Rounds, resumed runs and later Trainers reuse the file.

Storage: ``k * (2 + 4)`` bytes per token for values and indices, 4 bytes for the teacher's full
log-normaliser ``logsumexp(z / T)`` (it gives the probability mass outside the top-k, the distillation
loss's tail bucket) and 4 bytes for the block's own token ids (kept to check every lookup): 392 bytes per
token at k=64, 6 MB for 15,360 healing tokens.

The values are the raw (untempered) logits; the log-normaliser belongs to one temperature, so the
temperature is part of the key. The key hashes the teacher's identity (a fingerprint of its weights and
config), the token ids, ``k`` and the temperature; a file built for anything else has another name, and :meth:`TeacherCache.lookup` also compares the batch's tokens with the cached
ones, so a cache can never silently give another text's targets.

Example:
    >>> dataset = add_example_ids(text_dataset(tokenizer, texts, seq_len=128, num_sequences=120))
    >>> cache = build_teacher_cache(teacher, dataset, "outputs/demo/teacher-cache", k=64)  # doctest: +SKIP
    >>> cache.bytes_per_token
    392
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

__all__ = [
    "EXAMPLE_ID",
    "TeacherCache",
    "TeacherCacheMismatch",
    "add_example_ids",
    "build_teacher_cache",
    "save_teacher_cache",
    "teacher_fingerprint",
]

logger = logging.getLogger(__name__)

EXAMPLE_ID = "example_id"  # the dataset column that names a row of the cache
_FORMAT = 2  # 2: with the log-normaliser (tail bucket) and the temperature


class TeacherCacheMismatch(ValueError):
    """A cache was asked for targets of tokens, a teacher or a ``k`` it was not built for."""


def add_example_ids(dataset):
    """``dataset`` with an ``example_id`` column 0..N-1 (the row of the cache that holds its targets).

    The id travels with the example through shuffling and gradient accumulation; the default collator
    stacks it into a ``[B]`` tensor. The Trainer would drop the column (not a ``forward`` argument) when
    ``remove_unused_columns`` is on, so :class:`~optipfair_train.heal.DistillationTrainer` declares it.

    Example:
        >>> add_example_ids(Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]}))["example_id"]
        [0, 1]
    """
    if EXAMPLE_ID in dataset.column_names:
        dataset = dataset.remove_columns(EXAMPLE_ID)
    return dataset.add_column(EXAMPLE_ID, list(range(len(dataset))))


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A short hash of the teacher's config and weights (a strided sample of every tensor, so it is cheap).

    Example:
        >>> teacher_fingerprint(model) == teacher_fingerprint(copy.deepcopy(model))  # doctest: +SKIP
        True
    """
    digest = hashlib.sha256()
    config = getattr(teacher, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in sorted(teacher.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _token_rows(dataset) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        rows = dataset
    else:
        if EXAMPLE_ID in dataset.column_names and dataset[EXAMPLE_ID] != list(range(len(dataset))):
            raise ValueError(
                f"The dataset's {EXAMPLE_ID!r} column must be 0..N-1 in row order (add_example_ids)."
            )
        rows = torch.tensor(dataset["input_ids"])
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError(f"Expected [N, S] token blocks, got shape {tuple(rows.shape)}.")
    return rows.to(torch.int32)


def _key(fingerprint: str, tokens: torch.Tensor, k: int, value_dtype: torch.dtype, temperature: float) -> str:
    header = f"v{_FORMAT}|{fingerprint}|k={k}|T={float(temperature)!r}|{value_dtype}|{tuple(tokens.shape)}|"
    digest = hashlib.sha256(header.encode())
    digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()[:24]


class TeacherCache:
    """The teacher's top-k logits of every block: ``values`` [N, S, k] float16, ``indices`` [N, S, k] int32,
    ``log_normaliser`` [N, S] float32 (``logsumexp`` of all logits at the cache's ``temperature``).

    Example:
        >>> cache = TeacherCache.load("outputs/demo/teacher-cache/topk-3f2a....safetensors")  # doctest: +SKIP
        >>> values, indices, log_normaliser = cache.lookup(batch["example_id"], batch["input_ids"])  # doctest: +SKIP
    """

    def __init__(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        log_normaliser: torch.Tensor,
        tokens: torch.Tensor,
        meta: dict,
    ):
        self.values, self.indices, self.log_normaliser = values, indices, log_normaliser
        self.tokens, self.meta = tokens, meta

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes on disk and in memory per cached token (values, indices and the token id)."""
        per_logit = self.values.element_size() + self.indices.element_size()
        return self.k * per_logit + self.log_normaliser.element_size() + self.tokens.element_size()

    @classmethod
    def load(cls, path: str | os.PathLike) -> TeacherCache:
        """Read a cache file written by :func:`build_teacher_cache`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No teacher cache at {path}; build it with build_teacher_cache.")
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format") != _FORMAT:
            raise TeacherCacheMismatch(f"{path} has cache format {meta.get('format')}, expected {_FORMAT}.")
        return cls(tensors["values"], tensors["indices"], tensors["log_normaliser"], tensors["tokens"], meta)

    def check(
        self, fingerprint: str | None = None, k: int | None = None, temperature: float | None = None
    ) -> None:
        """Raise :class:`TeacherCacheMismatch` if the cache was built for another teacher, ``k`` or temperature."""
        if temperature is not None and float(temperature) != self.temperature:
            raise TeacherCacheMismatch(
                f"The teacher cache was built for temperature {self.temperature}, not {temperature}; its "
                "log-normaliser belongs to one temperature: rebuild it with build_teacher_cache."
            )
        if fingerprint is not None and fingerprint != self.meta["teacher"]:
            raise TeacherCacheMismatch(
                f"The teacher cache was built for teacher {self.meta['teacher']}, not {fingerprint}; "
                "rebuild it with build_teacher_cache for this teacher."
            )
        if k is not None and k != self.k:
            raise TeacherCacheMismatch(f"The teacher cache holds top-{self.k} logits, not top-{k}.")

    def lookup(
        self, example_ids: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached ``(values, indices, log_normaliser)`` of the examples ``example_ids``, checked against
        ``input_ids``.

        Raises:
            TeacherCacheMismatch: an id outside the cache, or tokens that differ from the cached block.
        """
        ids = example_ids.detach().reshape(-1).long().cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.tokens.shape[0]):
            raise TeacherCacheMismatch(
                f"example_id {ids.tolist()} outside the cache's {self.tokens.shape[0]} blocks."
            )
        cached = self.tokens[ids]
        given = input_ids.detach().cpu().to(torch.int32)
        if cached.shape != given.shape or not torch.equal(cached, given):
            raise TeacherCacheMismatch(
                f"The tokens of examples {ids.tolist()[:8]} differ from the ones the teacher cache was built "
                f"on (cached blocks of {self.tokens.shape[1]} tokens, batch {tuple(given.shape)}); the "
                "healing data changed: rebuild the cache."
            )
        return self.values[ids], self.indices[ids], self.log_normaliser[ids]


def build_teacher_cache(
    teacher: torch.nn.Module,
    dataset,
    cache_dir: str | os.PathLike,
    k: int = 64,
    batch_size: int = 4,
    show_progress: bool = True,
    value_dtype: torch.dtype = torch.float16,
    temperature: float = 2.0,
) -> TeacherCache:
    """Load the cache of ``teacher`` on ``dataset`` from ``cache_dir``, or compute and save it first.

    Args:
        teacher: the unpruned model (run under ``inference_mode`` in eval mode; its mode is restored).
        dataset: a ``datasets.Dataset`` with ``input_ids`` blocks (row i = ``example_id`` i), or an
            ``[N, S]`` tensor of token ids.
        cache_dir: folder of cache files; the file name is a hash of the teacher, the tokens and ``k``.
        k: logits kept per position (1 <= k <= vocabulary size).
        batch_size: blocks per teacher forward pass while building.
        show_progress: tqdm bar while building.
        value_dtype: dtype of the stored logits (float16: 2 bytes, about 3 significant digits; float32
            for exact targets).
        temperature: the distillation temperature the log-normaliser is computed at.

    Example:
        >>> cache = build_teacher_cache(teacher, dataset, "cache", k=64)  # doctest: +SKIP
        >>> cache.values.shape  # doctest: +SKIP
        torch.Size([120, 128, 64])
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    tokens = _token_rows(dataset)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise ValueError(f"k={k} is larger than the teacher's vocabulary of {vocab} tokens.")
    fingerprint = teacher_fingerprint(teacher)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    key = _key(fingerprint, tokens, k, value_dtype, temperature)
    path = Path(cache_dir) / f"topk-{key}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        cache = TeacherCache.load(path)
        if cache.meta.get("key") == key and torch.equal(cache.tokens, tokens):
            logger.info("Reusing the teacher cache %s", path)
            return cache
        logger.warning("The teacher cache %s does not match its name; rebuilding it.", path)
    values, indices, lse = _teacher_topk(
        teacher, tokens, k, batch_size, show_progress, value_dtype, temperature
    )
    return save_teacher_cache(fingerprint, tokens, values, indices, lse, temperature, cache_dir)


def save_teacher_cache(
    fingerprint: str,
    tokens: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    log_normaliser: torch.Tensor,
    temperature: float,
    cache_dir: str | os.PathLike,
) -> TeacherCache:
    """Save top-k ``values``/``indices`` ``[N, S, k]`` and the full ``log_normaliser`` ``[N, S]`` (at
    ``temperature``) of the teacher ``fingerprint`` on ``tokens`` ``[N, S]`` under the name
    :func:`build_teacher_cache` looks for (so it reuses the file instead of a teacher pass).

    Example:
        >>> save_teacher_cache(teacher_fingerprint(teacher), tokens, values, indices, lse, 2.0, "cache")  # doctest: +SKIP
    """
    tokens = _token_rows(tokens)
    shapes_ok = tuple(values.shape[:2]) == tuple(tokens.shape) == tuple(log_normaliser.shape)
    if values.shape != indices.shape or not shapes_ok:
        raise ValueError(
            f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, S, k] and "
            f"log_normaliser {tuple(log_normaliser.shape)} [N, S] for tokens {tuple(tokens.shape)}."
        )
    k = values.shape[-1]
    key = _key(fingerprint, tokens, k, values.dtype, temperature)
    path = Path(cache_dir) / f"topk-{key}.safetensors"
    meta = {
        "format": _FORMAT, "key": key, "teacher": fingerprint, "k": k, "temperature": float(temperature),
        "shape": list(tokens.shape),
    }  # fmt: skip
    log_normaliser = log_normaliser.float()
    path.parent.mkdir(parents=True, exist_ok=True)
    # write under temporary names and rename: a crash never leaves a half-written cache under the key
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {"values": values, "indices": indices.to(torch.int32), "log_normaliser": log_normaliser}
    save_file({**tensors, "tokens": tokens}, str(tmp))
    path.with_suffix(".json.tmp").write_text(json.dumps(meta))
    path.with_suffix(".json.tmp").replace(path.with_suffix(".json"))
    tmp.replace(path)
    cache = TeacherCache(values, indices.to(torch.int32), log_normaliser, tokens, meta)
    logger.info(
        "Teacher cache %s: %d blocks x %d tokens, top-%d, %d bytes per token (%.1f MB)",
        path, tokens.shape[0], tokens.shape[1], k, cache.bytes_per_token,
        cache.bytes_per_token * tokens.numel() / 1e6,
    )  # fmt: skip
    return cache


def _teacher_topk(
    teacher: torch.nn.Module,
    tokens: torch.Tensor,
    k: int,
    batch_size: int,
    show_progress: bool,
    value_dtype: torch.dtype,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    normalisers: list[torch.Tensor] = []
    starts: Sequence[int] = range(0, tokens.shape[0], batch_size)
    try:
        with torch.inference_mode():
            for start in tqdm(starts, desc="teacher top-k", unit="batch", disable=not show_progress):
                batch = tokens[start : start + batch_size].long().to(device)
                logits = teacher(
                    input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False
                ).logits
                top = logits.float().topk(k, dim=-1)
                values.append(top.values.to(value_dtype).cpu())
                indices.append(top.indices.to(torch.int32).cpu())
                normalisers.append(torch.logsumexp(logits.float() / temperature, dim=-1).cpu())
    finally:
        teacher.train(was_training)
    return torch.cat(values), torch.cat(indices), torch.cat(normalisers)
