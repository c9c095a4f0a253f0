"""One parameter budget across axes (pruning/budget.py): exact, tight, refused before any change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train.analysis import count_parameters
from optipfair_train.pipeline import load_config
from optipfair_train.pruning import apply, budget_requests, parse_shares, plan
from optipfair_train.pruning.axes import AXIS_ORDER
from optipfair_train.pruning.plan import meta_twin

WEIGHT_ONLY = {"mlp": "L2", "heads": "L2", "hidden": "L2", "depth": "last"}

# (family, shares, the adjusting axis: the finest one in the budget, which the rounding rule makes tight)
CASES = [
    ("llama", {"mlp": 1.0}, "mlp"),
    ("llama-tied", {"hidden": 0.5, "mlp": 0.5}, "mlp"),
    ("llama", {"hidden": 0.5, "mlp": 0.5}, "mlp"),
    ("qwen2", {"heads": 0.3, "mlp": 0.7}, "mlp"),
    ("gemma2", {"depth": 0.5, "hidden": 0.5}, "hidden"),
    ("mistral", {"hidden": 1.0}, "hidden"),
    ("qwen3", {"depth": 0.4, "heads": 0.3, "hidden": 0.3}, "hidden"),
    ("gpt2", {"mlp": 0.5, "depth": 0.5}, "mlp"),
]


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.to_dict() == b.config.to_dict()


@pytest.mark.parametrize(("family", "shares", "adjusting"), CASES)
def test_budget_is_met_exactly_and_tightly(family, shares, adjusting):
    model = make_tiny_model(family)
    total = count_parameters(model)
    target = int(total * 0.7)
    requests = budget_requests(model, fraction=0.3, shares=shares, methods=WEIGHT_ONLY)
    kinds = [r.kind for r in requests]
    assert kinds == sorted(kinds, key=AXIS_ORDER.index) and set(kinds) <= set(shares)
    unit = getattr(model.config, "num_attention_heads", 1) if adjusting == "hidden" else 1
    p = plan(model, requests)
    assert p.parameters_after <= target
    apply(model, p)
    assert count_parameters(model) == p.parameters_after
    # one unit fewer of the adjusting axis would be above the target
    fewer = copy.deepcopy(requests)
    step = next(r for r in fewer if r.kind == adjusting)
    if step.remove == unit:
        fewer.remove(step)
    else:
        step.remove -= unit
    assert plan(meta_twin(make_tiny_model(family)), fewer).parameters_after > target


def test_mlp_only_count_by_hand():
    """LLaMA, 4 layers, hidden 64: a neuron is a gate row, an up row and a down column (3 x 64) per layer."""
    model = make_tiny_model("llama")
    total = count_parameters(model)  # 161,344
    target = int(total * 0.7)
    requests = budget_requests(model, fraction=0.3, shares={"mlp": 1.0}, methods=WEIGHT_ONLY)
    per_neuron = 4 * 3 * 64
    expected = -(-(total - target) // per_neuron)  # the fewest neurons per layer reaching the target
    assert [(r.kind, r.remove) for r in requests] == [("mlp", expected)]
    assert plan(model, requests).parameters_after == total - expected * per_neuron


def test_each_fixed_axis_takes_the_nearest_whole_units_of_its_share():
    """hidden 0.5 / mlp 0.5 on tied LLaMA: hidden (fixed) removes the multiple of 4 channels nearest to half
    the parameters to remove, measured on the unpruned model; MLP width (finest) adjusts."""
    model = make_tiny_model("llama-tied")
    total = count_parameters(model)
    goal = total - int(total * 0.5)
    per_four = total - plan(meta_twin(model), budget_requests(model, total - 1, shares={"hidden": 1.0},
                                                              methods=WEIGHT_ONLY)).parameters_after  # fmt: skip
    requests = budget_requests(model, fraction=0.5, shares={"hidden": 0.5, "mlp": 0.5}, methods=WEIGHT_ONLY)
    hidden = next(r for r in requests if r.kind == "hidden")
    assert hidden.remove == 4 * round(0.5 * goal / per_four)


def test_calibrated_budget_with_refits_applies_to_the_planned_count(calibration_batches):
    model = make_tiny_model("llama")
    requests = budget_requests(
        model,
        fraction=0.25,
        shares={"hidden": 0.25, "heads": 0.25, "mlp": 0.5},
        calibrated=True,
        reconstruct=True,
    )
    assert {r.method for r in requests} == {"activation", "hybrid"}
    assert all(r.reconstruct for r in requests)
    p = plan(model, requests, calibration_batches)
    apply(model, p)
    assert (
        count_parameters(model)
        == p.parameters_after
        <= int(count_parameters(make_tiny_model("llama")) * 0.75)
    )
    logits = model(**calibration_batches[0]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("llama", dict(target_parameters=10**9, shares={"mlp": 1.0}), "already reached"),
        ("llama", dict(fraction=0.9, shares={"mlp": 1.0}), "below the smallest model mlp can leave"),
        ("llama", dict(fraction=0.5, shares={"heads": 0.9, "mlp": 0.1}), "heads can remove at most"),
        ("gpt2", dict(fraction=0.2, shares={"hidden": 0.5, "mlp": 0.5}), "cannot prune that axis"),
        ("gpt2", dict(fraction=0.2, shares={"heads": 0.5, "mlp": 0.5}), "separate q/k/v"),
        ("llama", dict(fraction=0.2, target_parameters=1000, shares={"mlp": 1.0}), "exactly one"),
        ("llama", dict(fraction=1.5, shares={"mlp": 1.0}), r"in \(0, 1\)"),
        ("llama", dict(fraction=0.2, shares={"mlp": 1.0}, colour="red"), "Unknown request option 'colour'"),
    ],
)
def test_impossible_budgets_are_refused_before_any_change(family, kwargs, message):
    model = make_tiny_model(family)
    untouched = make_tiny_model(family)
    with pytest.raises(ValueError, match=message):
        budget_requests(model, methods=WEIGHT_ONLY, **kwargs)
    _same_model(model, untouched)


def test_the_smallest_reachable_model_is_named():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError) as err:
        budget_requests(model, 1000, shares={"mlp": 1.0}, methods=WEIGHT_ONLY)
    # all but one neuron of every layer: 161,344 - 127 x 768
    assert f"({161_344 - 127 * 768:,} of 161,344" in str(err.value)


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ({"width": 1.0}, "Unknown budget axis 'width'; accepted: hidden, mlp, heads, depth"),
        ({"mlp": 0.5, "hidden": 0.4}, "must sum to 1, got 0.9"),
        ({"mlp": 1.2, "hidden": -0.2}, "must be a number >= 0"),
        ("mlp=1,hidden", "could not read 'hidden'"),
        ({}, "must map axes to shares"),
    ],
)
def test_shares_are_validated(shares, message):
    with pytest.raises(ValueError, match=message):
        parse_shares(shares)


def test_shares_parse_from_text_and_drop_zero_axes():
    assert parse_shares("hidden=0.25, mlp=0.75,heads=0") == {"hidden": 0.25, "mlp": 0.75}
    assert parse_shares({"mlp": 1}) == {"mlp": 1.0}


def test_budget_is_deterministic(calibration_batches):
    kwargs = dict(fraction=0.3, shares={"hidden": 0.4, "mlp": 0.6}, calibrated=True)
    model = make_tiny_model("qwen2")
    first, second = budget_requests(model, **kwargs), budget_requests(model, **kwargs)
    assert [(r.kind, r.remove, r.method) for r in first] == [(r.kind, r.remove, r.method) for r in second]
    a, b = plan(model, first, calibration_batches), plan(model, second, calibration_batches)
    assert a.to_json() == b.to_json()


def test_query_head_granularity_and_hidden_width_stay_valid_configs():
    """9 query heads in 3 groups (the demo's layout): the hidden width must divide by every head count the
    heads axis can leave (9, 6, 3), so the hidden axis moves in steps of 18 channels."""
    model = make_tiny_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    requests = budget_requests(
        model,
        fraction=0.3,
        shares={"heads": 0.3, "hidden": 0.7},
        methods=WEIGHT_ONLY,
        head_granularity="query",
    )
    hidden = next(r for r in requests if r.kind == "hidden")
    assert hidden.remove % 18 == 0
    apply(model, plan(model, requests))
    model.config.validate()
    assert model.config.hidden_size % model.config.num_attention_heads == 0


DEMO_25 = Path(__file__).resolve().parents[1] / "configs" / "demo-25.yaml"


def test_demo_25_config_spends_a_quarter_of_the_parameters_on_the_searched_axis():
    config = load_config(DEMO_25)
    p = config.pruning
    assert (p.target_fraction, p.mlp_pruning_percentage, config.heal.heal_method) == (0.25, 0, "kd")
    assert parse_shares(p.budget_shares) == {"mlp": 1.0}  # docs/benchmarks/search.md's choice at 25%


@pytest.mark.slow
def test_demo_25_preflight_reaches_three_quarters_of_the_demo_model():
    from optipfair_train.models import load_model_and_tokenizer
    from optipfair_train.pipeline.validate import preflight

    config = load_config(DEMO_25)
    model, _ = load_model_and_tokenizer(config.model.model_path)
    base = {"width": 1536, "kv_heads": 3, "parameters": count_parameters(model)}
    planned = preflight(model, base, config)
    assert len(planned) == 1 and planned[0] <= int(base["parameters"] * 0.75)
    assert planned[0] > int(base["parameters"] * 0.75) - 30 * 3 * 576  # within one neuron per layer
