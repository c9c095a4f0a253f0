"""Heal a pruned tiny LLaMA with LoRA through ``transformers.Trainer``, under ``accelerate launch``; gather
it whole with ``unshard`` exactly where the pipeline would, merge, and write what the test compares.

Usage: ``accelerate launch --config_file CONFIG fsdp_trainer_entry.py OUT`` (or plain ``python`` for one
process). accelerate 1.16 enables FSDP for GPU back-ends only (``AcceleratorState`` turns a CPU run's
``distributed_type: FSDP`` into ``MULTI_CPU``, i.e. DDP); with ``FORCE_FSDP_ON_CPU=1`` this script sets
the state back to FSDP after accelerate built it, the one change needed to run the Trainer's FSDP2 code
path (fully_shard, sharded checkpoints) on CPU over gloo. It is a test stand-in for GPUs, not a setting.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from conftest import make_tiny_model  # noqa: E402
from fsdp_heal_entry import GLOBAL_BATCH, SEQ, STEPS, digest  # noqa: E402


def _force_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    state.AcceleratorState.__init__ = init


def main(out: Path) -> None:
    if os.environ.get("FORCE_FSDP_ON_CPU") == "1":
        _force_fsdp_on_cpu()
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from optipfair_train.heal import add_lora
    from optipfair_train.pipeline.distributed import is_fsdp, unshard
    from optipfair_train.pruning import prune_model

    distributed = PartialState(cpu=True)
    world, rank = distributed.num_processes, distributed.process_index
    model = make_tiny_model("llama")
    calibration = [{"input_ids": torch.arange(4, 4 + SEQ).repeat(2, 1), "attention_mask": torch.ones(2, SEQ)}]
    prune_model(model, neuron_selection_method="activation", pruning_percentage=25, dataloader=calibration,
                show_progress=False)
    pruned = copy.deepcopy(model)  # the pipeline reloads this from round-K/pruned

    def with_lora(base):
        torch.manual_seed(0)
        return add_lora(base, r=4, alpha=8)

    ids = torch.randint(4, 100, (STEPS * GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(
        model=with_lora(model),
        args=TrainingArguments(
            output_dir=str(out / "heal"),
            max_steps=STEPS,
            per_device_train_batch_size=GLOBAL_BATCH // world,
            learning_rate=1e-2,
            logging_steps=1,
            optim="adamw_torch",
            save_strategy="steps",
            save_steps=STEPS,
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
        data_collator=default_data_collator,
    )
    trainer.train()
    sharded = is_fsdp(trainer.model)
    # the pipeline's integration point: after trainer.train(), before merge_and_unload / evaluate / save
    healed = unshard(trainer.model, lambda: with_lora(copy.deepcopy(pruned))).merge_and_unload().eval()
    with torch.no_grad():
        logits = healed(input_ids=ids[:1]).logits
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    (out / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "pruned": digest(pruned.state_dict()),
                "losses": losses,
                "sharded": sharded,
                "fsdp_enabled": trainer.is_fsdp_enabled,
                "checkpoint": sorted(p.name for p in (out / "heal" / f"checkpoint-{STEPS}").iterdir()),
            }
        )
    )
    torch.save({"state": healed.state_dict(), "logits": logits}, out / f"rank-{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
