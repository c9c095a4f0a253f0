"""Prune a tiny LLaMA, heal it with LoRA a few steps, gather it whole: one process, or FSDP2 under torchrun.

Usage: ``python fsdp_heal_entry.py OUT`` (one process) or
``python -m torch.distributed.run --nproc_per_node 2 fsdp_heal_entry.py OUT`` (FSDP2 over gloo).
Every run uses the same global data: calibration batches and each step's 4 training sequences are
split between the ranks, so the all-reduced statistics and the averaged gradients equal one process's.
Writes ``OUT/rank-R.json`` (pruned-weight digest, global losses, checks) and ``OUT/rank-R.pt`` (the
healed, merged weights and logits on fixed ids).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from conftest import make_tiny_model  # noqa: E402

from optipfair_train.heal import add_lora  # noqa: E402
from optipfair_train.pipeline.distributed import gather_full_state_dict, is_fsdp, unshard  # noqa: E402
from optipfair_train.pruning import prune_model  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    data = torch.randint(4, 100, (STEPS + 2, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))

    model = make_tiny_model("llama")
    calibration = [
        {"input_ids": batch[share], "attention_mask": torch.ones_like(batch[share])} for batch in data[STEPS:]
    ]
    prune_model(model, neuron_selection_method="activation", pruning_percentage=25, dataloader=calibration,
                show_progress=False)
    pruned = copy.deepcopy(model)  # what the pipeline saves as round-K/pruned before healing

    def with_lora(base):
        torch.manual_seed(0)  # the same adapter initialisation in every run
        return add_lora(base, r=4, alpha=8)

    model = with_lora(model).train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        ids = data[step][share]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:  # equal token counts per rank: the global mean is the mean of the rank means
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))

    checks = {"sharded": is_fsdp(model)}
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        ours = gather_full_state_dict(model)
        torch_full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        checks["gather_equals_torch"] = sorted(ours) == sorted(torch_full) and all(
            torch.equal(ours[n], torch_full[n].cpu()) for n in ours
        )
        checks["local_rows"] = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.to_local().shape[0]
    healed = unshard(model, lambda: with_lora(copy.deepcopy(pruned))).merge_and_unload().eval()
    with torch.no_grad():
        logits = healed(input_ids=data[0][:1]).logits
    before = pruned.state_dict()
    checks["moved"] = max(float((t - before[n]).abs().max()) for n, t in healed.state_dict().items())
    (out / f"rank-{rank}.json").write_text(
        json.dumps({"pruned": digest(pruned.state_dict()), "losses": losses, "world": world, **checks})
    )
    torch.save({"state": healed.state_dict(), "logits": logits}, out / f"rank-{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
