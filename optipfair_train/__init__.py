"""optipfair-train: structured pruning and bias probing of LLMs inside the Hugging Face training loop."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
