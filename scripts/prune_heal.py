"""Prune-then-heal, launched with Accelerate (one or several processes).

Usage:
    accelerate launch scripts/prune_heal.py --config configs/demo.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 scripts/prune_heal.py --config configs/demo.yaml

Flags after ``--config`` override the YAML's keys (the same names, e.g. ``--num_rounds 1``).
"""

import sys

from optipfair_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
