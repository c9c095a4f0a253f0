"""Reference outputs of ``prune_model`` for the plan battery (tests/test_plan.py).

``tests/data/plan_reference.json`` was written by this script with the engine as it was before pruning
went through ``plan``/``apply``, so the battery compares the new path against the old behaviour:
the units each case keeps, the parameter counts and a per-tensor checksum of the pruned state dict.
Rerun it (``python tests/plan_reference.py``) only on purpose, when pruning behaviour changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import FAMILY_NAMES, PLAIN_CONFIGS, SAMPLE_TEXTS, make_char_tokenizer, make_tiny_model  # noqa: E402

from optipfair_train.analysis import count_parameters  # noqa: E402
from optipfair_train.arch import get_adapter  # noqa: E402
from optipfair_train.pruning import prune_model  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "plan_reference.json"
FAMILIES = FAMILY_NAMES + list(PLAIN_CONFIGS)

# name -> prune_model arguments ("MLP" becomes MLP_GLU on GLU families; "data" adds calibration batches)
CASES: dict[str, dict] = {
    "mlp-maw": dict(pruning_type="MLP", neuron_selection_method="MAW", pruning_percentage=30),
    "mlp-default-data": dict(pruning_type="MLP", pruning_percentage=25, data=True),
    "mlp-activation-refit": dict(
        pruning_type="MLP",
        neuron_selection_method="activation",
        pruning_percentage=25,
        reconstruct=True,
        data=True,
    ),
    "mlp-global-l2": dict(
        pruning_type="MLP", neuron_selection_method="L2", pruning_percentage=40, layer_allocation="global"
    ),
    "mlp-expansion": dict(
        pruning_type="MLP", neuron_selection_method="VOW", expansion_rate=150, expansion_divisor=8
    ),
    "mlp-budget": dict(pruning_type="MLP", neuron_selection_method="PON", target_fraction=0.9),
    "heads-l2": dict(pruning_type="ATTENTION", pruning_percentage=50),
    "heads-query-refit": dict(
        pruning_type="ATTENTION", head_granularity="query", pruning_percentage=50, reconstruct=True, data=True
    ),
    "depth-last": dict(pruning_type="DEPTH", num_layers_to_remove=1),
    "depth-importance": dict(pruning_type="DEPTH", num_layers_to_remove=2, data=True),
    "depth-linear": dict(pruning_type="DEPTH", num_layers_to_remove=2, replace_with_linear=True, data=True),
    "hidden-l2": dict(pruning_type="HIDDEN", neuron_selection_method="L2", pruning_percentage=25),
    "hidden-activation-refit": dict(
        pruning_type="HIDDEN", pruning_percentage=25, reconstruct=True, data=True
    ),
    "hidden-pca": dict(
        pruning_type="HIDDEN", neuron_selection_method="pca", pruning_percentage=25, data=True
    ),
    "mlp-sequential": dict(
        pruning_type="MLP",
        neuron_selection_method="activation",
        pruning_percentage=25,
        reconstruct=True,
        sequential=True,
        data=True,
    ),
}


def calibration() -> list[dict]:
    tokenizer = make_char_tokenizer()
    return [
        dict(tokenizer([SAMPLE_TEXTS[i % 6], SAMPLE_TEXTS[(i + 1) % 6]], padding=True, return_tensors="pt"))
        for i in range(0, 8, 2)
    ]


def case_arguments(family: str, name: str, model: torch.nn.Module) -> dict | None:
    """``prune_model`` keyword arguments of a case on ``model``, or None if the family cannot do it."""
    kwargs = dict(CASES[name])
    adapter = get_adapter(model)
    if kwargs["pruning_type"] == "MLP" and adapter.family.is_glu:
        kwargs["pruning_type"] = "MLP_GLU"
    if kwargs["pruning_type"] == "ATTENTION" and not adapter.family.separate_qkv:
        return None
    if (
        kwargs.get("sequential")
        and getattr(adapter.config, "layer_types", None)
        and len(set(adapter.config.layer_types)) > 1
    ):
        return None
    if "target_fraction" in kwargs:
        kwargs["target_parameters"] = int(count_parameters(model) * kwargs.pop("target_fraction"))
    if kwargs.pop("data", False):
        kwargs["dataloader"] = calibration()
    return kwargs


def checksum(model: torch.nn.Module) -> list[float]:
    """Two float64 sums over the state dict (sorted names): of |v|, and of |v| weighted by position.

    Keeping another unit, or a refit that differs, changes both; the same weights give the same sums.
    """
    total = weighted = 0.0
    for k, (_, v) in enumerate(sorted(model.state_dict().items())):
        flat = v.detach().double().abs().flatten()
        total += float(flat.sum())
        weighted += (k + 1) * float((flat * torch.linspace(1, 2, len(flat), dtype=torch.float64)).sum())
    return [total, weighted]


def main() -> None:
    reference = {}
    for family in FAMILIES:
        for name in CASES:
            model = make_tiny_model(family)
            kwargs = case_arguments(family, name, model)
            if kwargs is None:
                continue
            try:
                _, stats = prune_model(model, show_progress=False, return_stats=True, **kwargs)
            except ValueError as err:  # a family that cannot do this case: the battery expects the refusal
                reference[f"{family}/{name}"] = {"refused": str(err)}
                continue
            reference[f"{family}/{name}"] = {
                "event": stats["event"],
                "parameters": count_parameters(model),
                "checksum": checksum(model),
            }
    REFERENCE.write_text(json.dumps(reference, sort_keys=True))
    print(f"wrote {len(reference)} cases to {REFERENCE}")


if __name__ == "__main__":
    main()
