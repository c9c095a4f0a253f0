"""The scorer a PruningCallback resolves to: the engine's defaults (one definition, in
optipfair_train.pruning.requests), and clear errors for missing data, at construction."""

from __future__ import annotations

import pytest
import torch

from optipfair_train.bias import StereoSetItem
from optipfair_train.callbacks import GradientImportanceCallback, PruningCallback

_DATA = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]  # never run at construction


def _callback(pruning_type: str, method: str | None = None, *, gradients: bool, calibration: bool, **kwargs):
    key = "layer_selection_method" if pruning_type == "DEPTH" else "neuron_selection_method"
    return PruningCallback(
        target=50,
        step=2,
        pruning_type=pruning_type,
        dataloader=_DATA if calibration else None,
        importance=GradientImportanceCallback() if gradients else None,
        **({key: method} if method else {}),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("pruning_type", "gradients", "calibration", "expected"),
    [
        ("MLP_GLU", False, True, "hybrid"),  # prune_model's default with calibration data
        ("MLP", False, True, "hybrid"),
        ("ATTENTION", False, True, "activation"),  # heads have no hybrid score
        ("MLP_GLU", True, True, "taylor"),  # the training's own gradients first
        ("MLP_GLU", False, False, "MAW"),  # the engine's weight-only default (with a warning)
        ("ATTENTION", False, False, "L2"),
        ("DEPTH", False, True, "importance"),
        ("DEPTH", True, False, "taylor"),
        ("DEPTH", False, False, "last"),
    ],
)
def test_defaults(pruning_type, gradients, calibration, expected):
    assert _callback(pruning_type, gradients=gradients, calibration=calibration).method == expected


@pytest.mark.parametrize(
    ("pruning_type", "method", "message"),
    [
        ("MLP_GLU", "hybrid", "Scorer 'hybrid' needs calibration data: pass dataloader="),
        ("MLP_GLU", "reconstruction", "Scorer 'reconstruction' needs calibration data"),
        ("ATTENTION", "activation", "Head importance 'activation' needs calibration data"),
        ("MLP_GLU", "taylor", "importance=GradientImportanceCallback()"),
        ("ATTENTION", "hybrid", "Unknown head importance method 'hybrid'"),
        (
            "ATTENTION",
            "fairness",
            "Head importance 'fairness' scores heads on StereoSet items: pass bias_items",
        ),
        ("MLP_GLU", "bogus", "Unknown neuron selection method 'bogus'"),
        ("DEPTH", "importance", "measures blocks on calibration data"),
    ],
)
def test_a_scorer_without_its_data_is_refused(pruning_type, method, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _callback(pruning_type, method, gradients=False, calibration=False)


def test_weight_only_and_fairness_scorers_need_no_calibration():
    for method, name in (("MAW", "MAW"), ("PPM", "MAW")):
        assert _callback("MLP_GLU", method, gradients=False, calibration=False).method == name
    pairs = {"bias_pairs": [("He is a doctor.", "She is a doctor.")]}
    fairness = _callback("MLP_GLU", "fairness", gradients=False, calibration=False, prune_kwargs=pairs)
    assert fairness.method == "fairness"
    with pytest.raises(ValueError, match="needs bias_pairs"):
        _callback("MLP_GLU", "fairness", gradients=False, calibration=False)
    items = {"bias_items": [StereoSetItem("intersentence", "t", "gender", "He is.", "a", "b", "c")]}
    heads = _callback("ATTENTION", "fairness", gradients=False, calibration=False, prune_kwargs=items)
    assert heads.method == "fairness"
    with pytest.raises(ValueError, match="fairness_lambda must be a finite number >= 0"):
        _callback(
            "ATTENTION",
            "fairness",
            gradients=False,
            calibration=False,
            prune_kwargs=items | {"fairness_lambda": -1},
        )
