"""configs/demo-fair.yaml is configs/demo.yaml plus the fairness mode: same compression, heal budget,
data and seed, its own folder, paired with the demo's run."""

from pathlib import Path

from optipfair_train.pipeline.config import load_config
from optipfair_train.pipeline.config_checks import validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODE_KEYS = {"bias_vector_strength", "bias_vector_items", "bias_vector_epochs", "bias_vector_learning_rate"}
OWN_KEYS = {"output_dir", "run_name", "reference_run"}


def _flat(config) -> dict:
    return {key: value for section in config.to_dict().values() for key, value in section.items()}


def test_demo_fair_differs_from_the_demo_only_in_the_mode_and_its_own_folder():
    demo, fair = load_config(CONFIGS / "demo.yaml"), load_config(CONFIGS / "demo-fair.yaml")
    validate(fair)
    a, b = _flat(demo), _flat(fair)
    differing = {key for key in a if a[key] != b[key]}
    assert differing <= MODE_KEYS | OWN_KEYS
    assert b["bias_vector_strength"] > 0 and a["bias_vector_strength"] == 0
    assert b["reference_run"] == a["output_dir"] != b["output_dir"]
