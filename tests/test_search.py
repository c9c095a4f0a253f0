"""The allocation search (pruning/search.py): deterministic, resumable, refuses a foreign state file."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_model

from optipfair_train.analysis import count_parameters
from optipfair_train.pruning import PruningPlan, apply
from optipfair_train.pruning.search import default_candidates, search

search_module = sys.modules["optipfair_train.pruning.search"]  # the package exports the function by that name

CANDIDATES = [{"mlp": 1.0}, {"hidden": 0.5, "mlp": 0.5}, {"depth": 1.0}, {"heads": 1.0}]


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    calibration = [
        {
            "input_ids": torch.randint(4, 100, (4, 32), generator=generator),
            "attention_mask": torch.ones(4, 32),
        }
        for _ in range(2)
    ]
    return dict(calibration=calibration, eval_batches=torch.randint(4, 100, (4, 32), generator=generator))


@pytest.fixture
def counted(monkeypatch):
    """Counts the proxy evaluations (perplexity of a pruned copy)."""
    calls = []
    real = search_module.perplexity

    def perplexity(model, **kwargs):
        calls.append(count_parameters(model))
        return real(model, **kwargs)

    monkeypatch.setattr(search_module, "perplexity", perplexity)
    return calls


def _table(result):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.rows]


def test_search_ranks_every_candidate_and_chooses_the_lowest_proxy(data):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = search(model, fraction=0.3, candidates=CANDIDATES, show_progress=False, **data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    proxies = [row["proxy_perplexity"] for row in result.rows]
    assert result.ranked_by == "proxy_perplexity"
    assert result.chosen == min((p, i) for i, p in enumerate(proxies) if p is not None)[1]
    # heads alone cannot remove 30% of this model: kept in the table with the reason
    assert proxies[3] is None and "below the smallest model heads can leave" in result.rows[3]["note"]
    target = int(161_344 * 0.7)
    assert all(row["parameters"] <= target for row in result.rows[:3])
    assert result.rows[0]["counts"] == {"mlp": 64}  # 48,404 / (4 layers x 3 x 64) rounded up
    # the chosen plan, applied to the model, gives the chosen row's size and proxy
    apply(model, result.plan)
    assert count_parameters(model) == result.rows[result.chosen]["parameters"]


def test_search_is_deterministic_under_a_seed(data):
    model = make_tiny_model("qwen2")
    first = search(model, fraction=0.25, candidates=CANDIDATES[:3], seed=3, show_progress=False, **data)
    second = search(model, fraction=0.25, candidates=CANDIDATES[:3], seed=3, show_progress=False, **data)
    assert _table(first) == _table(second) and first.plan.to_json() == second.plan.to_json()


def test_a_candidate_with_the_same_units_as_an_earlier_one_is_not_measured_again(data, counted):
    """30% of tiny LLaMA: a quarter for heads is less than half a KV group, so no head goes."""
    candidates = [{"mlp": 1.0}, {"mlp": 0.75, "heads": 0.25}]
    result = search(
        make_tiny_model("llama"), fraction=0.3, candidates=candidates, show_progress=False, **data
    )
    assert len(counted) == 1
    first, second = result.rows
    assert second["note"] == "the same units as mlp=1" and second["counts"] == first["counts"] == {"mlp": 64}
    assert second["proxy_perplexity"] == first["proxy_perplexity"] and result.chosen == 0


def test_a_rerun_skips_finished_candidates(data, tmp_path, counted, monkeypatch):
    model = make_tiny_model("llama")
    state = tmp_path / "state.json"
    real = search_module.budget_requests
    seen = []

    def interrupted(model, target, *, shares, **kwargs):  # the third candidate's planning is cut short
        seen.append(shares)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(model, target, shares=shares, **kwargs)

    monkeypatch.setattr(search_module, "budget_requests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(model, fraction=0.3, candidates=CANDIDATES, state_path=state, show_progress=False, **data)
    assert len(counted) == 2 and sorted(json.loads(state.read_text())["rows"]) == ["0", "1"]
    monkeypatch.setattr(search_module, "budget_requests", real)
    resumed = search(
        model, fraction=0.3, candidates=CANDIDATES, state_path=state, show_progress=False, **data
    )
    assert len(counted) == 3  # only the third candidate is measured (the fourth cannot be planned)
    fresh = search(model, fraction=0.3, candidates=CANDIDATES, show_progress=False, **data)
    assert _table(resumed) == _table(fresh)
    search(model, fraction=0.3, candidates=CANDIDATES, state_path=state, show_progress=False, **data)
    assert len(counted) == 3 + 3  # the fresh search measured 3; a finished state file measures none


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(fraction=0.2), "its target is 112940, this search's is 129075"),
        (dict(candidates=CANDIDATES[:1]), "its candidates is"),
        (dict(seed=1), "its settings is"),
    ],
)
def test_a_state_file_of_another_search_is_refused(data, tmp_path, change, message):
    model = make_tiny_model("llama")
    state = tmp_path / "state.json"
    search(model, fraction=0.3, candidates=CANDIDATES[:2], state_path=state, show_progress=False, **data)
    kwargs = dict(fraction=0.3, candidates=CANDIDATES[:2]) | change
    with pytest.raises(ValueError, match=message):
        search(model, state_path=state, show_progress=False, **kwargs, **data)
    with pytest.raises(ValueError, match="its model is"):
        search(make_tiny_model("llama-tied"), fraction=0.3, candidates=CANDIDATES[:2], state_path=state,
               show_progress=False, **data)  # fmt: skip


def test_distillation_ranks_the_best_and_the_best_single_axis_candidate(data):
    model = make_tiny_model("llama")
    result = search(
        model,
        fraction=0.3,
        candidates=CANDIDATES[:3],
        distill_steps=2,
        distill_top=1,
        show_progress=False,
        **data,
    )
    proxies = [row["proxy_perplexity"] for row in result.rows]
    best = proxies.index(min(proxies))
    best_single = min((proxies[i], i) for i in (0, 2))[1]
    distilled = {i for i, row in enumerate(result.rows) if row["distilled_perplexity"] is not None}
    assert distilled == {best, best_single}
    assert result.ranked_by == "distilled_perplexity"
    assert result.chosen == min(distilled, key=lambda i: result.rows[i]["distilled_perplexity"])


def test_default_candidates_follow_the_family():
    assert {"hidden", "heads"} <= {a for c in default_candidates(make_tiny_model("llama")) for a in c}
    gpt2 = default_candidates(make_tiny_model("gpt2"))  # LayerNorm, fused q/k/v: no hidden, no heads
    assert gpt2 == [{"mlp": 1.0}, {"depth": 1.0}, {"mlp": 0.75, "depth": 0.25}]


def test_bad_search_input_is_refused(data):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="eval_batches must be full blocks"):
        search(model, fraction=0.3, calibration=data["calibration"],
               eval_batches=[{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0, 0]])}])  # fmt: skip
    with pytest.raises(ValueError, match="No candidate can meet the budget"):
        search(model, fraction=0.5, candidates=[{"heads": 1.0}], show_progress=False, **data)


def test_cli_writes_the_table_and_the_chosen_plan(tmp_path, capsys):
    from optipfair_train.cli import main

    source = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(source)
    make_char_tokenizer().save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    out = tmp_path / "search"
    args = ["search", str(source), "--fraction", "0.3", "--candidates", "mlp=1", "hidden=0.5,mlp=0.5"]
    args += ["--calibration-data", str(text), "--eval-data", str(text), "--calibration-seq-len", "32"]
    args += ["--eval-tokens", "256", "--eval-seq-len", "64", "--no-progress", "--output-dir", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "search.json").read_text())
    chosen = table["rows"][table["chosen"]]
    assert f"pipeline: budget_shares: {table['chosen_shares']}" in printed
    assert "**(chosen)**" in (out / "search.md").read_text()
    plan = PruningPlan.load(out / "plan")
    assert plan.parameters_after == chosen["parameters"] <= int(161_344 * 0.7)
    with pytest.raises(SystemExit):  # argparse refuses shares that do not sum to 1, before any model loads
        main(["search", str(source), "--fraction", "0.3", "--candidates", "mlp=2"])
    assert "The shares must sum to 1, got 2" in capsys.readouterr().err


def test_distillation_leaves_the_callers_model_trainable_and_a_second_search_distils(data):
    """The unpruned model is the teacher: after a search its weights still train and it is in the mode it
    was in, so a second search (another budget) on it distils again."""
    model = make_tiny_model("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's own frozen part stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    for fraction in (0.2, 0.3):
        result = search(
            model,
            fraction=fraction,
            candidates=[{"mlp": 1.0}],
            distill_steps=1,
            show_progress=False,
            **data,
        )
        assert result.rows[0]["distilled_perplexity"] is not None
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model.training
