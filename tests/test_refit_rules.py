"""Each pruning rule and default is defined once: the requests, prune_model, the streamed path, the
pipeline's config and the command line all reach the same function or table, each worded for its user."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train import cli_parser
from optipfair_train.names import DEFAULT_METHODS
from optipfair_train.pipeline.config import PruningConfig, load_config
from optipfair_train.pruning import MLPWidthRequest, default_method, pruning_request
from optipfair_train.pruning.io import MANIFEST_NAME
from optipfair_train.pruning.reconstruction import plan_refits
from optipfair_train.pruning.streamed import prune_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "optipfair_train"


def _refused(make, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        make(*args, **kwargs)
    return str(info.value)


def test_sequential_without_reconstruct_is_one_rule_in_two_wordings():
    request = _refused(MLPWidthRequest, remove=1, sequential=True, calibrated=True)
    config = _refused(load_config, None, ["--sequential", "true"])
    assert request == "sequential=True applies to the refit: pass reconstruct=True as well."
    assert config == "sequential: true applies to the refit: set reconstruct: true as well."


def test_refit_with_only_depth_pruning_is_one_rule_in_two_wordings():
    engine = _refused(pruning_request, "DEPTH", num_layers_to_remove=1, reconstruct=True)
    flags = ["--mlp_pruning_percentage", "0", "--num_layers_to_remove", "1", "--reconstruct", "true"]
    config = _refused(load_config, None, flags)
    # the same sentence, with each caller's spelling of the settings
    assert engine.replace("=True", ": true") == config
    assert engine.startswith("reconstruct=True refits down_proj") and "nothing to refit" in engine
    # with a width to refit, the same settings pass
    assert load_config(None, ["--reconstruct", "true"]).pruning.reconstruct is True


@pytest.mark.parametrize("damping", [-1.0, math.nan, math.inf, True, "0.1"])
def test_every_refit_refuses_a_bad_damping_with_the_same_message(damping):
    expected = f"damping must be a number >= 0 (default 0.01), got {damping!r}."
    assert _refused(MLPWidthRequest, remove=1, reconstruct=True, calibrated=True, damping=damping) == expected
    model = make_tiny_model("llama")
    assert _refused(plan_refits, model, "mlp", {0: torch.tensor([0, 1])}, {}, damping=damping) == expected
    if isinstance(damping, float) and math.isfinite(damping):  # the config refuses nan/inf as not finite
        config = _refused(load_config, None, ["--reconstruct", "true", "--damping", str(damping)])
        assert config == expected


def test_each_rule_message_is_written_once_in_the_package():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    for fragment in (
        "applies to the refit",
        "nothing to refit",
        "damping must be a number >= 0",
        "as kept inputs",
        "whole KV groups) or 'query'",
        "must be distinct and non-empty",
    ):
        holders = [p.name for p, text in sources.items() if re.search(re.escape(fragment), text)]
        # the message itself, plus the doctest that shows it in the one module that raises it
        assert len(holders) == 1, (fragment, holders)
    for constant in (
        "DEFAULT_DAMPING =",
        "LAYER_SELECTION_METHODS =",
        "PRUNING_TYPES =",
        "DEFAULT_METHODS =",
    ):
        holders = [p.name for p, text in sources.items() if re.search(rf"^{constant}", text, re.M)]
        assert holders == ["names.py"], (constant, holders)


def test_every_head_and_layer_choice_is_refused_with_one_message():
    from optipfair_train.callbacks import PruningCallback
    from optipfair_train.pruning import HeadRequest, select_layers_to_remove
    from optipfair_train.pruning.heads import head_keep_counts

    granularity = (
        "head_granularity must be 'group' (whole KV groups) or 'query' (query heads inside groups), got 'kv'."
    )
    assert _refused(HeadRequest, remove=1, method="L2", granularity="kv") == granularity
    assert (
        _refused(PruningCallback, target=50, step=2, pruning_type="ATTENTION", head_granularity="kv")
        == granularity
    )
    model = make_tiny_model("llama")  # 4 layers
    assert _refused(head_keep_counts, model, 50, "kv", None) == granularity
    out_of_range = "layer index 7 out of range: the model has layers 0..3."
    assert _refused(head_keep_counts, model, 50, "group", [0, 7]) == out_of_range
    assert _refused(select_layers_to_remove, model, None, "custom", layer_indices=[7]) == out_of_range
    repeated = "layer_indices must be distinct and non-empty, got [1, 1]."
    assert _refused(head_keep_counts, model, 50, "group", [1, 1]) == repeated
    assert _refused(select_layers_to_remove, model, None, "custom", layer_indices=[1, 1]) == repeated


def test_defaults_come_from_one_table():
    assert default_method("mlp", calibrated=True) == DEFAULT_METHODS["calibrated"]["mlp"] == "hybrid"
    assert default_method("mlp", calibrated=True, sequential=True) == "activation"
    assert default_method("depth", calibrated=False) == DEFAULT_METHODS["weight_only"]["depth"] == "last"
    assert cli_parser.DEFAULT_METHOD == default_method("mlp", calibrated=True)
    pruning = PruningConfig()
    assert pruning.neuron_selection_method == default_method("mlp", calibrated=True)
    assert pruning.layer_selection_method == default_method("depth", calibrated=True)


def test_streamed_pruning_without_a_method_uses_the_requests_sequential_default(tmp_path):
    folder = tmp_path / "source"
    make_tiny_model("llama").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 40), generator=g)} for _ in range(2)]
    out = prune_checkpoint(folder, tmp_path / "out", batches, pruning_percentage=25, show_progress=False)
    event = json.loads((out / MANIFEST_NAME).read_text())["history"][-1]
    assert event["method"] == default_method("mlp", calibrated=True, sequential=True) == "activation"
