"""Run ``PruneThenHeal`` under ``accelerate launch`` (FSDP2 forced on CPU, as in ``fsdp_trainer_entry``) or
in one plain process, and write the final weights each rank holds.

Usage: ``accelerate launch --config_file CONFIG fsdp_pipeline_entry.py OUT --key value ...``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from fsdp_trainer_entry import _force_fsdp_on_cpu  # noqa: E402


def main(out: Path, flags: list[str]) -> None:
    if os.environ.get("FORCE_FSDP_ON_CPU") == "1":
        _force_fsdp_on_cpu()
    from accelerate import PartialState

    from optipfair_train.pipeline import PruneThenHeal, load_config

    result = PruneThenHeal(load_config(None, flags)).run()
    rank = PartialState().process_index
    torch.save(result["model"].state_dict(), out / f"rank-{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
