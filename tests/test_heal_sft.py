"""SFT healing data: format detection, extra fields dropped, clear errors."""

from __future__ import annotations

import json

import pytest

from optipfair_train.data import DataSourceError
from optipfair_train.heal import sft_dataset


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats_are_detected_and_extra_fields_dropped(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cases = {
        "chat.jsonl": ([{"messages": chat, "source": "x"}] * 3, ["messages"]),
        "qa.jsonl": ([{"prompt": "2+2?", "completion": " 4", "id": 1}] * 3, ["prompt", "completion"]),
        "lm.jsonl": ([{"text": "plain text", "meta": 0}] * 3, ["text"]),
        "strings.jsonl": (["just a string"] * 3, ["text"]),
    }
    for name, (records, columns) in cases.items():
        dataset = sft_dataset(str(_jsonl(tmp_path / name, records)), num_examples=2)
        assert dataset.column_names == columns and len(dataset) == 2
    columns_json = tmp_path / "columns.json"
    columns_json.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["c", "d"]}))
    assert sft_dataset(str(columns_json))[1] == {"prompt": "b", "completion": "d"}


def test_plain_text_sources_become_text_records(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph here.\n\nSecond paragraph there.\n")
    assert sft_dataset(str(text))["text"] == ["First paragraph here.", "Second paragraph there."]
    assert len(sft_dataset("demo", num_examples=5)) == 5


def test_unusable_records_are_refused(tmp_path):
    with pytest.raises(DataSourceError, match="no SFT format found in fields \\['answer', 'question'\\]"):
        sft_dataset(str(_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])))
    with pytest.raises(DataSourceError, match="record 2: expected the fields \\['prompt', 'completion'\\]"):
        sft_dataset(str(_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "t"}])))
    with pytest.raises(DataSourceError, match="different lengths"):
        bad = tmp_path / "c.json"
        bad.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["c"]}))
        sft_dataset(str(bad))
