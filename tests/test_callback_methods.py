"""The scorer a PruningCallback resolves to: prune_model's defaults, and clear errors for missing data."""

from __future__ import annotations

import pytest

from optipfair_train.callbacks.methods import resolve_method


@pytest.mark.parametrize(
    ("pruning_type", "gradients", "calibration", "expected"),
    [
        ("MLP_GLU", False, True, "hybrid"),  # prune_model's default with calibration data
        ("MLP", False, True, "hybrid"),
        ("ATTENTION", False, True, "activation"),  # heads have no hybrid score
        ("MLP_GLU", True, True, "taylor"),  # the training's own gradients first
        ("MLP_GLU", False, False, None),  # left to the engine's weight-only default
        ("DEPTH", False, True, "importance"),
        ("DEPTH", True, False, "taylor"),
    ],
)
def test_defaults(pruning_type, gradients, calibration, expected):
    assert resolve_method(pruning_type, None, None, has_gradients=gradients, has_calibration=calibration) == expected


@pytest.mark.parametrize(
    ("pruning_type", "method", "message"),
    [
        ("MLP_GLU", "hybrid", "The 'hybrid' scorer needs calibration data: pass dataloader="),
        ("MLP_GLU", "reconstruction", "The 'reconstruction' scorer needs calibration data"),
        ("ATTENTION", "activation", "The 'activation' scorer needs calibration data"),
        ("MLP_GLU", "taylor", "needs importance=GradientImportanceCallback()"),
        ("ATTENTION", "hybrid", "Unknown head importance method 'hybrid' for ATTENTION"),
        ("MLP_GLU", "bogus", "Unknown neuron selection method 'bogus'"),
    ],
)
def test_a_scorer_without_its_data_is_refused(pruning_type, method, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_method(pruning_type, method, None, has_gradients=False, has_calibration=False)


def test_weight_only_and_fairness_scorers_need_no_calibration():
    for method, name in (("MAW", "MAW"), ("PPM", "MAW"), ("fairness", "fairness")):
        assert resolve_method("MLP_GLU", method, None, has_gradients=False, has_calibration=False) == name
