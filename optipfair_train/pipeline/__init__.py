"""The prune-then-heal pipeline: configs, rounds, healing, resume, model card."""

from ..lazy import lazy_attributes
from .config import PipelineConfig, config_keys, load_config

# .run imports torch: loaded on first use, so `optipfair-train run --help` lists the config keys without it
__getattr__, __dir__ = lazy_attributes(
    __name__, dict.fromkeys(("NonFiniteLossError", "PruneThenHeal"), ".run")
)

__all__ = ["PipelineConfig", "config_keys", "load_config", "NonFiniteLossError", "PruneThenHeal"]
