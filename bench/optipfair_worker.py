"""The OptiPFair 0.4.2 side of ``bench_optipfair.py``: its separate venv and the worker process.

OptiPFair is never a dependency of the package: :func:`ensure_optipfair` creates (once) a venv that sees
this interpreter's site-packages through a ``.pth`` file and adds ``optipfair[viz]==0.4.2`` (:mod:`peer_venv`);
:class:`Worker` runs OptiPFair there on the same model folder, answering one JSON command per line.
:func:`kept_neurons` recovers which neurons a pruned GLU MLP kept; both sides run the same function.

Example:
    >>> python, seconds = ensure_optipfair(default_venv())  # doctest: +SKIP
    >>> worker = Worker(python, Path("/tmp/w")); worker("load", model=folder)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

from peer_venv import JsonWorker, ensure_venv

from optipfair_train.models import default_cache_dir

OPTIPFAIR_VERSION = "0.4.2"
REQUIREMENT = f"optipfair[viz]=={OPTIPFAIR_VERSION}"  # viz: seaborn and scikit-learn, for visualize_bias
FIGURE_TYPES = ("mean_diff", "heatmap", "pca")
# OptiPFair draws mean_diff and heatmap figures for these four components (PCA for the first two only)
FIGURE_COMPONENTS = ("mlp_output", "attention_output", "gate_proj", "up_proj")
VERSION_PACKAGES = ("torch", "transformers", "numpy", "matplotlib", "seaborn", "scikit-learn")


def kept_neurons(original_mlp, pruned_mlp) -> list[int]:
    """Indices of the intermediate neurons a pruned GLU MLP kept, recovered from its weights.

    Each kept neuron's gate and up rows must equal one original neuron's rows, and the down columns must
    follow; anything else (a rescaled or merged neuron) raises.
    """
    import torch

    def rows(mlp):
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1).detach().float().contiguous()

    index = {row.numpy().tobytes(): i for i, row in enumerate(rows(original_mlp))}
    kept = [index.get(row.numpy().tobytes(), -1) for row in rows(pruned_mlp)]
    if -1 in kept or len(set(kept)) != len(kept):
        raise ValueError("a pruned neuron's gate/up rows match no original neuron")
    if not torch.equal(original_mlp.down_proj.weight[:, kept], pruned_mlp.down_proj.weight):
        raise ValueError("the pruned down_proj columns are not the kept neurons' columns")
    return kept


# The OptiPFair side: reads one JSON command per line on stdin, answers one JSON line on the original
# stdout (everything the library prints or logs goes to stderr, i.e. the log file).
WORKER_BODY = textwrap.dedent(
    """
    import copy, importlib.metadata, json, os, sys, time, traceback
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optipfair
    from optipfair import prune_model

    state = {}


    def layers(model):
        return model.model.layers


    def parameters(model):
        return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


    def versions(names):
        out = {}
        for name in names:
            try:
                dist = importlib.metadata.distribution(name)
                out[name] = {"version": dist.version, "location": str(Path(dist.locate_file("")).resolve())}
            except importlib.metadata.PackageNotFoundError:
                out[name] = {"version": "not installed", "location": ""}
        return out


    def op_load(model, threads, calibration, packages):
        if threads:
            torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        state.update(
            base=base,
            tokenizer=AutoTokenizer.from_pretrained(model),
            calibration=torch.load(calibration, weights_only=True),
        )
        checksum = sum(float(p.detach().double().sum()) for p in base.parameters())
        return {
            "parameters": parameters(base),
            "checksum": checksum,
            "threads": torch.get_num_threads(),
            "python": sys.executable,
            "sys_path": sys.path,
            "versions": versions(["optipfair", *packages]),
        }


    def op_warmup():
        with torch.no_grad():
            state["base"](**state["calibration"][0], use_cache=False)
        return {}


    def op_prune(method, percentage, data_driven, kept, save):
        model = copy.deepcopy(state["base"])
        start = time.perf_counter()
        prune_model(
            model,
            pruning_type="MLP_GLU",
            neuron_selection_method=method,
            pruning_percentage=percentage,
            dataloader=state["calibration"] if data_driven else None,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        out = {"seconds": seconds, "parameters": parameters(model)}
        if kept:
            base = layers(state["base"])
            out["kept"] = [kept_neurons(base[i].mlp, layer.mlp) for i, layer in enumerate(layers(model))]
        if save:
            model.save_pretrained(save)
        return out


    def op_visualize(pair, types, out):
        import matplotlib.pyplot as plt
        from optipfair.bias import visualize_bias

        start = time.perf_counter()
        _, metrics = visualize_bias(
            state["base"], state["tokenizer"], [tuple(pair)], visualization_types=types,
            layers="first_middle_last", output_dir=out, figure_format="png", show_progress=False,
        )
        seconds = time.perf_counter() - start
        plt.close("all")
        overall = metrics.get("pair_1", {}).get("metrics", {}).get("overall_metrics", {})
        return {
            "seconds": seconds,
            "figures": [f.stat().st_size for f in Path(out).glob("*.png")],
            "mean_difference": overall.get("mean_difference"),
        }


    OPS = {"load": op_load, "warmup": op_warmup, "prune": op_prune, "visualize": op_visualize}
    """
)


def worker_source() -> str:
    return "import torch\n\n\n" + inspect.getsource(kept_neurons) + WORKER_BODY


def default_venv() -> Path:
    return default_cache_dir() / f"bench-optipfair-{OPTIPFAIR_VERSION}"


def ensure_optipfair(venv: Path) -> tuple[Path, float | None]:
    """The python of a venv with OptiPFair 0.4.2 and its viz extras, creating it (once) when needed
    (:func:`peer_venv.ensure_venv`: it shares our torch and transformers)."""
    probe = (
        "import importlib.metadata as m\n"
        f"assert m.version('optipfair') == {OPTIPFAIR_VERSION!r}\n"
        "import optipfair, torch, transformers, seaborn, sklearn"
    )
    return ensure_venv(venv, REQUIREMENT, probe=probe)


class Worker(JsonWorker):
    """The OptiPFair side: one process with the separate venv's python, answering JSON commands."""

    def __init__(self, python: Path, tmp: Path):
        super().__init__(python, tmp, worker_source(), "optipfair")
