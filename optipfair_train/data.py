"""Text sources and token batches for calibration, healing and perplexity.

Sources accepted by :func:`load_texts`:

- ``"demo"``: English help texts of the Python standard library (``pydoc_data.topics``, PSF licence),
  present on every machine; ``split="calibration"`` and ``split="evaluation"`` never share text.
- a local ``.txt`` file: paragraphs separated by blank lines; WikiText headings (`` = Title = ``) dropped.
- a local ``.jsonl`` / ``.json`` file: the ``text`` field of each record (see ``text_field``).
- a local ``.csv`` file: the ``text`` column (see ``text_field``).
- a ``datasets`` hub name, ``"name"`` or ``"name:config"`` (e.g. ``"wikitext:wikitext-2-raw-v1"``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_SPLITS = ("calibration", "evaluation")
HUB_SPLITS = {"calibration": "train", "evaluation": "test"}  # role names -> dataset splits for hub sources
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
ACCEPTED_SOURCES = (
    "'demo', a local .txt/.jsonl/.json/.csv file, or a datasets hub name such as 'wikitext:wikitext-2-raw-v1'"
)
_DEMO_EVAL_BUCKETS = 5  # one demo topic in five (by a stable hash of its name) is evaluation text
_DEMO_MIN_WORDS = 8
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_WIKITEXT_HEADING = re.compile(r"\s*(=+)\s.*\s\1\s*")
_RST_UNDERLINE = re.compile(r"[*=\-~^\"']{3,}")


class DataSourceError(ValueError):
    """A text source could not be read, or gave no text."""


def _demo_topic_is_evaluation(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % _DEMO_EVAL_BUCKETS == 0


def _demo_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one help topic: no headings, code, doctests or grammar rules; lines joined."""
    paragraphs = []
    for block in _BLANK_LINES.split(text):
        lines = textwrap.dedent(block).strip("\n").split("\n")
        if len(lines) > 1 and _RST_UNDERLINE.fullmatch(lines[1].strip()):
            continue  # a heading
        if any(line.lstrip().startswith((">>>", "...")) or "::=" in line for line in lines):
            continue  # a doctest or a grammar rule
        if not lines[0].startswith(("* ", "- ")) and any(line[:1].isspace() for line in lines[1:]):
            continue  # indented lines below an unindented one: code
        paragraph = " ".join(" ".join(lines).split())
        if len(paragraph.split()) >= _DEMO_MIN_WORDS and paragraph.endswith((".", ":", ")", '"', "?", "!")):
            paragraphs.append(paragraph)
    return paragraphs


def _demo_texts(split: str | None) -> list[str]:
    from pydoc_data.topics import topics

    if split not in (None, *DEMO_SPLITS):
        raise ValueError(
            f"Unknown split {split!r} for the demo source; accepted: None (all), 'calibration' or 'evaluation'."
        )
    parts: dict[str, list[str]] = {"calibration": [], "evaluation": []}
    for name in sorted(topics):
        part = "evaluation" if _demo_topic_is_evaluation(name) else "calibration"
        parts[part].extend(_demo_paragraphs(topics[name]))
    evaluation = list(dict.fromkeys(parts["evaluation"]))
    held_out = set(evaluation)
    calibration = [p for p in dict.fromkeys(parts["calibration"]) if p not in held_out]
    if split == "calibration":
        return calibration
    if split == "evaluation":
        return evaluation
    return calibration + evaluation


def _txt_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines; WikiText heading lines (`` = Title = ``) are dropped."""
    paragraphs = []
    for block in _BLANK_LINES.split(text):
        lines = [line.strip() for line in block.split("\n")]
        lines = [line for line in lines if line and not _WIKITEXT_HEADING.fullmatch(line)]
        if lines:
            paragraphs.append("\n".join(lines))
    return paragraphs


def _field(record: object, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataSourceError(
            f"{where}: expected an object with a {text_field!r} field, got {type(record).__name__}."
        )
    if text_field not in record:
        raise DataSourceError(
            f"{where}: no field {text_field!r} (fields: {sorted(record)}); pass text_field=... to pick one."
        )
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataSourceError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string.")
    return value


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); other bytes are an error naming the
    file, the line and the byte.

    Example:
        >>> read_utf8(Path("pairs.csv")).splitlines()[0]  # doctest: +SKIP
        'sent_more,sent_less,stereo_antistereo,bias_type'
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataSourceError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8."
        ) from None


def read_json_records(path: Path) -> list[object]:
    """The records of a ``.jsonl`` file (one JSON value per line) or a ``.json`` file, in file order.

    A ``.json`` file holds a list of records, or an object of columns (``{"text": [...], ...}``), which
    is turned into one record per row.

    Example:
        >>> read_json_records(Path("pairs.jsonl"))[0]  # doctest: +SKIP
        {'prompt': 'Capital of France?', 'completion': 'Paris.'}
    """
    text = read_utf8(path)
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}, line {number}: not valid JSON ({err}).") from err
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path}: not valid JSON ({err}).") from err
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        if len({len(v) for v in data.values()}) > 1:
            raise DataSourceError(f"{path}: the columns {list(data)} have different lengths.")
        data = [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise DataSourceError(
            f"{path}: expected a list of records (or of strings), or an object of columns; "
            f"got {type(data).__name__}."
        )
    return data


def _file_texts(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_paragraphs(read_utf8(path))
    if suffix in (".jsonl", ".json"):
        return [
            _field(record, text_field, f"{path}, record {i}")
            for i, record in enumerate(read_json_records(path), start=1)
        ]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DataSourceError(
                f"{path}: no column {text_field!r} (columns: {reader.fieldnames}); pass text_field=... to pick one."
            )
        return [row[text_field] or "" for row in reader]
    raise DataSourceError(f"{path}: unsupported file type {suffix!r}; accepted: {', '.join(FILE_SUFFIXES)}.")


def load_hub_dataset(source: str, split: str | None = None):
    """A ``datasets.Dataset`` from a hub name ``"name"`` or ``"name:config"`` (``split`` as in
    :func:`load_texts`), with a clear error when the Hub cannot be reached.

    Example:
        >>> load_hub_dataset("wikitext:wikitext-2-raw-v1", split="evaluation")  # doctest: +SKIP
    """
    import datasets
    from huggingface_hub import constants

    from optipfair_train.models import hub_reachable

    name, _, config = source.partition(":")
    split = HUB_SPLITS.get(split or "calibration", split)
    where = f"the datasets hub source {source!r} (split {split!r})"
    offline_hint = "Offline, use 'demo' or a local .txt/.jsonl/.json/.csv file instead."
    if not constants.is_offline_mode() and not hub_reachable():
        raise DataSourceError(
            f"Cannot load {where}: the Hugging Face Hub is not reachable. {offline_hint} If the dataset is "
            "in your local datasets cache, set HF_HUB_OFFLINE=1 before starting Python."
        )
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, ValueError, FileNotFoundError...)
        raise DataSourceError(f"Cannot load {where}: {type(err).__name__}: {err} {offline_hint}") from err


def _hub_texts(source: str, split: str | None, text_field: str) -> list[str]:
    dataset = load_hub_dataset(source, split)
    if text_field not in dataset.column_names:
        raise DataSourceError(
            f"{source!r} has no column {text_field!r} (columns: {dataset.column_names}); pass text_field=..."
        )
    return [text for text in dataset[text_field] if text is not None]


def _cap_chars(texts: Iterable[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    return kept


def load_texts(
    source: str, split: str | None = None, max_chars: int | None = None, text_field: str = "text"
) -> list[str]:
    """Load a list of non-empty texts (paragraphs or documents) from a source, in a deterministic order.

    Args:
        source: ``"demo"``, a local ``.txt``/``.jsonl``/``.json``/``.csv`` file, or a ``datasets`` hub name
            ``"name"`` or ``"name:config"``.
        split: for ``"demo"``: ``None`` (all), ``"calibration"`` or ``"evaluation"`` (disjoint parts, split
            by help topic). For a hub name: a dataset split; ``None`` or ``"calibration"`` mean ``"train"``,
            ``"evaluation"`` means ``"test"``. Ignored for local files (use separate files, e.g. WikiText
            ``valid.txt`` for calibration and ``test.txt`` for evaluation); a value other than
            ``"calibration"``/``"evaluation"`` is logged as a warning there.
        max_chars: keep at most this many characters in total (the last text kept is cut).
        text_field: field (JSON/JSONL/hub) or column (CSV) holding the text.

    Raises:
        FileNotFoundError: ``source`` looks like a file path but does not exist.
        DataSourceError: unreadable source, unknown file type, missing field, hub unreachable, or no text.

    Example:
        >>> calibration = load_texts("demo", split="calibration")
        >>> evaluation = load_texts("demo", split="evaluation")
        >>> set(calibration).isdisjoint(evaluation)
        True
    """
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"source must be a non-empty string: {ACCEPTED_SOURCES}; got {source!r}.")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be a positive number of characters or None, got {max_chars!r}.")
    path = Path(source).expanduser()
    if source == "demo":
        texts = _demo_texts(split)
    elif path.is_file():
        if split is not None and split not in DEMO_SPLITS:
            logger.warning("split=%r is ignored for the local file %s.", split, path)
        texts = _file_texts(path, text_field)
    elif path.exists():
        raise DataSourceError(f"{source!r} is a folder; accepted sources: {ACCEPTED_SOURCES}.")
    elif path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Text file {source!r} does not exist; accepted sources: {ACCEPTED_SOURCES}.")
    else:
        texts = _hub_texts(source, split, text_field)
    texts = [text.strip() for text in texts if text and text.strip()]
    if max_chars is not None:
        texts = _cap_chars(texts, max_chars)
    if not texts:
        raise DataSourceError(
            f"No text found in {source!r} (split {split!r}); accepted sources: {ACCEPTED_SOURCES}."
        )
    logger.debug("Loaded %d texts (%d characters) from %s", len(texts), sum(map(len, texts)), source)
    return texts


def tokenize_for_lm(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, num_sequences: int | None = None
) -> torch.Tensor:
    """Concatenate texts with the EOS token between them and cut the stream into ``[N, seq_len]`` blocks.

    This is the standard layout for perplexity and calibration: every block is full (no padding), the
    trailing tokens that do not fill a block are dropped. Texts are tokenized without special tokens, and
    only as many as needed when ``num_sequences`` is given.

    Args:
        tokenizer: a tokenizer with an EOS token.
        texts: the texts, in order.
        seq_len: tokens per block (at least 2).
        num_sequences: at most this many blocks (``None``: as many as the text fills).

    Returns:
        A LongTensor ``[N, seq_len]``; fewer than ``num_sequences`` rows (with a warning) when the text is short.

    Raises:
        ValueError: bad sizes, no EOS token, or not enough text for one block.

    Example:
        >>> ids = tokenize_for_lm(tokenizer, load_texts("demo", split="evaluation"), seq_len=128, num_sequences=4)
        >>> ids.shape
        torch.Size([4, 128])
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string; wrap it in a list.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    if num_sequences is not None and (not isinstance(num_sequences, int) or num_sequences < 1):
        raise ValueError(f"num_sequences must be a positive integer or None, got {num_sequences!r}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token, needed to separate texts; set tokenizer.eos_token.")
    needed = None if num_sequences is None else num_sequences * seq_len
    stream: list[int] = []
    chunk = 64
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False, verbose=False)
        for ids in encoded["input_ids"]:
            if stream:
                stream.append(eos)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break
    available = len(stream) // seq_len
    if available == 0:
        raise ValueError(f"The texts give {len(stream)} tokens, fewer than one block of seq_len={seq_len}.")
    count = available if num_sequences is None else min(num_sequences, available)
    if num_sequences is not None and count < num_sequences:
        logger.warning(
            "The texts fill only %d blocks of %d tokens; %d were asked for.", count, seq_len, num_sequences
        )
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """Refuse token ids outside ``[0, vocab_size)``, naming the first one and its position.

    Without this check the model's embedding lookup fails with a bare ``IndexError``.

    Example:
        >>> check_token_ids(torch.tensor([[1, 2, 200]]), 104, "input_ids")
        Traceback (most recent call last):
        ValueError: input_ids: token id 200 at [0, 2] is outside the model's vocabulary (vocab_size 104, ids 0-103); was it tokenized for another model?
    """
    ids = torch.as_tensor(input_ids)
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if len(bad):
        position = bad[0].tolist()
        raise ValueError(
            f"{where}: token id {int(ids[tuple(position)])} at {position} is outside the model's vocabulary "
            f"(vocab_size {vocab_size}, ids 0-{vocab_size - 1}); was it tokenized for another model?"
        )


class _BlockDataset(Dataset):
    """Full token blocks as ``{"input_ids", "attention_mask"}`` dicts."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calibration_dataloader(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    num_samples: int = 8,
    seq_len: int = 256,
    batch_size: int = 4,
) -> DataLoader:
    """A deterministic DataLoader over ``num_samples`` full token blocks of ``seq_len`` tokens.

    Each batch is ``{"input_ids": LongTensor[B, S], "attention_mask": LongTensor[B, S]}`` (mask all ones:
    blocks are cut from the concatenated text, see :func:`tokenize_for_lm`).

    Example:
        >>> loader = calibration_dataloader(tokenizer, load_texts("demo", split="calibration"), 8, 256, 4)
        >>> [tuple(batch["input_ids"].shape) for batch in loader]
        [(4, 256), (4, 256)]
    """
    blocks = tokenize_for_lm(tokenizer, texts, seq_len=seq_len, num_sequences=num_samples)
    return block_dataloader(blocks, batch_size)


def block_dataloader(blocks: torch.Tensor, batch_size: int = 4) -> DataLoader:
    """The calibration DataLoader of ready-made ``[N, S]`` token blocks (e.g. text the teacher wrote).

    Example:
        >>> [tuple(b["input_ids"].shape) for b in block_dataloader(torch.zeros(6, 32, dtype=torch.long), 4)]
        [(4, 32), (2, 32)]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return DataLoader(_BlockDataset(blocks.long()), batch_size=batch_size, shuffle=False)
