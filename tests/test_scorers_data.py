"""Data-driven scorers (hybrid, fluctuation, reconstruction), their statistics and sensitivity allocation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_scorers_targets import DOWN, GATE, UP, _mlp

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter, weight_out_in
from optipfair_train.pruning import as_batches, plan_mlp_width
from optipfair_train.pruning.calibration import InputMoments, mlp_input_statistics
from optipfair_train.pruning.scorers import RECONSTRUCTION_DAMPING, ScoringContext, get_scorer
from optipfair_train.pruning.width import _sensitivity_allocation, layer_sensitivity

# Three tokens of the down_proj input (neurons 0..2); DOWN column squared norms are [1, 9, 4].
TOKENS = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 2.0]], dtype=torch.float64)


def _moments(x: torch.Tensor, batch_norms: torch.Tensor | None = None) -> InputMoments:
    sumsq = (x * x).sum(0)
    norms = sumsq.sqrt() if batch_norms is None else batch_norms
    return InputMoments(float(x.shape[0]), x.sum(0), sumsq, norms)


def test_hybrid_is_batch_norms_times_normalised_ppm_of_gate_up_down():
    # PPM gate rows [4, 1, 4] / 4, up rows [2, 4, 1] / 4, down columns [1, 3, 2] / 3
    # magnitude = [1 + .5 + 1/3, .25 + 1 + 1, 1 + .25 + 2/3] = [11/6, 9/4, 23/12]
    moments = _moments(TOKENS, batch_norms=torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))
    scores = get_scorer("hybrid")(_mlp(GATE, UP, DOWN), ScoringContext(0, input_moments=moments))
    assert torch.allclose(scores, torch.tensor([2 * 11 / 6, 9 / 4, 3 * 23 / 12]), atol=1e-5)
    assert scores.topk(2).indices.sort().values.tolist() == [0, 2]


def test_fluctuation_is_variance_times_squared_down_column_norm():
    # variances over the three tokens: [1, 3, 0] (neuron 2 is constant: a bias can replace it)
    context = ScoringContext(0, input_moments=_moments(TOKENS))
    scores = get_scorer("fluctuation")(_mlp(GATE, UP, DOWN), context)
    assert torch.allclose(scores, torch.tensor([1.0 * 1, 3.0 * 9, 0.0]), atol=1e-5)
    assert scores.topk(2).indices.sort().values.tolist() == [0, 1]


def test_reconstruction_with_uncorrelated_inputs_is_energy_times_column_norm():
    gram = torch.diag(torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64))
    damping = RECONSTRUCTION_DAMPING * 14 / 3
    scores = get_scorer("reconstruction")(_mlp(GATE, UP, DOWN), ScoringContext(0, input_gram=gram))
    expected = torch.tensor([1 * (4 + damping), 9 * (1 + damping), 4 * (9 + damping)])
    assert torch.allclose(scores, expected.float(), rtol=1e-5)


def test_reconstruction_equals_least_error_after_refit_and_spares_unique_neurons():
    # neurons 0 and 1 always fire together (one can stand in for the other); neuron 2 is weaker but alone
    x = torch.tensor([[2.0, 2.0, 0.0], [1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, -1.0]]).double()
    down = [[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]]
    parts = _mlp(GATE, UP, down)
    gram = x.T @ x
    scores = get_scorer("reconstruction")(parts, ScoringContext(0, input_gram=gram)).double()
    h = gram + RECONSTRUCTION_DAMPING * gram.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    w = torch.tensor(down, dtype=torch.float64)
    for i in range(3):
        rest = [j for j in range(3) if j != i]
        # best refit of the other columns under the (damped) quadratic error tr((W - W') H (W - W')^T)
        refit = w @ h[:, rest] @ torch.linalg.inv(h[rest][:, rest])
        delta = w.clone()
        delta[:, rest] -= refit
        assert torch.isclose(scores[i], torch.trace(delta @ h @ delta.T), rtol=1e-6)
    assert scores.argmax().item() == 2
    activation = get_scorer("activation")(parts, ScoringContext(0, activation_sumsq=(x * x).sum(0)))
    assert activation.argmin().item() == 2  # the norm-based score would cut it first


def test_input_statistics_equal_manual_capture_and_ignore_padding(tokenizer):
    model = make_tiny_model("llama")
    texts = ["Short text.", "A somewhat longer sentence here."]
    padded = dict(tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt"))
    second = dict(tokenizer(["Another one."], return_tensors="pt"))
    stats = mlp_input_statistics(model, as_batches([padded, second]))

    captured = []
    handle = get_adapter(model).mlp(1).down.register_forward_pre_hook(lambda m, a: captured.append(a[0][0]))
    with torch.no_grad():
        for t in [*texts, "Another one."]:
            model(**tokenizer([t], return_tensors="pt"))
    handle.remove()
    x = [c.double() for c in captured]
    first, last = torch.cat(x[:2]), x[2]
    everything = torch.cat(x)
    got = stats[1]
    assert got.tokens == everything.shape[0]
    assert torch.allclose(got.sum, everything.sum(0), rtol=1e-4, atol=1e-4)
    assert torch.allclose(got.sumsq, (everything**2).sum(0), rtol=1e-4)
    # OptiPFair's statistic: one L2 norm per batch, summed over batches
    assert torch.allclose(got.batch_norms, first.norm(dim=0) + last.norm(dim=0), rtol=1e-4)
    assert torch.allclose(got.variance, everything.var(dim=0), rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("method", ["hybrid", "fluctuation", "reconstruction"])
def test_new_scorers_prune_a_model_and_need_data(method, calibration_batches):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(model, neuron_selection_method=method, pruning_percentage=25, show_progress=False)
    assert get_adapter(model).intermediate_sizes() == [128] * get_adapter(model).num_layers
    prune_model(
        model,
        neuron_selection_method=method,
        pruning_percentage=25,
        dataloader=calibration_batches,
        show_progress=False,
    )
    assert get_adapter(model).intermediate_sizes() == [96] * get_adapter(model).num_layers


def test_layer_sensitivity_is_share_of_output_energy_removed():
    gram = torch.diag(torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64))
    # output energy per neuron = column norm^2 * G_ii = [4, 9, 36]; removing neuron 1 -> 9 / 49
    result = layer_sensitivity({0: _mlp(GATE, UP, DOWN)}, {0: gram}, {0: torch.tensor([0, 2])})
    assert result[0] == pytest.approx(9 / 49)


def test_sensitivity_allocation_removes_in_inverse_proportion_and_respects_the_floor():
    widths = {0: 10, 1: 10}
    # 4 removals, weights 1/0.1 = 10 and 1/0.3: layer 0 loses 3, layer 1 loses 1
    assert _sensitivity_allocation({0: 0.1, 1: 0.3}, widths, {0: 8, 1: 8}, None) == {0: 7, 1: 9}
    # 10 removals, layer 0 would lose 9.9 but keeps its floor of 1 neuron; layer 1 takes the rest
    assert _sensitivity_allocation({0: 0.01, 1: 1.0}, widths, {0: 5, 1: 5}, None) == {0: 1, 1: 9}


def test_sensitivity_plan_keeps_the_total_and_protects_the_sensitive_layer(calibration_batches):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    with torch.no_grad():
        weight_out_in(adapter.mlp(2).down)[:, :100] = 0  # layer 2: 100 dead neurons, a free cut
    with pytest.raises(ValueError, match="calibration batches"):
        plan_mlp_width(model, method="activation", pruning_percentage=50, layer_allocation="sensitivity")
    plan = plan_mlp_width(
        model,
        method="activation",
        pruning_percentage=50,
        batches=calibration_batches,
        layer_allocation="sensitivity",
    )
    sizes = {i: len(k) for i, k in plan.items()}
    assert sum(sizes.values()) == 64 * adapter.num_layers
    assert sizes[2] < 64 and all(sizes[i] > 64 for i in sizes if i != 2)


def test_default_scorer_is_hybrid_with_data_and_activation_when_sequential(calibration_batches):
    _, stats = prune_model(
        make_tiny_model("llama"), dataloader=calibration_batches, show_progress=False, return_stats=True
    )
    assert stats["event"]["method"] == "hybrid"
    _, stats = prune_model(
        make_tiny_model("llama"),
        dataloader=calibration_batches,
        reconstruct=True,
        sequential=True,
        show_progress=False,
        return_stats=True,
    )
    assert stats["event"]["method"] == "activation"
