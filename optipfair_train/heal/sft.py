"""Supervised fine-tuning data for healing through TRL's ``SFTTrainer``.

:func:`sft_dataset` turns the user's own data into one of the three formats ``SFTTrainer`` understands:

- language modelling: ``{"text": ...}`` (``'demo'``, ``.txt`` files, and any source with a ``text`` field);
- conversational: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the tokenizer's
  chat template);
- prompt-completion: ``{"prompt": ..., "completion": ...}`` (loss on the completion only).

Sources: ``'demo'``, a local ``.txt``/``.jsonl``/``.json`` file, or a ``datasets`` hub name (``"name"`` or
``"name:config"``, its ``train`` split).

Example:
    >>> dataset = sft_dataset("demo", num_examples=8)
    >>> dataset.column_names
    ['text']
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from ..data import DataSourceError, load_hub_dataset, load_texts, read_json_records

__all__ = ["SFT_FORMATS", "sft_dataset"]

SFT_FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
_ACCEPTED = "records with 'messages', with 'prompt' and 'completion', or with 'text'"


def _format_of(columns: set[str], where: str) -> tuple[str, ...]:
    for fields in SFT_FORMATS.values():
        if set(fields) <= columns:
            return fields
    raise DataSourceError(f"{where}: no SFT format found in fields {sorted(columns)}; expected {_ACCEPTED}.")


def sft_dataset(source: str, num_examples: int | None = None) -> Dataset:
    """The first ``num_examples`` examples of ``source`` (all if None), in one SFT format.

    Records keep only the columns of their format (extra fields are dropped, so TRL picks the format
    from the columns that remain).

    Raises:
        DataSourceError: no recognisable format, mixed formats, or no examples.

    Example:
        >>> sft_dataset("chat.jsonl", num_examples=100).column_names  # doctest: +SKIP
        ['messages']
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        records = read_json_records(path)
        if records and all(isinstance(r, dict) for r in records):
            fields = _format_of(set(records[0]), str(path))
            for i, record in enumerate(records, start=1):
                if not set(fields) <= set(record):
                    raise DataSourceError(
                        f"{path}, record {i}: expected the fields {list(fields)} like record 1."
                    )
            rows = [{f: r[f] for f in fields} for r in records[:num_examples]]
            dataset = Dataset.from_list(rows) if rows else None
        else:  # plain strings: language modelling
            dataset = Dataset.from_dict({"text": load_texts(source)[:num_examples]})
    elif source == "demo" or path.exists() or source.startswith((".", "/", "~")):
        dataset = Dataset.from_dict({"text": load_texts(source, split="calibration")[:num_examples]})
    else:
        hub = load_hub_dataset(source, split="calibration")
        fields = _format_of(set(hub.column_names), repr(source))
        rows = hub.select_columns(list(fields))
        dataset = rows.select(range(min(num_examples, len(rows)))) if num_examples else rows
    if dataset is None or len(dataset) == 0:
        raise DataSourceError(f"No SFT examples in {source!r}; expected {_ACCEPTED}.")
    return dataset
