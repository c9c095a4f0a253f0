"""A Trainer with FairnessLossCallback under DDP (torchrun, gloo, CPU): what each rank's callback adds.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 ddp_fair_loss_entry.py OUT OBJECTIVE``. Each rank
records, at every step, the gradient the callback added and the gradient of the whole step batch's
fairness loss computed locally on the step's starting weights (they must be equal: the ranks' shares
were all-reduced), and at the end a digest of its weights (equal on every rank). Writes OUT/rank-R.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from callbacks_helpers import NEUTRAL_TEXTS, TextDataset, training_args  # noqa: E402
from conftest import make_char_tokenizer, make_tiny_model  # noqa: E402
from test_fair_loss import ITEMS  # noqa: E402

from optipfair_train.callbacks import FairnessLossCallback  # noqa: E402
from optipfair_train.heal.fair_loss import ItemCycle, fairness_loss  # noqa: E402

WEIGHT, BATCH, SEED = 3.0, 5, 2  # 5 items over 2 ranks: shares of 3 and 2


class Spy(TrainerCallback):
    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []
        self.weights: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        self.weights.append([p.detach().clone() for p in model.parameters()])


def main(out: Path, objective: str) -> None:
    tokenizer = make_char_tokenizer()
    model = make_tiny_model("llama")
    before, after = Spy(), Spy()
    callback = FairnessLossCallback(
        ITEMS, tokenizer, weight=WEIGHT, batch_size=BATCH, seed=SEED, objective=objective
    )
    trainer = Trainer(
        model=model,
        args=training_args(out / "run", max_steps=2, per_device_train_batch_size=1),
        train_dataset=TextDataset(tokenizer, NEUTRAL_TEXTS),
        callbacks=[before, callback, after],
    )
    trainer.train()
    rank = dist.get_rank()
    errors = []
    for step, (g0s, g1s, weights) in enumerate(zip(before.grads, after.grads, before.weights, strict=True)):
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p, w in zip(reference.parameters(), weights, strict=True):
                p.copy_(w)
        fairness_loss(reference, tokenizer, ItemCycle(ITEMS, BATCH, SEED).batch(step), objective).backward()
        for g0, g1, p in zip(g0s, g1s, reference.parameters(), strict=True):
            errors.append(float((g1 - g0 - WEIGHT * p.grad).abs().max()))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    record = {"world": dist.get_world_size(), "steps": len(before.grads), "max_error": max(errors),
              "digest": digest.hexdigest()}  # fmt: skip
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
