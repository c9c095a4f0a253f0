"""The Torch-Pruning 1.6.1 side of ``bench_peers.py``: its separate venv and the worker process.

Torch-Pruning is never a dependency of the package, not even an optional one: :func:`ensure_torch_pruning`
creates (once) a venv that sees this interpreter's site-packages (torch, transformers, numpy) and adds
``torch-pruning==1.6.1`` alone (a 2 s install: it needs only torch and numpy), see :mod:`peer_venv`.

The worker prunes the hidden dimension and the MLP width of a LLaMA-layout model the way Torch-Pruning's
LLM example (``examples/LLMs/prune_llm.py``) does (``MetaPruner``, local pruning, one ratio for every
group), with two changes that make it run on this model under transformers 5:

* q_proj, k_proj and v_proj (and the LM head) are ignored layers: with them as head-pruned roots (the
  example's setting), building the dependency graph does not finish on a model with rotary embeddings
  (upstream issue VainF/Torch-Pruning#527; checked here: still building after 120 s on a 4-layer tiny
  LLaMA that builds in under a second with them ignored). Their input channels still follow the hidden
  dimension; attention heads are not pruned.
* ``round_to`` is the head count, so the kept hidden width is a multiple of it (``save_pretrained``
  under transformers 5 checks the attention shapes against ``hidden_size``); the MLP width is rounded
  the same way.

Criteria: ``activation`` (its ``ActivationImportance``: the sum of |input| over tokens at every linear
layer reading the group's channels; its hook keeps the last forward pass only, so the worker adds the
sums of every calibration batch, as one large batch would give) and ``taylor`` (its
``GroupTaylorImportance``: |w * dL/dw| from the language-modelling loss summed over the calibration
batches). The time reported covers building the pruner, the calibration passes and the pruning.

Example:
    >>> python, seconds = ensure_torch_pruning(default_venv())  # doctest: +SKIP
    >>> worker = Worker(python, Path("/tmp/w")); worker("load", model=folder, threads=2, calibration=pt)  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from peer_venv import JsonWorker, ensure_venv

from optipfair_train.models import default_cache_dir

TORCH_PRUNING_VERSION = "1.6.1"
REQUIREMENT = f"torch-pruning=={TORCH_PRUNING_VERSION}"
CRITERIA = ("activation", "taylor")

WORKER_SOURCE = textwrap.dedent(
    """
    import copy, importlib.metadata, json, os, sys, time, traceback

    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    state = {}


    def parameters(model):
        return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


    def op_load(model, threads, calibration):
        if threads:
            torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        state.update(base=base, calibration=torch.load(calibration, weights_only=True))
        return {"parameters": parameters(base), "threads": torch.get_num_threads(), "version": importlib.metadata.version("torch-pruning")}


    def activation_scores(model, importance, batches):
        # ActivationImportance's hook overwrites its statistic at every forward pass: add them up
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        totals = {}
        with torch.no_grad(), importance.compute_importance(model):
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                for m in linears:
                    if hasattr(m, "_importance"):
                        totals[m] = totals.get(m, 0) + m._importance
        for m, total in totals.items():
            m._importance = total


    def taylor_gradients(model, batches):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                use_cache=False,
            )
            out.loss.backward()


    def op_prune(criterion, ratio, round_to, save):
        model = copy.deepcopy(state["base"])
        batches = state["calibration"]
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        start = time.perf_counter()
        # q/k/v ignored: with them the dependency graph never finishes building on rotary models
        ignored = [model.lm_head]
        for layer in model.model.layers:
            ignored += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        if criterion == "activation":
            importance = tp.importance.ActivationImportance(p=2, target_types=[torch.nn.Linear])
        elif criterion == "taylor":
            importance = tp.importance.GroupTaylorImportance()
        else:
            raise ValueError(f"unknown criterion {criterion!r}")
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=batches[0]["input_ids"][:1, :16],
            importance=importance,
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=round_to,
            output_transform=lambda out: out.logits,
        )
        if criterion == "activation":
            activation_scores(model, importance, batches)
        else:
            taylor_gradients(model, batches)
        for group in pruner.step(interactive=True):
            group.prune()
        model.zero_grad(set_to_none=True)
        del pruner
        # the tied head was cut as its own tensor with the same channels: tie it again
        if tied:
            if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
                raise RuntimeError("the tied LM head and the embedding were cut differently")
            model.lm_head.weight = model.model.embed_tokens.weight
        model.config.hidden_size = model.lm_head.in_features
        model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
        seconds = time.perf_counter() - start
        model.eval()
        if save:
            model.save_pretrained(save)
        return {
            "seconds": seconds,
            "parameters": parameters(model),
            "hidden": model.config.hidden_size,
            "intermediate": model.config.intermediate_size,
        }


    OPS = {"load": op_load, "prune": op_prune}
    """
)


def default_venv() -> Path:
    return default_cache_dir() / f"bench-torch-pruning-{TORCH_PRUNING_VERSION}"


def ensure_torch_pruning(venv: Path) -> tuple[Path, float | None]:
    """The python of a venv with Torch-Pruning 1.6.1 (sharing our torch and transformers), created once."""
    probe = (
        "import importlib.metadata as m\n"
        f"assert m.version('torch-pruning') == {TORCH_PRUNING_VERSION!r}\n"
        "import torch_pruning, torch, transformers"
    )
    return ensure_venv(venv, REQUIREMENT, probe=probe)


class Worker(JsonWorker):
    """The Torch-Pruning side: one process with the separate venv's python, answering JSON commands."""

    def __init__(self, python: Path, tmp: Path):
        super().__init__(python, tmp, WORKER_SOURCE, "torch-pruning")
