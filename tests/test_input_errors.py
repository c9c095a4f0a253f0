"""Bad input files and values are errors naming the file (and line) or the setting, and what was wrong:
pair, CrowS-Pairs, StereoSet and text files, settings that are not finite, token ids outside the
vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB_SIZE, make_tiny_model
from pipeline_helpers import write_assets, write_config

from optipfair_train import prune_model
from optipfair_train.bias.pairs import load_crows_pairs, load_pairs
from optipfair_train.bias.stereoset_data import read_stereoset_jsonl
from optipfair_train.callbacks import PruningCallback
from optipfair_train.cli import main
from optipfair_train.data import load_texts
from optipfair_train.evaluation import perplexity

CROWS_HEADER = "sent_more,sent_less,stereo_antistereo,bias_type"
STEREOSET_RECORD = {
    "type": "intersentence",
    "target": "Ethiopia",
    "bias_type": "race",
    "context": "Many people live in Ethiopia.",
    "stereotype": "They are thin.",
    "anti-stereotype": "They are fat.",
    "unrelated": "Cats have claws.",
}


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_a_header_only_crows_file_says_no_rows_and_a_missing_column_is_named(tmp_path):
    header_only = _write(tmp_path / "crows.csv", CROWS_HEADER + "\n")
    with pytest.raises(ValueError, match=f"^{header_only}: no rows below the header"):
        load_crows_pairs(header_only)
    no_bias_type = _write(tmp_path / "three.csv", "sent_more,sent_less,stereo_antistereo\na b,c d,stereo\n")
    with pytest.raises(ValueError, match=r"missing columns \['bias_type'\]"):
        load_crows_pairs(no_bias_type)


@pytest.mark.parametrize(
    "name, content, where, cause",
    [
        (
            "blank.csv",
            f"{CROWS_HEADER}\nHe is kind.,She is kind.,stereo,gender\n  ,She ran.,stereo,gender\n",
            3,
            "non-empty",
        ),
        (
            "latin1.csv",
            f"{CROWS_HEADER}\nHe is kind.,She is kind.,stereo,gender\n".encode()
            + b"Caf\xe9,x y,stereo,race\n",
            3,
            "not UTF-8 text (byte 0xe9)",
        ),
    ],
)
def test_crows_file_errors_name_the_file_and_line(tmp_path, name, content, where, cause):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=f"^{path}, line {where}: .*{re.escape(cause)}"):
        load_pairs(f"crows-pairs:{path}")


@pytest.mark.parametrize(
    "name, content, where, cause",
    [
        (
            "bad.json",
            '[{"prompt1": "He ran.", "prompt2": "She ran."},\n {"prompt1": "x"',
            "line 2",
            "not valid JSON",
        ),
        (
            "blank.json",
            '[{"prompt1": "He ran.", "prompt2": "She ran."}, {"prompt1": "He sat.", "prompt2": " "}]',
            "record 2",
            "non-empty",
        ),
        (
            "blank.jsonl",
            '{"prompt1": "He ran.", "prompt2": "She ran."}\n\n{"prompt1": "", "prompt2": "x"}\n',
            "line 3",
            "non-empty",
        ),
        (
            "latin1.jsonl",
            b'{"prompt1": "He ran.", "prompt2": "She ran."}\n{"prompt1": "Caf\xe9", "prompt2": "x"}\n',
            "line 2",
            "not UTF-8",
        ),
        ("blank.csv", "prompt1,prompt2\nHe ran.,She ran.\nHe sat.,\n", "line 3", "non-empty"),
    ],
)
def test_pair_file_errors_name_the_file_and_where(tmp_path, name, content, where, cause):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=f"^{path}, {where}: .*{cause}"):
        load_pairs(str(path))


def test_stereoset_and_text_files_that_are_not_utf8_name_the_line(tmp_path):
    good = json.dumps(STEREOSET_RECORD)
    stereoset = _write(tmp_path / "s.jsonl", f"{good}\n{good}\n".encode() + b'{"context": "\xff"}\n')
    with pytest.raises(ValueError, match=f"^{stereoset}, line 3: not UTF-8 text"):
        read_stereoset_jsonl(stereoset)
    blank = dict(STEREOSET_RECORD, unrelated="   ")
    stereoset = _write(tmp_path / "blank.jsonl", f"{good}\n{json.dumps(blank)}\n")
    with pytest.raises(
        ValueError, match=rf"^{stereoset}, line 2: field\(s\) \['unrelated'\] must be non-empty"
    ):
        read_stereoset_jsonl(stereoset)
    text = _write(tmp_path / "t.txt", b"A first paragraph.\n\nA second \x80 one.\n")
    with pytest.raises(ValueError, match=f"^{text}, line 3: not UTF-8 text"):
        load_texts(str(text))


def test_token_ids_outside_the_vocabulary_are_named_before_any_change():
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, VOCAB_SIZE]])
    with pytest.raises(
        ValueError, match=rf"^Calibration batch 1: token id {VOCAB_SIZE} at \[1, 3\] is outside"
    ):
        prune_model(model, pruning_percentage=20, dataloader=[{"input_ids": ids[:1]}, {"input_ids": ids}])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(
        ValueError, match=rf"token id -1 at \[0, 1\] is outside .*vocab_size {VOCAB_SIZE}, ids 0-103"
    ):
        perplexity(model, input_ids=torch.tensor([[3, -1, 4]]))


def test_a_pruning_callback_refuses_out_of_vocabulary_calibration_at_train_begin():
    """Before the first training step, not at the pruning step."""
    model = make_tiny_model("llama")

    class Args:
        world_size = 1

    class State:
        global_step = 0

    ids = torch.tensor([[5, 6, VOCAB_SIZE + 3]])
    callback = PruningCallback(
        target=25, step=2, neuron_selection_method="MAW", dataloader=[{"input_ids": ids}]
    )
    with pytest.raises(
        ValueError, match=rf"^PruningCallback: calibration batch 0: token id {VOCAB_SIZE + 3} at \[0, 2\]"
    ):
        callback.on_train_begin(Args(), State(), None, model=model)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("input-assets"))


@pytest.mark.parametrize("flags", [[], ["--kd_temperature", "nan"]])
def test_a_setting_that_is_not_finite_is_refused_before_any_folder(assets, tmp_path, capsys, flags):
    out = tmp_path / "run"
    config = write_config(assets, out, **({} if flags else {"learning_rate": float("inf")}))
    assert ".inf" in config.read_text() or flags
    assert main(["run", "--config", str(config), *flags]) == 2
    expected = (
        "kd_temperature must be a finite number, got nan"
        if flags
        else "learning_rate must be a finite number, got inf"
    )
    assert expected in capsys.readouterr().err
    assert not out.exists()
