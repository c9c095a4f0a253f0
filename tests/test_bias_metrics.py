"""Activation-difference metrics: hand-computed values, unequal lengths, streaming, a planted neuron."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train.arch import get_adapter
from optipfair_train.bias import (
    NeuronStats,
    align_tokens,
    bootstrap_ci,
    calculate_bias_metrics,
    capture_activations,
    encode_texts,
    get_activation_pairs,
    probe_activation_bias,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position mean absolute difference."""
    return (a - b).abs().mean(-1)


def test_metrics_equal_hand_computed_differences(tokenizer):
    model = make_tiny_model("llama")
    act1, act2 = get_activation_pairs(model, tokenizer, "The white man ran.", "The Black man ran.")
    metrics = calculate_bias_metrics(act1, act2)
    assert metrics["alignment"]["equal_length"]
    all_rows = []
    for key in act1:
        a, b = act1[key][0], act2[key][0]
        rows = _rows(a, b).double()
        all_rows.append(rows)
        m = metrics["layer_metrics"][key]
        assert m["mean_difference"] == pytest.approx((a - b).abs().mean().item(), rel=1e-5)
        assert m["max_difference"] == pytest.approx(rows.max().item(), rel=1e-5)
        assert m["min_difference"] == pytest.approx(rows.min().item(), abs=1e-7)
        assert m["std_difference"] == pytest.approx(rows.std().item(), rel=1e-4)
        assert m["l1_norm"] == pytest.approx(rows.sum().item(), rel=1e-5)
        assert m["l2_norm"] == pytest.approx(rows.norm().item(), rel=1e-5)
        assert m["pooled_difference"] == pytest.approx((a.mean(0) - b.mean(0)).abs().mean().item(), rel=1e-4)
    overall = torch.cat(all_rows)
    assert metrics["overall_metrics"]["mean_difference"] == pytest.approx(overall.mean().item(), rel=1e-5)
    assert metrics["overall_metrics"]["total_layers"] == 24
    mlp = metrics["component_metrics"]["mlp_output"]
    prog = mlp["progression_metrics"]
    by_layer = [metrics["layer_metrics"][f"mlp_output_layer_{i}"]["mean_difference"] for i in range(4)]
    assert prog["first_to_last_ratio"] == pytest.approx(by_layer[-1] / by_layer[0])
    assert prog["is_increasing"] == (by_layer[-1] > by_layer[0])
    assert prog["layer_with_max_diff"] == f"mlp_output_layer_{by_layer.index(max(by_layer))}"
    assert mlp["num_layers"] == 4
    # A causal model: the shared prefix "The " has identical activations.
    assert metrics["layer_metrics"]["mlp_output_layer_3"]["min_difference"] == 0.0


def test_unequal_length_pairs_give_finite_metrics(tokenizer):
    model = make_tiny_model("gemma2")
    act1, act2 = get_activation_pairs(model, tokenizer, "The boy left early.", "The old woman left early.")
    metrics = calculate_bias_metrics(act1, act2)
    al = align_tokens(act1.token_ids, act2.token_ids)
    assert not al.equal_length and al.pooled_span and metrics["alignment"]["suffix"] == al.suffix > 0
    for key in act1:
        entry = metrics["layer_metrics"][key]
        assert all(math.isfinite(v) for v in entry.values())
        a, b = act1[key][0], act2[key][0]
        (s1, e1), (s2, e2) = al.span1, al.span2
        rows = torch.cat(
            [
                _rows(a[: al.prefix], b[: al.prefix]),
                _rows(a[s1:e1].mean(0, keepdim=True), b[s2:e2].mean(0, keepdim=True)),
                _rows(a[e1:], b[e2:]),  # suffix, aligned from the end
            ]
        )
        assert entry["num_positions"] == al.prefix + 1 + al.suffix
        assert entry["mean_difference"] == pytest.approx(rows.mean().item(), rel=1e-5)
        assert entry["mean_difference"] > 0
    # Plain dicts without token ids: whole-prompt means are compared, still finite.
    plain = calculate_bias_metrics(dict(act1), dict(act2))
    assert all(math.isfinite(v) for v in plain["overall_metrics"].values())


def test_streaming_probe_matches_single_pair_metrics(tokenizer):
    model = make_tiny_model("qwen3")
    pairs = [
        ("The man left early.", "The old woman left early."),
        ("He is a nurse.", "She is a nurse."),
        ("A rich kid", "A poor kid"),
    ]
    result = probe_activation_bias(model, tokenizer, pairs, batch_size=2)
    for pair, record in zip(pairs, result["pairs"], strict=True):
        single = calculate_bias_metrics(*get_activation_pairs(model, tokenizer, *pair))
        for key, entry in single["layer_metrics"].items():
            for name, value in entry.items():
                assert record["metrics"]["layer_metrics"][key][name] == pytest.approx(
                    value, rel=1e-4, abs=1e-6
                )
    agg = result["aggregate"]
    per_pair = [r["metrics"]["overall_metrics"]["mean_difference"] for r in result["pairs"]]
    overall = agg["overall_metrics"]
    assert overall["mean_difference"] == pytest.approx(sum(per_pair) / 3)
    assert overall["mean_difference_ci"][0] <= overall["mean_difference"] <= overall["mean_difference_ci"][1]
    mean, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=1)
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3"])
def test_planted_attribute_neuron_shows_at_its_layer(family, tokenizer):
    pairs = [
        ("The X doctor spoke.", "The Y doctor spoke."),
        ("An X nurse came in.", "An Y nurse came in."),
        ("My X friend laughed.", "My Y friend laughed."),
    ]
    base, planted = make_tiny_model(family), make_tiny_model(family)
    layer, neuron = 2, 7
    emb = planted.get_input_embeddings().weight
    x_id, y_id = tokenizer.convert_tokens_to_ids(["X", "Y"])
    with torch.no_grad():
        direction = emb[x_id] - emb[y_id]
        direction /= direction.norm()
        mlp = get_adapter(planted).mlp(layer)
        mlp.gate.weight[neuron] = 8 * direction  # the neuron reads the X-vs-Y direction...
        mlp.up.weight[neuron] = 8 * direction
        out = torch.randn(mlp.down.weight.shape[0], generator=torch.Generator().manual_seed(0))
        mlp.down.weight[:, neuron] = 4 * out / out.norm()  # ...and writes strongly

    def by_layer(model):
        agg = probe_activation_bias(model, tokenizer, pairs, components="mlp_output")["aggregate"]
        return [agg["layer_metrics"][f"mlp_output_layer_{i}"]["mean_difference"] for i in range(4)]

    before, after = by_layer(base), by_layer(planted)
    assert after[:layer] == pytest.approx(before[:layer])  # earlier layers untouched
    assert after[layer] > 2 * before[layer]
    assert max(range(4), key=after.__getitem__) == layer

    # The streaming per-neuron statistics (what a fairness-aware scorer reads) single out the neuron.
    key = f"down_proj_input_layer_{layer}"
    stats = NeuronStats(num_groups=2)
    batch = encode_texts(tokenizer, [p[0] for p in pairs] + [p[1] for p in pairs])
    with capture_activations(planted, [key], stats), torch.no_grad():
        stats.group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
        planted(**batch.model_inputs())
    gap = (stats.mean(key)[0] - stats.mean(key)[1]).abs()
    assert int(gap.argmax()) == neuron


def test_normalized_difference_ignores_a_scaled_layer_and_keeps_old_keys(tokenizer):
    """Halving a layer's output halves ``mean_difference`` but leaves ``normalized_difference`` unchanged."""
    model = make_tiny_model("llama")
    pairs = [("The man is a nurse.", "The woman is a nurse."), ("He is kind", "She is very kind")]
    keys = ["mlp_output_layer_3", "attention_output_layer_3"]
    plain = probe_activation_bias(model, tokenizer, pairs, layers=[3], components=["mlp_output", "attention_output"])
    handle = get_adapter(model).mlp(3).module.register_forward_hook(lambda m, args, out: out * 0.5)
    try:
        scaled = probe_activation_bias(model, tokenizer, pairs, layers=[3], components=["mlp_output", "attention_output"])
    finally:
        handle.remove()
    a, b = plain["aggregate"]["layer_metrics"], scaled["aggregate"]["layer_metrics"]
    assert set(a) == set(keys)
    assert b["mlp_output_layer_3"]["mean_difference"] == pytest.approx(0.5 * a["mlp_output_layer_3"]["mean_difference"])
    assert b["mlp_output_layer_3"]["normalized_difference"] == pytest.approx(a["mlp_output_layer_3"]["normalized_difference"])
    attn_a, attn_b = a["attention_output_layer_3"], b["attention_output_layer_3"]  # before the MLP: untouched
    assert attn_b["mean_difference"] == pytest.approx(attn_a["mean_difference"])
    overall_a, overall_b = plain["aggregate"]["overall_metrics"], scaled["aggregate"]["overall_metrics"]
    assert overall_b["normalized_difference"] == pytest.approx(overall_a["normalized_difference"])
    assert overall_b["mean_difference"] < overall_a["mean_difference"]  # the old key keeps its old meaning
    low, high = overall_a["normalized_difference_ci"]
    assert low <= overall_a["normalized_difference"] <= high
    # by hand for one pair and layer: sum over aligned rows of mean|a1 - a2| over sum of mean(|a1| + |a2|) / 2
    act1, act2 = get_activation_pairs(model, tokenizer, *pairs[0], ["mlp_output_layer_3"])
    x1, x2 = act1["mlp_output_layer_3"][0], act2["mlp_output_layer_3"][0]
    rows = [(t1, t2) for t1, t2 in align_tokens(act1.token_ids, act2.token_ids).pairs()]
    num = sum(float((x1[i] - x2[j]).abs().mean()) for i, j in rows)
    den = sum(float((x1[i].abs() + x2[j].abs()).mean()) / 2 for i, j in rows)
    single = calculate_bias_metrics(act1, act2)["layer_metrics"]["mlp_output_layer_3"]
    assert single["normalized_difference"] == pytest.approx(num / den, rel=1e-5)
    assert plain["pairs"][0]["metrics"]["layer_metrics"]["mlp_output_layer_3"]["normalized_difference"] == pytest.approx(
        num / den, rel=1e-4
    )
