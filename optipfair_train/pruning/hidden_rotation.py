"""A rotated basis for the hidden axis (SliceGPT-style): principal components of the normalised stream.

Every norm reading the residual stream first has its scale folded into the projections that read it
(``W <- W diag(s)``, the norm's scale set to one), after which an RMSNorm commutes with any orthogonal
``Q``: ``norm(h Q) = norm(h) Q``, because a rotation keeps the sum of squares. Rotating the embedding
(``E Q``), every reader (``W Q``: q/k/v, gate/up, LM head) and every writer (``Q^T W``, ``Q^T b``: o_proj,
down_proj) then leaves the logits equal while the stream is carried in the basis ``Q``. One ``Q`` serves
all blocks, so the model keeps its family's plain architecture (no shortcut matrices between blocks) and
reloads with ``from_pretrained``.

``Q`` holds the eigenvectors of ``sum over norms and tokens of x x^T`` with ``x = h / rms(h)`` (what
each norm normalises), by decreasing eigenvalue; keeping the first ``d'`` coordinates then drops the
directions with the least energy, and :func:`~optipfair_train.pruning.hidden.apply_hidden` cuts them.

Only untied heads: with a tied head the final norm's scale would have to be folded into the embedding
too, and ``E diag(s) Q`` (the head) cannot equal ``E Q`` (the embedding); untying the head first costs
``vocab x hidden`` parameters (28.3M of the demo model's 134.5M). Gemma2 is refused as well: its
post-norms normalise sublayer outputs and apply a per-channel scale after the norm, which does not
commute with a rotation. A rotated model has no axis-aligned LoRA or Adam state to carry over: LoRA
layers and optimizer state are refused.

Example:
    >>> plan = plan_hidden(model, pruning_percentage=10, method="pca", batches=batches)  # doctest: +SKIP
    >>> apply_hidden(model, plan)  # rotates, then cuts  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ModelAdapter
from .calibration import CalibrationBatch, _all_reduce_, _hooks, _run

__all__ = ["stream_readers", "stream_writers", "check_rotatable", "rotation_basis", "rotate_stream"]


def stream_readers(adapter: ModelAdapter) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """``{name: (norm, projections reading its output)}``: each block's pre-attention and pre-MLP norm,
    and the final norm when the LM head is untied (a tied head is the embedding)."""
    readers = {}
    for i in range(adapter.num_layers):
        (attention_norm, mlp_norm), _ = adapter.block_norms(i)
        attention, mlp = adapter.attention(i), adapter.mlp(i)
        readers[f"layer {i} attention"] = (attention_norm, [attention.q, attention.k, attention.v])
        readers[f"layer {i} mlp"] = (mlp_norm, [m for m in (mlp.gate, mlp.up) if m is not None])
    embedding, head = adapter.model.get_input_embeddings(), adapter.model.get_output_embeddings()
    if head is not None and getattr(head, "base_layer", head).weight is not embedding.weight:
        readers["head"] = (adapter.final_norm(), [head])
    return readers


def stream_writers(adapter: ModelAdapter) -> list[nn.Module]:
    """Projections whose outputs are added to the stream (o_proj and down_proj of every block)."""
    return [m for i in range(adapter.num_layers) for m in (adapter.attention(i).o, adapter.mlp(i).down)]


def check_rotatable(adapter: ModelAdapter, optimizer=None) -> None:
    """Raise (before anything changes) when the stream cannot be rotated exactly; see the module docstring."""
    family = adapter.family
    if family.output_norms:
        raise ValueError(
            f"{family.name} scales sublayer outputs after a norm (post-norms), which does not commute with "
            "a rotation: use method 'activation' for this family."
        )
    if "head" not in stream_readers(adapter):
        raise ValueError(
            "Rotation ('pca') needs an untied LM head: with a tied head the final norm's scale cannot be folded "
            "into the head without changing the embedding. Untie it first (this adds vocab x hidden parameters) "
            "or use method 'activation'."
        )
    if any(hasattr(m, "base_layer") for m in adapter.model.modules()):
        raise ValueError("Rotation ('pca') needs plain projections: merge LoRA adapters first.")
    if optimizer is not None:
        raise ValueError(
            "Rotation ('pca') changes every weight's basis, so optimizer state cannot be carried over: "
            "prune before training, or use method 'activation'."
        )


def rotation_basis(
    model: nn.Module, adapter: ModelAdapter, batches: list[CalibrationBatch], *, show_progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, energy)``: eigenvectors (columns, float64) of the normalised stream's Gram summed over the
    stream's norms, by decreasing eigenvalue, and the eigenvalues. Changes nothing.

    Example:
        >>> q, energy = rotation_basis(model, get_adapter(model), batches)  # doctest: +SKIP
    """
    d = adapter.hidden_size
    gram = torch.zeros(d, d, dtype=torch.float64)
    current: dict = {}
    norms = [norm for norm, _ in stream_readers(adapter).values()]

    def hook(module, args):
        h = args[0].reshape(-1, d)[current["mask"].reshape(-1).bool()].double()
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 0.0)))
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        gram.add_((x.t() @ x).cpu())

    handles = [norm.register_forward_pre_hook(hook) for norm in norms]
    with _hooks(handles):
        _run(model, batches, show_progress, "stream principal components", current)
    _all_reduce_([gram])
    energy, vectors = torch.linalg.eigh(gram)
    order = energy.argsort(descending=True)
    return vectors[:, order], energy[order]


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.data.copy_(bias.to(linear.bias.dtype))


@torch.no_grad()
def rotate_stream(adapter: ModelAdapter, rotation: torch.Tensor) -> None:
    """Fold every stream norm's scale into its readers, then carry the stream in the basis ``rotation``
    (``[d, d]`` orthogonal). The model computes the same function. Call :func:`check_rotatable` first.

    Example:
        >>> rotate_stream(get_adapter(model), torch.linalg.qr(torch.randn(64, 64)).Q)  # doctest: +SKIP
    """
    q = rotation.double().cpu()
    plus_one = adapter.family.norm_plus_one
    for norm, readers in stream_readers(adapter).values():
        scale = norm.weight.detach().double().cpu() + (1.0 if plus_one else 0.0)
        for reader in readers:
            _set(reader, reader.weight.detach().double().cpu() * scale @ q)
        norm.weight.data.fill_(0.0 if plus_one else 1.0)
    embedding = adapter.model.get_input_embeddings()
    embedding.weight.data.copy_((embedding.weight.detach().double().cpu() @ q).to(embedding.weight.dtype))
    for writer in stream_writers(adapter):
        bias = getattr(writer, "bias", None)
        rotated_bias = None if bias is None else q.t() @ bias.detach().double().cpu()
        _set(writer, q.t() @ writer.weight.detach().double().cpu(), rotated_bias)
