"""PruneThenHeal on a tiny model: rounds, healing, reload, model card, W&B, NaN rollback, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import wandb
from conftest import make_char_tokenizer, make_tiny_model
from pipeline_helpers import PoisonOnce, tiny_run_settings, write_assets
from wandb_offline import history, run_files, summary, value_and_prefix

from optipfair_train import load_pruned_model
from optipfair_train.pipeline import NonFiniteLossError, PruneThenHeal, config_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
CROWS = ROOT.parent / "shared" / "data" / "crows-pairs" / "crows_pairs_anonymized.csv"
IDS = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12, 40, 41]])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA-style model with its tokenizer on disk, and a text file."""
    return write_assets(tmp_path_factory.mktemp("pipeline-assets"))


def _flags(assets: Path, out: Path, **overrides) -> list[str]:
    settings = tiny_run_settings(assets, out, **overrides)
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_two_rounds_width_and_depth_with_lora(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    flags = _flags(
        assets, out, report_to="wandb", behaviour_pairs=f"crows-pairs:{CROWS}", behaviour_sample_size=8
    )
    result = PruneThenHeal(load_config(None, flags)).run()
    wandb.finish()

    final = load_pruned_model(result["final_dir"])
    torch.testing.assert_close(_logits(final), _logits(result["model"]), rtol=0, atol=0)
    assert final.config.num_hidden_layers == 3 and final.config.intermediate_size == 128 - 38
    assert [len(r["events"]) for r in result["rounds"]] == [1, 2]  # width; then depth + width
    assert not any("lora" in name for name, _ in final.named_parameters())  # LoRA merged
    for r in result["rounds"]:
        assert r["pruned"]["parameters"] == r["healed"]["parameters"] and r["heal_tokens"] == 4 * 2 * 64
        assert r["healed"]["perplexity"] > 0 and "bias/activation_mean_difference" in r["healed"]
        assert (
            r["healed"]["bias/score_ci_low"] <= r["healed"]["bias/score"] <= r["healed"]["bias/score_ci_high"]
        )

    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\nbase_model:")
    assert "Speed on this machine:" in card
    for r in result["rounds"]:
        shipped = " (final, shipped)" if r is result["rounds"][-1] else ""
        assert (
            f"| round {r['round']} healed{shipped} | {r['healed']['parameters']:,} | "
            f"{r['healed']['perplexity']:,.2f} |" in card
        )
    assert json.loads((out / "final" / "pruning_manifest.json").read_text())["num_layers"] == 3

    rows = history(run_files(out)[0])
    assert any("heal/bias/score" in row for row in rows)  # fairness watched during healing
    rounds_logged = [row["round"] for row in rows if "round" in row]
    assert rounds_logged == [0, 1, 2]
    # one step axis for the healing curves: round 2 continues where round 1 ended (4 steps each)
    steps = [row["pipeline/step"] for row in rows if "heal/loss" in row]
    assert steps == list(range(1, 9))
    keys = {k for row in rows for k in row}
    assert not value_and_prefix(keys), value_and_prefix(keys)
    assert not any(k.startswith(("round/", "train/")) for k in keys)
    last = [row for row in rows if row.get("round") == 2][0]
    assert last["tables/summary"]["_type"] == "table-file" and last["tables/pruning"]["_type"] == "table-file"
    assert last["figures/bias_heatmap"]["_type"] == "image-file"
    assert last["healed/perplexity/heal_domain"] == pytest.approx(
        result["rounds"][-1]["healed"]["perplexity"]
    )
    assert last["pruned/perplexity/heal_domain"] == pytest.approx(
        result["rounds"][-1]["pruned"]["perplexity"]
    )
    table = json.loads((run_files(out)[0].parent / "files" / last["tables/summary"]["path"]).read_text())
    assert table["columns"][:3] == ["stage", "parameters", "perplexity/heal_domain"]
    assert all(any(row[i] is not None for row in table["data"]) for i in range(len(table["columns"])))
    assert [row[0] for row in table["data"]] == ["base", "r1 pruned", "r1 healed", "r2 pruned", "r2 healed"]
    assert table["data"][-1][2] == pytest.approx(result["rounds"][-1]["healed"]["perplexity"])
    final = summary(run_files(out)[0])  # speed and the verdict
    assert final["speed/decode/ratio"] > 0 and final["speed/prefill/base_tokens_per_second"] > 0
    base, last_params = result["baseline"]["parameters"], result["rounds"][-1]["healed"]["parameters"]
    assert final["verdict/parameters_change_percent"] == pytest.approx(100 * (last_params - base) / base)
    assert [len(r["heal_loss"]) for r in result["rounds"]] == [4, 4]  # the report's healing-loss curve


def test_distillation_heal_reloads_exactly(assets, tmp_path):
    out = tmp_path / "kd"
    result = PruneThenHeal(
        load_config(None, _flags(assets, out, heal_method="kd", num_rounds=1, num_layers_to_remove=0))
    ).run()
    final = load_pruned_model(result["final_dir"])
    torch.testing.assert_close(_logits(final), _logits(result["model"]), rtol=0, atol=0)
    pruned = load_pruned_model(out / "round-1" / "pruned")
    assert not torch.equal(_logits(pruned), _logits(final))  # healing changed the weights


def test_non_finite_loss_rolls_back_and_retries_with_lower_lr(assets, tmp_path):
    flags = _flags(
        assets,
        tmp_path / "nan",
        num_rounds=1,
        num_layers_to_remove=0,
        learning_rate=1e-3,
        nan_lr_factor=0.5,
        heal_steps=4,
    )
    result = PruneThenHeal(load_config(None, flags), callbacks=[PoisonOnce()]).run()
    assert result["rounds"][0]["learning_rate"] == pytest.approx(5e-4)
    assert torch.isfinite(_logits(result["model"])).all()
    assert torch.isfinite(torch.tensor(result["rounds"][0]["healed"]["perplexity"]))

    flags = _flags(
        assets, tmp_path / "nan2", num_rounds=1, num_layers_to_remove=0, nan_retries=0, heal_steps=4
    )
    with pytest.raises(NonFiniteLossError, match="nothing of this round was saved"):
        PruneThenHeal(load_config(None, flags), callbacks=[PoisonOnce()]).run()
    assert not (tmp_path / "nan2" / "round-1" / "model").exists()
    assert json.loads((tmp_path / "nan2" / "state.json").read_text())["rounds"] == []


KILL_ENTRY = """
import os, signal, sys
from transformers import TrainerCallback
from optipfair_train.pipeline import PruneThenHeal, load_config

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

callbacks = [KillAt()] if sys.argv[1] == "kill" else []
PruneThenHeal(load_config(None, sys.argv[2:]), callbacks=callbacks).run()
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILL_ENTRY, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # three CLI runs; fast: tests/test_pipeline_interrupted.py
def test_sigkill_mid_heal_then_rerun_equals_uninterrupted(assets, tmp_path):
    flags = _flags(assets, tmp_path / "killed", heal_steps=6)
    killed = _run(["kill", *flags])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "round-1" / "heal" / "checkpoint-2").exists()
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["rounds"] == []
    resumed = _run(["go", *flags])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    reference = PruneThenHeal(load_config(None, _flags(assets, tmp_path / "straight", heal_steps=6))).run()
    final = load_pruned_model(tmp_path / "killed" / "final")
    for (name, a), (_, b) in zip(
        final.state_dict().items(), reference["model"].state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2]


DDP_ENTRY = """
import hashlib, sys
from accelerate import PartialState
from optipfair_train.pipeline import PruneThenHeal, load_config

result = PruneThenHeal(load_config(None, sys.argv[2:])).run()
digest = hashlib.sha256()
for name, tensor in sorted(result["model"].state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.detach().float().numpy().tobytes())
open(f"{sys.argv[1]}/rank-{PartialState().process_index}.txt", "w").write(digest.hexdigest())
"""


@pytest.mark.slow
def test_two_processes_prune_identically(assets, tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(DDP_ENTRY)
    flags = _flags(assets, tmp_path / "ddp", num_rounds=1, heal_steps=2)
    # the entry script lives in tmp_path: without PYTHONPATH Python would import the installed package
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(entry),
            str(tmp_path),
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    assert load_pruned_model(tmp_path / "ddp" / "final").config.num_hidden_layers == 3


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.pruning.num_rounds >= 1 and config.model.model_path


def test_default_schedule_is_one_shot():
    """One round unless asked: at an equal healing budget one-shot measured better (docs/benchmarks.md)."""
    assert load_config(None, []).pruning.num_rounds == 1
    assert load_config(None, ["--num_rounds", "3"]).pruning.num_rounds == 3


def test_bad_configuration_is_refused_before_work(assets, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_rounds: 2\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) learning_rat. Accepted keys: .*learning_rate"):
        load_config(bad)
    with pytest.raises(ValueError, match="--num_rounds"):
        load_config(None, ["--no_such_flag", "1"])
    with pytest.raises(ValueError, match="Nothing to prune"):
        load_config(None, ["--mlp_pruning_percentage", "0"])
    with pytest.raises(ValueError, match="heal_method must be one of"):
        load_config(None, ["--heal_method", "magic"])
    assert "heal_method" in config_keys()

    with pytest.raises(ValueError, match="already reached"):
        PruneThenHeal(
            load_config(
                None, _flags(assets, tmp_path / "reached", mlp_pruning_percentage=0, target_parameters=10**9)
            )
        ).run()
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        PruneThenHeal(load_config(None, _flags(assets, blocked / "out"))).run()
    with pytest.raises(OSError, match="--model-path demo"):
        PruneThenHeal(
            load_config(None, _flags(assets, tmp_path / "missing", model_path="no-such-org/no-such-model"))
        ).run()


def test_teacher_with_another_tokenizer_is_refused(assets, tmp_path):
    other = tmp_path / "other-teacher"
    make_tiny_model("llama").save_pretrained(other)
    tokenizer = make_char_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="different tokenizer"):
        PruneThenHeal(
            load_config(None, _flags(assets, tmp_path / "t", heal_method="kd", teacher_model_path=other))
        ).run()


def test_changed_settings_in_an_existing_output_dir_are_refused(assets, tmp_path):
    out = tmp_path / "same"
    PruneThenHeal(
        load_config(None, _flags(assets, out, num_rounds=1, heal_method="none", num_layers_to_remove=0))
    ).run()
    with pytest.raises(ValueError, match="different settings"):
        PruneThenHeal(
            load_config(
                None,
                _flags(
                    assets,
                    out,
                    num_rounds=1,
                    heal_method="none",
                    num_layers_to_remove=0,
                    mlp_pruning_percentage=50,
                ),
            )
        ).run()


QA = [(f"Question {i}: what is {i} plus {i}?", f" It is {2 * i}.") for i in range(8)]


def test_sft_lora_heal_on_prompt_completion_records(assets, tmp_path, tokenizer):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "completion": c, "id": i}) + "\n" for i, (p, c) in enumerate(QA))
    )
    out = tmp_path / "sft"
    flags = _flags(assets, out, heal_method="sft_lora", heal_data=data, num_rounds=1, num_layers_to_remove=0)
    result = PruneThenHeal(load_config(None, flags)).run()

    final = load_pruned_model(result["final_dir"])
    torch.testing.assert_close(_logits(final), _logits(result["model"]), rtol=0, atol=0)
    assert not any("lora" in name for name, _ in final.named_parameters())
    assert not torch.equal(_logits(load_pruned_model(out / "round-1" / "pruned")), _logits(final))
    # 4 steps x 2 examples = each of the 8 records once: prompt + completion + EOS, no padding counted
    expected = sum(len(tokenizer(p + c)["input_ids"]) + 1 for p, c in QA)
    assert result["rounds"][0]["heal_tokens"] == expected


def test_sft_arguments_turn_off_trls_gpu_defaults_without_deprecation_warnings(assets, tmp_path):
    flags = _flags(assets, tmp_path / "args", heal_method="sft", heal_data="demo", num_rounds=1)
    config = load_config(None, flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. a renamed argument passed under its old name
        args = PruneThenHeal(config)._training_args(tmp_path / "round", learning_rate=1e-4)
    assert args.gradient_checkpointing is False and args.bf16 is False and args.packing is False
    assert args.max_length == config.data.heal_seq_len


@pytest.mark.slow  # fast: sft_lora above, chat formats in tests/test_heal_sft.py
def test_sft_full_parameter_heal_on_chat_messages(assets, tmp_path):
    model_dir = tmp_path / "chat-model"
    make_tiny_model("llama").save_pretrained(model_dir)
    chat_tokenizer = make_char_tokenizer()
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chat.json"
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in QA]
    data.write_text(json.dumps([{"messages": m} for m in chats]))
    out = tmp_path / "sft-full"
    flags = _flags(
        assets,
        out,
        model_path=model_dir,
        heal_method="sft",
        heal_data=data,
        num_rounds=1,
        num_layers_to_remove=0,
    )
    result = PruneThenHeal(load_config(None, flags)).run()
    final = load_pruned_model(result["final_dir"])
    torch.testing.assert_close(_logits(final), _logits(result["model"]), rtol=0, atol=0)
    assert not torch.equal(_logits(load_pruned_model(out / "round-1" / "pruned")), _logits(final))
    rendered = [chat_tokenizer.apply_chat_template(m, tokenize=False) for m in chats]
    # every conversation once; the chat template (not TRL) decides how a turn ends, so no EOS is added
    assert result["rounds"][0]["heal_tokens"] == sum(len(chat_tokenizer(t)["input_ids"]) for t in rendered)
