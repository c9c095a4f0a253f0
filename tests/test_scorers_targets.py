"""Scorers against hand-computed values, and width targets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from optipfair_train.arch import MLPParts, get_adapter
from optipfair_train.pruning import as_batches, mlp_activation_sumsq, neuron_scores, plan_mlp_width
from optipfair_train.pruning.scorers import ScoringContext, get_scorer
from optipfair_train.pruning.targets import kept_width, layers_to_remove_count, width_for_parameter_budget


def _mlp(gate: list[list[float]], up: list[list[float]], down: list[list[float]]) -> MLPParts:
    layers = []
    for w in (gate, up, down):
        w = torch.tensor(w)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        layers.append(lin)
    return MLPParts(module=nn.Module(), gate=layers[0], up=layers[1], down=layers[2])


# Three neurons, hidden size 2.  Hand computation per neuron i (rows of gate / up):
#   gate = [[1, -3], [0.5, 0.5], [2, 2]]     up = [[1, 1], [-4, 0], [0, 1]]
#   MAW: (max + |min|) gate + up = [1+3, .5+.5, 2+2] + [1+1, 0+4, 1+0] = [6, 5, 5]
#   VOW: var(gate) + var(up) (unbiased, n=2: (a-b)^2/2) = [8, 0, 0] + [0, 8, .5] = [8, 8, .5]
#   PON: |gate|_1 * |up|_1 = [4, 1, 4] * [2, 4, 1] = [8, 4, 4]
#   L2: |gate|_2 + |up|_2 = [sqrt10 + sqrt2, sqrt.5 + 4, sqrt8 + 1] = [4.576, 4.707, 3.828]
GATE = [[1.0, -3.0], [0.5, 0.5], [2.0, 2.0]]
UP = [[1.0, 1.0], [-4.0, 0.0], [0.0, 1.0]]
DOWN = [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]  # column norms: [1, 3, 2]


@pytest.mark.parametrize(
    "method, expected",
    [
        ("MAW", [6.0, 5.0, 5.0]),
        ("PPM", [6.0, 5.0, 5.0]),
        ("VOW", [8.0, 8.0, 0.5]),
        ("PON", [8.0, 4.0, 4.0]),
        ("L2", [10**0.5 + 2**0.5, 0.5**0.5 + 4.0, 8**0.5 + 1.0]),
    ],
)
def test_weight_scorers_match_hand_computation(method, expected):
    scores = get_scorer(method)(_mlp(GATE, UP, DOWN), ScoringContext(0))
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)


def test_activation_scorer_is_rms_times_down_column_norm():
    sumsq = torch.tensor([4.0, 1.0, 9.0])
    scores = get_scorer("activation")(_mlp(GATE, UP, DOWN), ScoringContext(0, activation_sumsq=sumsq))
    assert torch.allclose(scores, torch.tensor([2.0 * 1, 1.0 * 3, 3.0 * 2]))


def test_activation_scorer_without_data_names_the_alternatives():
    with pytest.raises(ValueError, match="needs calibration data.*MAW"):
        get_scorer("activation")(_mlp(GATE, UP, DOWN), ScoringContext(0))


def test_unknown_scorer_lists_available():
    with pytest.raises(ValueError, match="Available: .*MAW.*activation"):
        get_scorer("magic")


@pytest.mark.parametrize("method", ["MAW", "VOW", "PON", "L2"])
def test_kept_indices_on_tiny_model_equal_reference(method):
    """Kept neurons of a real tiny model equal an independent per-row computation."""
    model = make_tiny_model("llama")
    plan = plan_mlp_width(model, method=method, pruning_percentage=30)
    adapter = get_adapter(model)
    for i, kept in plan.items():
        g, u = adapter.mlp(i).gate.weight.detach(), adapter.mlp(i).up.weight.detach()
        ref = []
        for row in range(g.shape[0]):
            a, b = g[row].tolist(), u[row].tolist()
            if method == "MAW":
                ref.append(max(a) + abs(min(a)) + max(b) + abs(min(b)))
            elif method == "VOW":
                ref.append(torch.tensor(a).var().item() + torch.tensor(b).var().item())
            elif method == "PON":
                ref.append(sum(map(abs, a)) * sum(map(abs, b)))
            else:
                ref.append(sum(x * x for x in a) ** 0.5 + sum(x * x for x in b) ** 0.5)
        k = 128 - int(0.3 * 128)
        expected = sorted(sorted(range(128), key=lambda j: -ref[j])[:k])
        assert kept.tolist() == expected


def test_random_scorer_is_seeded():
    model = make_tiny_model("llama")
    a = plan_mlp_width(model, method="random", pruning_percentage=50, seed=1)
    b = plan_mlp_width(model, method="random", pruning_percentage=50, seed=1)
    c = plan_mlp_width(model, method="random", pruning_percentage=50, seed=2)
    assert all(torch.equal(a[i], b[i]) for i in a)
    assert not all(torch.equal(a[i], c[i]) for i in a)


def test_activation_sumsq_equals_manual_and_ignores_padding(tokenizer):
    model = make_tiny_model("qwen2")
    texts = ["Short text.", "A somewhat longer sentence here."]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    stats = mlp_activation_sumsq(model, as_batches([batch]))

    # manual reference: run each text alone (no padding at all), capture down_proj input of layer 1
    adapter = get_adapter(model)
    captured = []
    handle = adapter.mlp(1).down.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    with torch.no_grad():
        for t in texts:
            model(**tokenizer([t], return_tensors="pt"))
    handle.remove()
    manual = sum((x.double() ** 2).sum(0) for x in captured)
    assert torch.allclose(stats[1].double(), manual, rtol=1e-4)

    # extra padding columns and an all-padding row change nothing
    padded = dict(tokenizer(texts + [""], padding="max_length", max_length=40, return_tensors="pt"))
    stats_padded = mlp_activation_sumsq(model, as_batches([padded]))
    for i in stats:
        assert torch.allclose(stats[i], stats_padded[i], rtol=1e-4)
    keep = plan_mlp_width(model, method="activation", pruning_percentage=40, batches=as_batches([batch]))
    keep_padded = plan_mlp_width(
        model, method="activation", pruning_percentage=40, batches=as_batches([padded])
    )
    assert all(torch.equal(keep[i], keep_padded[i]) for i in keep)


def test_global_allocation_keeps_total_and_moves_width_to_where_it_matters(calibration_batches):
    model = make_tiny_model("llama")
    # 100 of layer 2's 128 neurons are dead (their down_proj columns are zero): a global ranking
    # should take its cuts there and let the other layers keep more than the uniform 64
    with torch.no_grad():
        get_adapter(model).mlp(2).down.weight[:, :100] = 0
    batches = as_batches(calibration_batches)
    plan = plan_mlp_width(
        model, method="activation", pruning_percentage=50, batches=batches, layer_allocation="global"
    )
    widths = {i: len(k) for i, k in plan.items()}
    assert sum(widths.values()) == 4 * 64
    assert widths[2] <= 28 and all(widths[i] > 64 for i in (0, 1, 3))
    assert set(plan[2].tolist()) >= set(range(100, 128))  # the live neurons are all kept
    uniform = plan_mlp_width(model, method="activation", pruning_percentage=50, batches=batches)
    assert {len(k) for k in uniform.values()} == {64}


def test_neuron_scores_subset_of_layers():
    scores = neuron_scores(make_tiny_model("llama"), "L2", layer_indices=[1, 3])
    assert sorted(scores) == [1, 3] and scores[1].shape == (128,)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(pruning_percentage=20), 1229),  # 1536 - int(307.2)
        (dict(pruning_percentage=99.99), 1),  # never below one neuron
        (dict(expansion_rate=200), 1152),  # 2 x 576
        (dict(expansion_rate=200, expansion_divisor=100), 1100),  # rounded down, never up
        (dict(pruning_percentage=10, expansion_divisor=128), 1280),  # 1383 -> 1280
    ],
)
def test_kept_width(kwargs, expected):
    assert kept_width(1536, hidden_size=576, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pruning_percentage=0), "strictly between 0 and 100"),
        (dict(pruning_percentage=100), "strictly between 0 and 100"),
        (dict(pruning_percentage=-5), "strictly between 0 and 100"),
        (dict(expansion_rate=300), "would not shrink"),
        (dict(expansion_rate=0.1), "fewer than one neuron"),
        (dict(pruning_percentage=10, expansion_rate=100), "exactly one"),
        (dict(), "exactly one"),
        (dict(pruning_percentage=50, expansion_divisor=1000), "larger than the width"),
        (dict(pruning_percentage=50, expansion_divisor=0), "positive integer"),
    ],
)
def test_kept_width_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kept_width(1536, hidden_size=576, **kwargs)


def test_parameter_budget():
    # 2 layers of 10 neurons, 30 parameters per neuron: removing 300 parameters needs 5 neurons per layer
    assert width_for_parameter_budget(1000, 700, [10, 10], params_per_neuron=30) == 5
    assert width_for_parameter_budget(1000, 701, [10, 10], params_per_neuron=30) == 5  # at most the budget
    with pytest.raises(ValueError, match="not below"):
        width_for_parameter_budget(1000, 1000, [10, 10], params_per_neuron=30)
    with pytest.raises(ValueError, match="cannot be reached"):
        width_for_parameter_budget(1000, 100, [10, 10], params_per_neuron=30)


def test_layers_to_remove_count():
    assert layers_to_remove_count(30, None, 10) == 3
    assert layers_to_remove_count(30, 2, None) == 2
    with pytest.raises(ValueError, match="at least one must stay"):
        layers_to_remove_count(4, 4, None)
    with pytest.raises(ValueError, match="exactly one"):
        layers_to_remove_count(4, 1, 10)
