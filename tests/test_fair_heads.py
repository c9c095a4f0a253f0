"""Fairness-aware head removal: ablation scores on a model with a bias head planted by construction."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from pipeline_helpers import tiny_run_settings, write_assets
from transformers import AutoModelForCausalLM

from optipfair_train import load_pruned_model, prune_model, save_pruned_model
from optipfair_train.arch import get_adapter
from optipfair_train.bias import StereoSetItem, option_log_probs, split_items
from optipfair_train.data import calibration_dataloader, load_texts
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pipeline import PruneThenHeal, load_config
from optipfair_train.pipeline.rounds import round_requests
from optipfair_train.pruning.fair_heads import head_ablation_effects
from optipfair_train.pruning.head_allocation import global_head_counts

PLANTED = (3, 0)  # (layer, query head) whose output raises the stereotype option's token everywhere
SILENT = (1, 3)  # a head whose o_proj columns are zero: removing it changes nothing
STEREO, ANTI, UNRELATED = "q", "z", "k"


def _items(n: int = 8) -> list[StereoSetItem]:
    """Items whose three options differ only in their one-letter word (the scored tokens: " " + letter)."""
    types = ("gender", "race")
    return [
        StereoSetItem(
            "intersentence", f"t{i % 3}", types[i % 2], f"ab{'c' * (i % 4)}", STEREO, ANTI, UNRELATED
        )
        for i in range(n)
    ]


def _planted_model(tokenizer, family: str = "llama") -> torch.nn.Module:
    """A tiny model whose head PLANTED adds a fixed vector along the stereotype letter's output embedding
    at every position (its value projection is a constant bias), and whose head SILENT writes nothing."""
    model = make_tiny_model(family, attention_bias=True)
    adapter = get_adapter(model)
    layer, head = PLANTED
    _, n_kv, head_dim = adapter.head_counts(layer)
    parts = adapter.attention(layer)
    kv = head // (adapter.head_counts(layer)[0] // n_kv)
    rows = slice(kv * head_dim, (kv + 1) * head_dim)
    cols = slice(head * head_dim, (head + 1) * head_dim)
    with torch.no_grad():
        parts.v.weight[rows] = 0  # the value is the bias alone, so the head outputs it whatever it attends to
        parts.v.bias[rows] = torch.linspace(-1, 1, head_dim)
        direction = model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(STEREO)]
        value = parts.v.bias[rows]
        parts.o.weight[:, cols] = 40 * torch.outer(direction, value) / value.dot(value)
        silent_layer, silent_head = SILENT
        adapter.attention(silent_layer).o.weight[:, silent_head * head_dim : (silent_head + 1) * head_dim] = 0
    return model


def _bias_margin(model, tokenizer, items) -> float:
    total, count = option_log_probs(model, tokenizer, items)
    mean = total / count
    return float(np.mean(mean[:, 0] - mean[:, 1]))


def test_planted_bias_head_ranks_first_and_a_silent_head_scores_zero(tokenizer):
    model = _planted_model(tokenizer)
    items = _items()
    effects = head_ablation_effects(model, tokenizer, items, batch_size=3)
    # the intact margins are those StereoSet scoring gives (the per-block passes reproduce the model)
    assert effects.base_bias_margin == pytest.approx(_bias_margin(model, tokenizer, items), abs=1e-5)
    assert effects.base_bias_margin > 1.0
    importance = effects.importance(1.0)
    flat = torch.cat([importance[i] for i in sorted(importance)])
    n_q = len(importance[0])
    assert divmod(int(flat.argmin()), n_q) == PLANTED
    assert effects.bias_reduction[PLANTED[0]][PLANTED[1]] > 1.0
    layer, head = SILENT
    assert effects.bias_reduction[layer][head] == 0 and effects.lm_cost[layer][head] == 0
    assert importance[layer][head] == 0
    # removing the planted head by hand gives the margin the ablation measured
    after = _bias_margin(_without_planted_head(model), tokenizer, items)
    reduction = effects.base_bias_margin - after
    assert float(effects.bias_reduction[PLANTED[0]][PLANTED[1]]) == pytest.approx(reduction, abs=1e-4)


def test_whole_model_passes_give_the_same_scores_as_per_block_passes(tokenizer):
    """Gemma-2 (mixed layer types, soft-capped logits) runs the whole model per head; its intact margin
    must still be StereoSet's, and the scores deterministic."""
    model = make_tiny_model("gemma2")
    items = _items(4)
    first = head_ablation_effects(model, tokenizer, items)
    assert first.base_bias_margin == pytest.approx(_bias_margin(model, tokenizer, items), abs=1e-5)
    second = head_ablation_effects(model, tokenizer, items, batch_size=1)
    for i in first.bias_reduction:
        torch.testing.assert_close(first.bias_reduction[i], second.bias_reduction[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(first.lm_cost[i], second.lm_cost[i], atol=1e-5, rtol=0)


def test_a_shortlist_ablates_exactly_the_heads_the_first_order_estimate_ranks_first(
    tokenizer, calibration_batches
):
    model = _planted_model(tokenizer)
    items = _items(6)
    full = head_ablation_effects(model, tokenizer, items, batches=calibration_batches)
    every = head_ablation_effects(model, tokenizer, items, batches=calibration_batches, shortlist=16)
    one = head_ablation_effects(model, tokenizer, items, batches=calibration_batches, shortlist=1)
    layer, head = PLANTED
    assert all(bool(every.exact[i].all()) for i in every.exact)
    assert [(i, h) for i in one.exact for h in range(4) if one.exact[i][h]] == [PLANTED]
    for i in full.bias_reduction:  # every head ablated: the same as without a shortlist
        torch.testing.assert_close(every.bias_reduction[i], full.bias_reduction[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(every.lm_cost[i], full.lm_cost[i], atol=1e-5, rtol=0)
    assert float(one.bias_reduction[layer][head]) == pytest.approx(
        float(full.bias_reduction[layer][head]), abs=1e-5
    )
    # the others hold first-order estimates: exactly 0 for the silent head (no gradient reaches it)
    assert one.bias_reduction[SILENT[0]][SILENT[1]] == 0 and one.lm_cost[SILENT[0]][SILENT[1]] == 0
    assert full.first_order is None and one.first_order.first_order is None
    for i in one.exact:  # the heads left out keep their first-order estimate
        kept = ~one.exact[i]
        assert torch.equal(one.bias_reduction[i][kept], one.first_order.bias_reduction[i][kept])
    estimated = torch.cat([one.bias_reduction[i] for i in sorted(one.bias_reduction)])
    assert not torch.allclose(
        estimated, torch.cat([full.bias_reduction[i] for i in sorted(full.bias_reduction)])
    )
    with pytest.raises(ValueError, match=r"shortlist must be a whole number of heads in 1\.\.16, got 17"):
        head_ablation_effects(model, tokenizer, items, shortlist=17)


def test_calibration_text_adds_its_nll_rise_to_the_cost(tokenizer, calibration_batches):
    model = _planted_model(tokenizer)
    items = _items(4)
    plain = head_ablation_effects(model, tokenizer, items)
    with_text = head_ablation_effects(model, tokenizer, items, batches=calibration_batches)
    assert plain.base_nll is None and with_text.base_nll > 0
    layer, head = SILENT
    assert with_text.lm_cost[layer][head] == 0
    # the added cost is the rise of the text's mean next-token NLL when the head goes: here a fall, since
    # the planted head's constant push toward one letter hurts ordinary text
    removed = _without_planted_head(model)
    rise = _text_nll(removed, calibration_batches) - _text_nll(model, calibration_batches)
    added = with_text.lm_cost[PLANTED[0]][PLANTED[1]] - plain.lm_cost[PLANTED[0]][PLANTED[1]]
    assert rise < -0.1 and float(added) == pytest.approx(rise, abs=1e-4)


def _without_planted_head(model):
    removed = copy.deepcopy(model)
    cols = slice(PLANTED[1] * 16, (PLANTED[1] + 1) * 16)
    with torch.no_grad():
        get_adapter(removed).attention(PLANTED[0]).o.weight[:, cols] = 0
    return removed


def _text_nll(model, batches) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**b).logits[:, :-1]
            target = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum")
            total, tokens = total + float(loss), tokens + int((target != -100).sum())
    return total / tokens


def test_pruning_removes_the_planted_head_and_moves_bias_toward_zero(tokenizer):
    model = _planted_model(tokenizer)
    items = _items()
    before = _bias_margin(model, tokenizer, items)
    _, stats = prune_model(
        model,
        pruning_type="ATTENTION",
        neuron_selection_method="fairness",
        head_granularity="query",
        layer_allocation="global",
        pruning_percentage=12.5,  # 1 of the 8 units (one query head in each of a layer's 2 groups)
        bias_items=items,
        tokenizer=tokenizer,
        return_stats=True,
        show_progress=False,
    )
    kept = stats["event"]["kept_query_heads"]
    assert list(kept) == [PLANTED[0]] and PLANTED[1] not in kept[PLANTED[0]] and len(kept[PLANTED[0]]) == 2
    assert [get_adapter(model).head_counts(i)[0] for i in range(4)] == [4, 4, 4, 2]
    after = _bias_margin(model, tokenizer, items)
    assert abs(after) < abs(before) - 1.0


def test_scores_depend_only_on_the_build_items(tokenizer):
    model = make_tiny_model("llama")
    letters = "abcdefghij"
    items = [
        StereoSetItem(
            "intersentence", "t", ("gender", "race")[i % 2], "x" * (1 + i % 3), *letters[i % 8 : i % 8 + 3]
        )
        for i in range(12)
    ]
    build, held_out = split_items(items, seed=3)
    changed = [
        item if item in build else dataclasses.replace(item, stereotype="w", unrelated="y") for item in items
    ]
    build_2, held_out_2 = split_items(changed, seed=3)
    assert build_2 == build and held_out_2 != held_out
    first = head_ablation_effects(model, tokenizer, build).importance(0.5)
    second = head_ablation_effects(model, tokenizer, build_2).importance(0.5)
    assert all(torch.equal(first[i], second[i]) for i in first)


def test_fairness_pruned_model_reloads_with_plain_from_pretrained(tmp_path, tokenizer):
    model = _planted_model(tokenizer)
    prune_model(
        model,
        pruning_type="ATTENTION",
        neuron_selection_method="fairness",
        head_granularity="query",
        pruning_percentage=50,
        bias_items=_items(4),
        tokenizer=tokenizer,
        show_progress=False,
    )
    save_pruned_model(model, tmp_path / "uniform")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_global_allocation_of_query_heads_by_hand():
    # 2 groups of 3 query heads per layer: a unit is the next-lowest head of every group, scored by their sum
    scores = {
        0: torch.tensor([5.0, 1.0, 9.0, 2.0, 8.0, 7.0]),  # units: 1+2=3, then 5+7=12
        1: torch.tensor([4.0, 4.0, 4.0, 0.5, 6.0, 6.0]),  # units: 4+0.5=4.5, then 4+6=10
    }
    assert global_head_counts(scores, {0: 3, 1: 3}, 1, normalise=False) == {0: 2, 1: 3}
    assert global_head_counts(scores, {0: 3, 1: 3}, 3, normalise=False) == {0: 2, 1: 1}
    assert global_head_counts(scores, {0: 3, 1: 3}, 4, normalise=False) == {0: 1, 1: 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(neuron_selection_method="fairnes"), "Unknown head importance method 'fairnes'"),
        (dict(bias_items=[]), "StereoSet items"),
        (dict(bias_items=None), "StereoSet items"),
        (dict(bias_items=[("a man", "a woman")]), "must be StereoSetItem objects"),
        (dict(fairness_lambda=-1.0), "fairness_lambda must be a finite number >= 0"),
        (dict(fairness_lambda=float("nan")), "fairness_lambda must be a finite number >= 0"),
        (dict(pruning_percentage=90), "at most 4 can go"),
        (dict(pruning_percentage=5), "removes none of the 8 units"),
        (dict(layer_allocation="sensitivity"), "must be one of uniform, global"),
        (dict(fairness_shortlist=0), "fairness_shortlist must be an integer > 0"),
    ],
)
def test_bad_fairness_settings_are_refused_before_any_change(tokenizer, kwargs, match):
    model = _planted_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(
        pruning_type="ATTENTION",
        neuron_selection_method="fairness",
        layer_allocation="global",
        pruning_percentage=25,
        bias_items=_items(2),
        tokenizer=tokenizer,
        show_progress=False,
    )
    with pytest.raises(ValueError, match=match):
        prune_model(model, **(settings | kwargs))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_global_head_allocation_reloads_with_the_package_loader(tmp_path, tokenizer):
    model = _planted_model(tokenizer)
    prune_model(
        model,
        pruning_type="ATTENTION",
        neuron_selection_method="fairness",
        layer_allocation="global",
        pruning_percentage=25,  # 2 of the 8 KV groups
        bias_items=_items(4),
        tokenizer=tokenizer,
        show_progress=False,
    )
    counts = [get_adapter(model).head_counts(i)[1] for i in range(4)]
    assert sum(counts) == 6 and min(counts) >= 1
    save_pruned_model(model, tmp_path / "global")
    reloaded = load_pruned_model(tmp_path / "global")
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_pipeline_round_with_fairness_heads_equals_the_one_shot_cut(tmp_path):
    """neuron_selection_method=fairness with attention_pruning_percentage scores the heads on StereoSet
    build items, and the stage probes sample the held-out half only."""
    assets = write_assets(tmp_path / "assets")
    items = _items(12)
    (assets / "stereoset.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "type": x.task,
                    "target": x.target,
                    "bias_type": x.bias_type,
                    "context": x.context,
                    "stereotype": x.stereotype,
                    "anti-stereotype": x.anti_stereotype,
                    "unrelated": x.unrelated,
                }
            )  # fmt: skip
            for x in items
        )
    )
    chosen = dict(
        num_rounds=1, num_layers_to_remove=0, mlp_pruning_percentage=0, attention_pruning_percentage=50,
        neuron_selection_method="fairness", fairness_lambda=0.5, fairness_items=4, heal_method="none",
        stereoset_data=str(assets / "stereoset.jsonl"), stereoset_sample_size=6,
    )  # fmt: skip
    settings = tiny_run_settings(assets, tmp_path / "run", **chosen)
    config = load_config(None, [item for key, value in settings.items() for item in (f"--{key}", str(value))])
    run = PruneThenHeal(config)
    result = run.run()
    (event,) = result["rounds"][0]["events"]
    assert (event["method"], event["fairness_lambda"], event["bias_items"]) == ("fairness", 0.5, 4)
    build, held_out = split_items(items, seed=config.run.seed)
    assert set(run.evaluator.fairness_items) <= set(build)
    assert set(run.evaluator.stereoset_items) <= set(held_out)

    model, tokenizer = load_model_and_tokenizer(str(assets / "model"))
    texts = load_texts(str(assets / "text.txt"), split="calibration")
    batches = list(calibration_dataloader(tokenizer, texts, num_samples=2, seq_len=64))
    prune_model(
        model, pruning_type="ATTENTION", neuron_selection_method="fairness", pruning_percentage=50,
        bias_items=run.evaluator.fairness_items, tokenizer=tokenizer, fairness_lambda=0.5,
        dataloader=batches, show_progress=False,
    )  # fmt: skip
    pruned = load_pruned_model(tmp_path / "run" / "round-1" / "pruned").state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(pruned[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "flags",
    [
        ["--mlp_pruning_percentage", "0", "--attention_pruning_percentage", "50"],
        ["--mlp_pruning_percentage", "0", "--target_fraction", "0.05", "--budget_shares", "heads=1"],
    ],
)
def test_pipeline_rounds_hand_the_build_items_to_fairness_heads(tokenizer, flags):
    config = load_config(None, [*flags, "--neuron_selection_method", "fairness", "--fairness_lambda", "2"])
    model = make_tiny_model("llama")
    base = dict(width=128, kv_heads=2, parameters=sum(p.numel() for p in model.parameters()))
    items = _items(4)
    (request,) = round_requests(model, base, config, 1, bias_items=items, tokenizer=tokenizer)
    assert (request.kind, request.method, request.fairness_lambda) == ("heads", "fairness", 2.0)
    assert request.bias_items == items and request.tokenizer is tokenizer
