"""One timed prune in a fresh process, for ``bench_refit_time.py --compare-ref``.

Run with ``PYTHONPATH`` set to the source tree to time (an older commit's, or this checkout's); it loads
the saved model folder and calibration batches the parent wrote, so every process prunes the same input:

    PYTHONPATH=OLD_TREE python bench/engine_time_worker.py --impl prune_model --root OLD_TREE \\
        --model DIR --calibration FILE --threads 2 --setting '{"pruning_type": "DEPTH", ...}'

``--impl prune_model`` times ``prune_model(model, **setting, dataloader=batches)``; ``--impl plan_apply``
times ``pruning_request`` + ``plan`` + ``apply`` of the same arguments (the engine's path). Prints one
JSON line: seconds (and plan / apply seconds), parameters after, and a SHA-256 of the pruned weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, in order (equal digests: bit-identical models)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["prune_model", "plan_apply"], required=True)
    parser.add_argument("--root", type=Path, required=True, help="the source tree that must be imported")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--setting", required=True, help="prune_model's keyword arguments, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import optipfair_train

    imported = Path(optipfair_train.__file__).resolve()
    if not imported.is_relative_to(args.root.resolve()):
        raise SystemExit(f"imported {imported}, not the tree under {args.root}: set PYTHONPATH")
    from optipfair_train import prune_model

    setting = json.loads(args.setting)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    batches = torch.load(args.calibration)
    with torch.no_grad():  # one-off allocations paid before the clock starts, alike on both sides
        model(**batches[0])
    result: dict[str, object] = {}
    start = time.perf_counter()
    if args.impl == "prune_model":
        prune_model(model, dataloader=batches, show_progress=False, **setting)
    else:
        from optipfair_train.pruning import apply, plan, pruning_request

        pruning_type = setting.pop("pruning_type")
        request = pruning_request(pruning_type, calibrated=True, **setting)
        planned = plan(model, request, batches)
        result["plan_seconds"] = time.perf_counter() - start
        began = time.perf_counter()
        apply(model, planned)
        result["apply_seconds"] = time.perf_counter() - began
    result["seconds"] = time.perf_counter() - start
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["digest"] = weights_digest(model)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
