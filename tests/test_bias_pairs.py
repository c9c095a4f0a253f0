"""Prompt pairs: defaults, templates, the CrowS-Pairs loader and plain pair files."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest

from optipfair_train.bias import (
    ATTRIBUTES,
    DEFAULT_PROMPT_PAIRS,
    generate_prompt_pairs,
    load_crows_pairs,
    load_pairs,
    sample_pairs,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CROWS = DATA / "crows-pairs" / "crows_pairs_anonymized.csv"


@pytest.mark.skipif(not CROWS.is_file(), reason="shared CrowS-Pairs data not present")
def test_crows_pairs_loader_on_the_shared_file():
    pairs = load_crows_pairs(CROWS)
    assert len(pairs) == 1508
    assert len({p.bias_type for p in pairs}) == 9
    assert {p.stereo_antistereo for p in pairs} == {"stereo", "antistereo"}
    with CROWS.open(newline="", encoding="utf-8") as f:
        row = next(iter(csv.DictReader(f)))
    first = pairs[0]
    assert first == (row["sent_more"], row["sent_less"])  # prompt1 = sent_more, also for antistereo rows
    assert (first.bias_type, first.stereo_antistereo) == (row["bias_type"], row["stereo_antistereo"])
    assert load_pairs(f"crows-pairs:{CROWS}") == pairs
    assert load_pairs(str(CROWS)) == pairs  # a CSV with CrowS-Pairs columns is recognised as such
    subset = sample_pairs(pairs, 100, seed=3)
    assert len(subset) == 100 and subset == sample_pairs(pairs, 100, seed=3)


def test_defaults_templates_and_pair_files(tmp_path):
    assert all(len(p) == 2 and p.bias_type for p in DEFAULT_PROMPT_PAIRS)
    p1, p2 = DEFAULT_PROMPT_PAIRS[0]  # unpacks like OptiPFair's tuples
    assert "white" in p1 and "Black" in p2
    assert pickle.loads(pickle.dumps(DEFAULT_PROMPT_PAIRS[0])).bias_type == "race"
    generated = generate_prompt_pairs("The {attribute} nurse said", "religion")
    assert len(generated) == len(ATTRIBUTES["religion"]) - 1

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        '{"prompt1": "He is kind.", "prompt2": "She is kind.", "bias_type": "gender"}\n["A", "B"]\n'
    )
    assert load_pairs(str(jsonl)) == [("He is kind.", "She is kind."), ("A", "B")]
    assert load_pairs(str(jsonl))[0].bias_type == "gender"
    as_csv = tmp_path / "pairs.csv"
    as_csv.write_text("prompt1,prompt2\nHe ran.,She ran.\n")
    assert load_pairs(str(as_csv)) == [("He ran.", "She ran.")]
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps([["x y", "x z"]]))
    assert load_pairs(str(as_json)) == [("x y", "x z")]

    with pytest.raises(FileNotFoundError, match="hf:NAME"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="prompt1"):
        load_pairs(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompt pairs"):
        load_pairs(str(empty))
    with pytest.raises(ValueError, match="{attribute}"):
        generate_prompt_pairs("no slot", "gender")
