"""The plan battery: requests -> plan -> apply against the engine's earlier behaviour, on every tiny family.

Reference outputs (tests/data/plan_reference.json) were written by tests/plan_reference.py with the
engine as it was before pruning went through plan/apply.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from plan_reference import CASES, FAMILIES, REFERENCE, case_arguments, checksum, make_tiny_model

from optipfair_train.analysis import count_parameters
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import (
    DepthRequest,
    HeadRequest,
    HiddenRequest,
    MLPWidthRequest,
    PruningPlan,
    apply,
    plan,
    prune_model,
    pruning_request,
)
from optipfair_train.pruning.plan import meta_twin

_REFERENCE = json.loads(REFERENCE.read_text())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_model_reproduces_the_reference(family):
    """prune_model (now request -> plan -> apply) gives the earlier engine's output for every case."""
    for name in CASES:
        model = make_tiny_model(family)
        kwargs = case_arguments(family, name, model)
        key = f"{family}/{name}"
        if kwargs is None:
            assert key not in _REFERENCE
            continue
        expected = _REFERENCE[key]
        if "refused" in expected:
            with pytest.raises(ValueError, match=re.escape(expected["refused"][:40])):
                prune_model(model, show_progress=False, **kwargs)
            continue
        _, stats = prune_model(model, show_progress=False, return_stats=True, **kwargs)
        assert count_parameters(model) == expected["parameters"], key
        event, old = json.loads(json.dumps(stats["event"])), expected["event"]
        assert {k: v for k, v in event.items() if k in old} == old, key
        tolerance = 1e-6 if kwargs.get("reconstruct") or kwargs.get("replace_with_linear") else 1e-12
        for got, want in zip(checksum(model), expected["checksum"], strict=True):
            assert math.isclose(got, want, rel_tol=tolerance), key


def _requests(family: str, model: torch.nn.Module) -> list:
    """Data-free requests on every axis the family has."""
    out = [MLPWidthRequest(remove=32, method="L2"), DepthRequest(remove=1, method="last")]
    if get_adapter(model).family.separate_qkv:
        out.append(HeadRequest(remove=1, method="L2"))
    if get_adapter(model).has_hidden_axis:
        out.append(HiddenRequest(remove=16, method="L2"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_on_meta_copy_matches_real_plan_and_apply_matches_prune_model(family):
    model = make_tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    for request in _requests(family, model):
        real = plan(model, [request])
        _same_weights_dict(model.state_dict(), before)  # plan never changes the model
        meta = plan(meta_twin(model), [request])
        # positional depth selection needs no weight values: the meta plan is the whole plan
        assert meta.shape_only == (request.kind != "depth") and not real.shape_only
        assert meta.summary() == real.summary()
        if request.kind == "depth":
            assert meta.to_json() == real.to_json()

        applied, reference = copy.deepcopy(model), copy.deepcopy(model)
        apply(applied, real)
        kwargs = {"mlp": dict(neuron_selection_method="L2", pruning_percentage=25)}.get(request.kind, {})
        if request.kind == "heads":
            kwargs = dict(
                neuron_selection_method="L2", pruning_percentage=100 / get_adapter(model).head_counts(0)[1]
            )
        if request.kind == "depth":
            kwargs = dict(num_layers_to_remove=1, layer_selection_method="last")
        if request.kind == "hidden":  # 25% of 64 channels, a multiple of the 4 heads
            kwargs = dict(neuron_selection_method="L2", pruning_percentage=25)
        ptype = {"mlp": "MLP", "heads": "ATTENTION", "depth": "DEPTH", "hidden": "HIDDEN"}[request.kind]
        prune_model(reference, ptype, show_progress=False, **kwargs)
        _same_weights(applied, reference)
        assert applied.config.pruning_history == reference.config.pruning_history


def _same_weights_dict(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_plan_applied_to_a_fresh_copy_gives_the_same_model(tmp_path, calibration_batches):
    model = make_tiny_model("llama")
    requests = [
        MLPWidthRequest(remove=32, method="activation", reconstruct=True, calibrated=True),
        HeadRequest(remove=1, calibrated=True),
        DepthRequest(remove=1, replace_with_linear=True, calibrated=True),
    ]
    p = plan(model, requests, calibration_batches)
    assert [s.kind for s in p.steps] == ["depth", "heads", "mlp"]
    p.save(tmp_path)
    loaded = PruningPlan.load(tmp_path)
    assert loaded.to_json() == p.to_json()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply(a, p)
    apply(b, loaded)
    _same_weights(a, b)
    assert count_parameters(a) == p.parameters_after
    # the JSON alone names the refit weights it needs, and says where they are
    with pytest.raises(ValueError, match="plan-tensors.safetensors"):
        PruningPlan.from_json(p.to_json())


def test_one_plan_of_three_axes_equals_the_axes_one_after_another(calibration_batches):
    model = make_tiny_model("qwen2")
    requests = [
        MLPWidthRequest(remove=32, calibrated=True),
        HeadRequest(remove=1, granularity="query", calibrated=True),
        DepthRequest(remove=1, calibrated=True),
    ]
    together = copy.deepcopy(model)
    events = apply(together, plan(together, requests, calibration_batches))
    assert [e["pruning_type"] for e in events] == ["DEPTH", "ATTENTION", "MLP"]

    stepwise = copy.deepcopy(model)
    for request in (requests[2], requests[1], requests[0]):
        apply(stepwise, plan(stepwise, [request], calibration_batches))
    _same_weights(together, stepwise)
    assert together.config.pruning_history == stepwise.config.pruning_history


def test_apply_to_another_model_is_refused_before_any_change():
    model = make_tiny_model("llama")
    p = plan(model, [MLPWidthRequest(remove=16, method="L2")])
    cases = {
        "family": make_tiny_model("qwen2"),
        "intermediate_sizes of layer 0": make_tiny_model("llama", intermediate_size=96),
        "num_layers": prune_model(make_tiny_model("llama"), "DEPTH", layer_indices=[3], show_progress=False),
        "pruning_history": make_tiny_model("llama"),
    }
    cases["pruning_history"].config.pruning_history = [
        {"pruning_type": "MLP_GLU"}
    ]  # same shapes, pruned before
    for mismatch, other in cases.items():
        state = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match=f"another model \\({mismatch}"):
            apply(other, p)
        _same_weights_dict(other.state_dict(), state)
    # a plan made on shapes only is refused on real weights
    with pytest.raises(ValueError, match="meta-device"):
        apply(model, plan(meta_twin(model), [MLPWidthRequest(remove=16, method="L2")]))


@pytest.mark.parametrize(
    ("family", "request_", "message"),
    [
        (
            "llama",
            MLPWidthRequest(remove=128, method="L2"),
            "Cannot remove 128 neurons from layer 0, which has 128",
        ),
        ("llama", HeadRequest(remove=2, method="L2"), "would remove all heads of layer 0"),
        ("llama", DepthRequest(remove=4, method="last"), "Cannot remove 4 of 4 layers"),
        ("gpt2", HeadRequest(remove=1, method="L2"), "gpt2 fuses them"),
        ("gpt2", MLPWidthRequest(remove=8, method="L2", glu_only=True), "plain \\(non-GLU\\) MLP"),
        ("llama", MLPWidthRequest(remove=8, method="L2", layer_indices=[7]), "layer index 7 out of range"),
    ],
)
def test_impossible_requests_are_refused_at_plan(family, request_, message):
    with pytest.raises(ValueError, match=message):
        plan(make_tiny_model(family), [request_])


def test_bad_requests_are_refused_where_they_are_made():
    for kwargs, message in [
        (dict(pruning_percentage=True), "strictly between 0 and 100, got True"),
        (dict(remove=0), "remove must be an integer > 0"),
        (dict(remove=8, pruning_percentage=10), "Give only one of"),
        (dict(method="activation"), "needs calibration data"),
        (dict(reconstruct=True), "reconstruct=True needs calibration data"),
    ]:
        with pytest.raises(ValueError, match=message):
            MLPWidthRequest(**kwargs)
    with pytest.raises(ValueError, match="got True"):
        prune_model(make_tiny_model("llama"), pruning_percentage=True, show_progress=False)
    with pytest.raises(ValueError, match="calibrated=True"):
        plan(make_tiny_model("llama"), [MLPWidthRequest(remove=8, calibrated=True)])


def test_non_finite_weights_are_refused_at_plan_naming_the_parameter(calibration_batches):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, 5] = float("nan")
    state = copy.deepcopy(model.state_dict())
    for request in (MLPWidthRequest(remove=8, calibrated=True), HeadRequest(remove=1, method="L2")):
        with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj.weight holds 1 NaN/Inf"):
            plan(model, [request], calibration_batches)
    state_now = model.state_dict()
    assert all(
        torch.equal(
            state[k],
            state_now[k],
        )
        or k.endswith("gate_proj.weight")
        for k in state
    )
    assert torch.isnan(state_now["model.layers.1.mlp.gate_proj.weight"]).sum() == 1


def test_a_plan_that_removes_nothing_records_no_history():
    model = make_tiny_model("llama")
    _, stats = prune_model(model, neuron_selection_method="L2", pruning_percentage=0.5, return_stats=True)
    assert stats["reduction"] == 0 and stats["event"] is None
    assert not getattr(model.config, "pruning_history", None)


def test_plan_json_is_readable_and_records_scores_and_counts():
    model = make_tiny_model("llama")
    p = plan(model, [pruning_request("MLP_GLU", neuron_selection_method="L2", pruning_percentage=25)])
    data = json.loads(p.to_json())
    layer = data["steps"][0]["layers"]["0"]
    assert len(layer["keep"]) == 96 and len(layer["scores"]) == 128
    # the kept neurons are the 96 best scores
    ranked = sorted(range(128), key=lambda i: -layer["scores"][i])[:96]
    assert sorted(ranked) == layer["keep"]
    assert data["fingerprint"]["intermediate_sizes"] == [128] * 4
    assert data["steps"][0]["parameters_before"] - data["steps"][0]["parameters_after"] == 4 * 32 * 3 * 64


def test_the_scorer_registry_refuses_a_taken_name():
    from optipfair_train.pruning import get_scorer, register_scorer

    maw = get_scorer("MAW")
    for name in ("maw", "PPM"):  # a name or an alias, any case
        with pytest.raises(ValueError, match="already registered"):
            register_scorer(name)(lambda parts, context: torch.ones(parts.intermediate_size))
    assert get_scorer("MAW") is maw


def test_the_plan_docstring_example_runs():
    """help(optipfair_train.pruning.plan) shows this example; it must run as written."""
    import doctest
    import sys

    import optipfair_train.pruning  # noqa: F401  (the submodule below is loaded with the package)

    module = sys.modules["optipfair_train.pruning.plan"]
    assert ">>> p = plan(model" in module.plan.__doc__
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 8 and result.failed == 0


def test_a_plan_needs_a_request():
    with pytest.raises(ValueError, match="at least one request"):
        plan(make_tiny_model("llama"), [])
