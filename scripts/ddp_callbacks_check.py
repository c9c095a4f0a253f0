"""Two-process check of the callbacks under DDP (launched by tests/test_callbacks.py).

    accelerate launch --multi_gpu --num_processes 2 scripts/ddp_callbacks_check.py OUT_DIR

Phase 1 trains 3 steps with BiasProbeCallback and GradientImportanceCallback: both must work and agree
across ranks. Phase 2 asks PruningCallback to prune inside the loop: every rank must stop with
DistributedPruningError before any weight changes. Each rank writes OUT_DIR/rank{N}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from callbacks_helpers import NEUTRAL_TEXTS, TextDataset, training_args  # noqa: E402
from conftest import make_char_tokenizer, make_tiny_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from optipfair_train.arch import get_adapter  # noqa: E402
from optipfair_train.callbacks import (  # noqa: E402
    BiasProbeCallback,
    DistributedPruningError,
    GradientImportanceCallback,
    PruningCallback,
)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = make_char_tokenizer()
    dataset = TextDataset(tokenizer, NEUTRAL_TEXTS, length=32, repeat=2)
    report: dict = {}

    model = make_tiny_model("llama")
    trainer = Trainer(
        model=model,
        args=training_args(Path(out_dir) / "phase1", max_steps=3),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    report["world_size"] = trainer.args.world_size
    grads = GradientImportanceCallback()
    probe = BiasProbeCallback(trainer, every_n_steps=2, probes=["behaviour"])
    trainer.add_callback(grads)
    trainer.add_callback(probe)
    trainer.train()
    report["bias_scores"] = [h["scalars"]["bias/score"] for h in probe.history]
    report["taylor_batches"] = grads.num_batches
    report["taylor_checksum"] = float(sum(v.sum() for v in grads.importance.neuron_scores().values()))

    try:  # with the trainer given, the error comes at construction
        PruningCallback(trainer, target=25, step=2, neuron_selection_method="MAW")
        report["construction_error"] = None
    except DistributedPruningError as error:
        report["construction_error"] = str(error)

    model = make_tiny_model("llama")
    report["intermediate_sizes_before"] = get_adapter(model).intermediate_sizes()
    trainer = Trainer(
        model=model,
        args=training_args(Path(out_dir) / "phase2", max_steps=3),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[PruningCallback(target=25, step=2, neuron_selection_method="MAW")],
    )
    try:
        trainer.train()
        report["error_type"] = report["error"] = None
    except DistributedPruningError as error:
        report["error_type"], report["error"] = type(error).__name__, str(error)
    report["intermediate_sizes_after"] = get_adapter(model).intermediate_sizes()
    rank = trainer.args.process_index
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
