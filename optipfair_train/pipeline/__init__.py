"""The prune-then-heal pipeline: configs, rounds, healing, resume, model card."""

from .config import PipelineConfig, config_keys, load_config
from .run import NonFiniteLossError, PruneThenHeal

__all__ = ["PipelineConfig", "config_keys", "load_config", "NonFiniteLossError", "PruneThenHeal"]
