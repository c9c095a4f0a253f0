"""Memory and time plan for pruning and healing LLaMA-shaped models of 1B, 8B and 70B, from their configs.

No weights are loaded: parameter counts are arithmetic on the config (the test checks them against
``LlamaForCausalLM`` built on the meta device). Sizes are GiB (2^30 bytes). Notation: H hidden size,
I intermediate size, L layers, n query heads, g KV heads, d = H / n head dim, K = g * d KV width,
V vocabulary, P parameters, b micro-batch, s sequence length, W world size (GPUs), r LoRA rank.

Parameters (exact): per layer 2*H*H (q, o) + 2*H*K (k, v) + 3*H*I (gate, up, down) + 2*H (norms);
P = L * that + V*H (embedding) + V*H unless tied (lm_head) + H (final norm).
Weights: 2*P bytes in bf16, 4*P in fp32.

Pruning statistics (exact sizes of what is stored; float64 = 8 bytes):
- activation sums per MLP neuron: 8*I per layer, 8*L*I for all layers.
- down_proj refit Gram matrix (X^T X of the down_proj input): 8*I^2 per layer; sequential (layer-by-
  layer) calibration holds one layer's at a time, calibrating all layers at once holds L of them.
- o_proj Gram (its input has n*d = H features): 8*H^2 per layer.
- Taylor scores: 8*(I + n + 1) per layer (neurons, heads, block); computing them needs the weight
  gradients of one backward pass: + 2*P (bf16 gradients) while it runs.
- depth replacement (a block replaced by a least-squares linear map): X^T X and X^T Y, 2 * 8*H^2 per block.
- sequential calibration activation buffer: N tokens * H * 2 bytes (bf16) for the current layer's
  input, and as much again for its output (the next layer's input), so 2*N*H*2.
- surgery transient: index_select writes the kept rows/columns before the old tensor is freed, so at most
  one decoder layer's weights extra: (2*H*H + 2*H*K + 3*H*I) * 2 bytes.
- peak of sequential MLP pruning with the down_proj refit: the weights + one layer's Gram + the refit's
  float64 down_proj weight and result (2 * 8*H*I) + the sequential buffer + the surgery transient. The
  weights are the whole model in bf16 (``prune_model``), or only the outer weights (embeddings, lm_head,
  final norm) and one decoder layer (``prune_checkpoint``, one block resident).

Hidden-axis pruning with the refit of the stream's readers (``HIDDEN``, ``reconstruct=True``; H' kept
channels, the hidden size minus the percentage rounded down to a multiple of n; R = 2*L readers' norms,
+ 1 for an untied lm_head's final norm; all float64):
- refit statistics per norm: C = sum x x'^T and G = sum x' x'^T, 8*(H*H' + H'^2).
- refit result of one layer (q, k, v, gate, up at H' columns): 8*H'*(H + 2*K + 2*I) in float64 (in
  memory), 2*H'*(H + 2*K + 2*I) in bf16 (streamed: stored in the weights' dtype as solved); an untied
  lm_head's 8*V*H' or 2*V*H'.
- solving a projection (APPROXIMATE, the temporaries of ``W C + lam W_S``), 4096 rows at a time: the
  rows' float64 weight, W C, W_S and lam*W_S, 8*min(out, 4096)*(H + 3*H').
- channel scores: 8*(R + 1)*H, negligible.
- in memory (``prune_model``): the weights + every norm's statistics at once (one forward pass collects
  them) + every layer's refit result (they are all solved before the first weight is cut) + the last
  solve's temporaries (the lm_head's when untied).
- streamed (``prune_checkpoint``): the larger of the block phase (outer weights + one block + the
  sequential buffer + one block's two norms' statistics + its refit result + the solve of gate/up) and,
  untied, the head phase (outer weights + the buffer + the final norm's statistics + the lm_head's solve
  and result). The scoring pass holds less (one block, the buffer, the scores).

Healing memory per GPU (LoRA r on q, k, v, o, gate, up, down of every layer; base weights frozen bf16;
LoRA weights, gradients and both Adam moments fp32 = 16 bytes per LoRA parameter; LoRA parameters per
layer r * (in + out) summed over the 7 projections; lm_head and embeddings get no adapter):
- DDP: 2*P + 16*P_lora + 4*P_lora (DDP's gradient buckets) + activations.
- FSDP2 (full shard): (2*P + 16*P_lora) / W + the unsharded working set + activations. Working set:
  the root group (embedding, lm_head, final norm: 2*V*H*(1 or 2) bytes in bf16, not resharded between
  forward and backward) + two decoder layers in bf16 (the one computing and the one prefetched).
- Activations, gradient checkpointing on (APPROXIMATE): the checkpointed layer inputs L*b*s*H*2 bytes,
  plus one layer recomputed in backward, b*s*2*(10*H + 2*K + 4*I) bytes (the tensors autograd saves in
  one HF LLaMA decoder layer counted in bf16: norm inputs and their fp32 upcasts, q/k/v/o inputs and
  outputs, gate, up, act(gate), act(gate)*up; SDPA/flash attention, no s^2 term), plus the logits:
  b*s*V elements at 14 bytes for the LM loss (bf16 logits, their fp32 upcast, log-softmax, gradient).
  Without checkpointing (what the pipeline's Trainer healing does today) every layer keeps its saved
  tensors: L * b*s*2*(10*H + 2*K + 4*I), plus the same logits.
- KD with the teacher resident (what ``DistillationTrainer`` does today: the whole teacher on every
  GPU, also under FSDP): + 2*P_teacher, and the logits at 44 bytes per element (both models' bf16
  logits + the ten fp32 temporaries ``distillation_loss`` creates: upcasts, masked copies, /T,
  log-softmaxes, the elementwise KL, the CE's log-softmax). Teacher = the unpruned model (round 1).
- KD with the teacher sharded by FSDP as well (not implemented yet): + 2*P_teacher / W + the
  teacher's own working set (root group + two layers), same logit bytes as above.
- KD from cached top-k teacher logits: teacher not resident; 18 bytes per logit element (student side
  only), plus the cache read per batch b*s*k*6 bytes (bf16 value + int32 index, negligible); on disk
  the cache takes tokens*k*6 bytes.
The student is planned at its unpruned size (round 1 is the largest). Not counted: the CUDA context
and allocator fragmentation, hence the GPU budget below.

Smallest GPU set: the smallest W in 1, 2, 4, 8 (one node), 16, 32, 64 (several nodes) whose per-GPU
memory fits 90% of a 24, 40 or 80 GiB GPU. DDP memory does not shrink with W (it fits one GPU or none).

Time (APPROXIMATE, compute-bound): training FLOPs per token ~ 8*P for LoRA with gradient checkpointing
(2P forward + 2P recomputed forward + 2P backward through activations, weight gradients only for
LoRA, ~2P for attention and the adapter terms rounded in), + 2*P_teacher for the teacher forward (KD),
2*P per calibration token; GPU-seconds = FLOPs / (0.4 * 312e12), i.e. 40% of an A100's dense bf16 peak.

Usage:
    python bench/memory_plan.py [--micro-batch 4] [--seq-len 1024] [--lora-r 16] [--out docs/memory-plan.md]

Example:
    >>> parameters(MODELS["8B"])
    8030261248
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
GPU_SIZES = (24, 40, 80)
BUDGET = 0.9  # share of a GPU's memory the plan may fill
HIDDEN_PERCENTAGES = (10, 25)
REFIT_ROWS = 4096  # optipfair_train.pruning.hidden_refit.REFIT_ROWS
PEAK_FLOPS, MFU = 312e12, 0.4
LM_LOGIT_BYTES, KD_LOGIT_BYTES, TOPK_LOGIT_BYTES = 14, 44, 18
METHODS = {
    "lora": "LoRA",
    "kd_lora": "KD + LoRA, teacher resident",
    "kd_lora_sharded": "KD + LoRA, teacher FSDP-sharded",
    "kd_lora_topk": "KD + LoRA, cached top-k",
}


@dataclass(frozen=True)
class Shape:
    """The dimensions of a LLaMA-shaped decoder that memory depends on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hidden // self.heads


MODELS = {
    "1B": Shape("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, tied=True),
    "8B": Shape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, tied=False),
    "70B": Shape("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, tied=False),
}
# the shipped presets with a LLaMA-shaped model (Qwen's head_dim and q/k/v biases are not modelled)
PRESETS = {
    "llama-3.2-1b.yaml": MODELS["1B"],
    "mistral-7b.yaml": Shape("Mistral-7B-v0.1", 4096, 14336, 32, 32, 8, 32000, tied=False),
}


def llama_config(m: Shape):
    """The ``transformers.LlamaConfig`` of a shape (for building the model on the meta device)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=m.hidden,
        intermediate_size=m.intermediate,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        num_key_value_heads=m.kv_heads,
        vocab_size=m.vocab,
        tie_word_embeddings=m.tied,
    )


def layer_weights(m: Shape) -> int:
    """Weights of the linear projections of one decoder layer."""
    return 2 * m.hidden * m.hidden + 2 * m.hidden * m.kv_width + 3 * m.hidden * m.intermediate


def parameters(m: Shape) -> int:
    """All parameters, embeddings and norms included (tied lm_head counted once)."""
    embeddings = m.vocab * m.hidden * (1 if m.tied else 2)
    return m.layers * (layer_weights(m) + 2 * m.hidden) + embeddings + m.hidden


def lora_parameters(m: Shape, r: int) -> int:
    """LoRA parameters at rank ``r`` on the 7 projections of every layer: r * (in + out) each."""
    h, k, i = m.hidden, m.kv_width, m.intermediate
    per_layer = r * ((h + h) * 2 + (h + k) * 2 + (h + i) * 3)
    return m.layers * per_layer


def pruning_memory(m: Shape, tokens: int) -> dict[str, float]:
    """GiB of every pruning statistic and buffer (formulas in the module docstring)."""
    h, i, n_layers = m.hidden, m.intermediate, m.layers
    return {
        "weights bf16": 2 * parameters(m) / GIB,
        "weights fp32": 4 * parameters(m) / GIB,
        "activation sums, all layers": 8 * n_layers * i / GIB,
        "down_proj Gram, one layer": 8 * i * i / GIB,
        "down_proj Gram, all layers": 8 * n_layers * i * i / GIB,
        "o_proj Gram, one layer": 8 * h * h / GIB,
        "Taylor scores, all layers": 8 * n_layers * (i + m.heads + 1) / GIB,
        "Taylor: gradients while computing": 2 * parameters(m) / GIB,
        "depth replacement stats, one block": 2 * 8 * h * h / GIB,
        f"sequential buffer, {tokens // 1024}k tokens (in + out)": 2 * tokens * h * 2 / GIB,
        "surgery transient (one layer)": 2 * layer_weights(m) / GIB,
    }


def sequential_pruning_peak(m: Shape, tokens: int, streamed: bool) -> float:
    """GiB resident at the peak of sequential MLP pruning with refit, whole model or one block resident."""
    h, i = m.hidden, m.intermediate
    outer = m.vocab * h * (1 if m.tied else 2) + h
    weights = 2 * (outer + layer_weights(m) + 2 * h) if streamed else 2 * parameters(m)
    return (weights + 8 * i * i + 2 * 8 * h * i + 2 * tokens * h * 2 + 2 * layer_weights(m)) / GIB


def hidden_kept(m: Shape, percentage: float) -> int:
    """Channels the hidden axis keeps at ``percentage``: rounded down to a multiple of the head count."""
    return (m.hidden - int(percentage / 100 * m.hidden + 1e-9)) // m.heads * m.heads


def _hidden_terms(m: Shape, percentage: float, result_bytes: int) -> tuple[int, int, int, int]:
    """Bytes of one norm's refit statistics, one layer's refit result, the lm_head's, and H'."""
    kept = hidden_kept(m, percentage)
    stats = 8 * (m.hidden * kept + kept * kept)
    layer_refit = result_bytes * kept * (m.hidden + 2 * m.kv_width + 2 * m.intermediate)
    return stats, layer_refit, 0 if m.tied else result_bytes * m.vocab * kept, kept


def _solve(m: Shape, out: int, kept: int) -> int:
    """Float64 temporaries of solving ``out`` rows, REFIT_ROWS at a time."""
    return 8 * min(out, REFIT_ROWS) * (m.hidden + 3 * kept)


HIDDEN_PHASES = ("in memory", "streamed, blocks", "streamed, lm_head")


def hidden_memory_terms(
    m: Shape, tokens: int, percentage: float, phase: str, dtype_bytes: int = 2
) -> dict[str, int]:
    """Bytes resident at once in one phase of hidden-axis pruning with the refit (``HIDDEN_PHASES``):
    weights, hidden states, refit statistics, refit results and the solve's temporaries. Weights, results
    kept in the weights' dtype and hidden states take ``dtype_bytes`` (2: bf16, 4: float32)."""
    h = m.hidden
    streamed = phase != "in memory"
    stats, layer_refit, head_refit, kept = _hidden_terms(m, percentage, dtype_bytes if streamed else 8)
    outer = dtype_bytes * (m.vocab * h * (1 if m.tied else 2) + h)
    if phase == "in memory":
        readers = 2 * m.layers + (0 if m.tied else 1)
        return {
            "weights": dtype_bytes * parameters(m),
            "hidden states": 0,  # one batch at a time
            "refit statistics": readers * stats,
            "refit results": m.layers * layer_refit + head_refit,
            "solve temporaries": _solve(m, m.intermediate if m.tied else m.vocab, kept),
        }
    if phase == "streamed, lm_head" and m.tied:
        return {}
    head = phase == "streamed, lm_head"
    return {
        "weights": outer + (0 if head else dtype_bytes * (layer_weights(m) + 2 * h)),
        "hidden states": 2 * tokens * h * dtype_bytes,
        "refit statistics": stats if head else 2 * stats,
        "refit results": head_refit if head else layer_refit,
        "solve temporaries": _solve(m, m.vocab if head else m.intermediate, kept),
    }


def hidden_streamed_phases(
    m: Shape, tokens: int, percentage: float, dtype_bytes: int = 2
) -> dict[str, float]:
    """GiB of the two peaks of streamed hidden-axis pruning: the blocks' phase and the lm_head's (0 if tied)."""
    return {
        key: sum(hidden_memory_terms(m, tokens, percentage, f"streamed, {key}", dtype_bytes).values()) / GIB
        for key in ("blocks", "lm_head")
    }


def hidden_pruning_peak(
    m: Shape, tokens: int, percentage: float, streamed: bool, dtype_bytes: int = 2
) -> float:
    """GiB resident at the peak of hidden-axis pruning with the refit (weights in ``dtype_bytes``, 2 = bf16;
    see the docstring)."""
    if streamed:
        return max(hidden_streamed_phases(m, tokens, percentage, dtype_bytes).values())
    return sum(hidden_memory_terms(m, tokens, percentage, "in memory", dtype_bytes).values()) / GIB


def activations(m: Shape, batch: int, seq: int, logit_bytes: int, checkpointing: bool = True) -> float:
    """Bytes of activations, with gradient checkpointing or without (every layer's saved tensors at
    once); approximate, see the module docstring."""
    tokens = batch * seq
    one_layer = tokens * 2 * (10 * m.hidden + 2 * m.kv_width + 4 * m.intermediate)
    layers = m.layers * tokens * m.hidden * 2 + one_layer if checkpointing else m.layers * one_layer
    return layers + tokens * m.vocab * logit_bytes


def healing_memory(
    m: Shape, method: str, strategy: str, world: int, batch: int, seq: int, r: int, checkpointing: bool = True
) -> float:
    """GiB per GPU for ``method`` (a key of ``METHODS``) under ``strategy`` "ddp" or "fsdp"."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    p, lora = parameters(m), lora_parameters(m, r)
    working_set = 2 * m.vocab * m.hidden * (1 if m.tied else 2) + 2 * 2 * layer_weights(m)
    if strategy == "ddp":
        states = 2 * p + 16 * lora + 4 * lora
    else:
        states = (2 * p + 16 * lora) / world + working_set
    if method == "kd_lora":  # resident, unsharded (DistillationTrainer today)
        states += 2 * p
    elif method == "kd_lora_sharded":
        states += 2 * p if strategy == "ddp" else 2 * p / world + working_set
    logit_bytes = (
        LM_LOGIT_BYTES
        if method == "lora"
        else TOPK_LOGIT_BYTES
        if method == "kd_lora_topk"
        else KD_LOGIT_BYTES
    )
    return (states + activations(m, batch, seq, logit_bytes, checkpointing)) / GIB


def smallest_set(m: Shape, method: str, batch: int, seq: int, r: int, gpu: int) -> str:
    """The cheapest way to fit: "DDP x any" when one GPU holds it, else the smallest FSDP world size."""
    budget = BUDGET * gpu
    if healing_memory(m, method, "ddp", 1, batch, seq, r) <= budget:
        return "1 (DDP)"
    for world in WORLD_SIZES:
        if healing_memory(m, method, "fsdp", world, batch, seq, r) <= budget:
            return f"{world} (FSDP)"
    return f"> {WORLD_SIZES[-1]}"


def gpu_seconds_per_million_tokens(m: Shape, method: str) -> float:
    """Compute-bound estimate of GPU-seconds to heal on one million tokens (see the module docstring)."""
    teacher = method in ("kd_lora", "kd_lora_sharded")
    flops = 8 * parameters(m) + (2 * parameters(m) if teacher else 0)
    return flops * 1e6 / (MFU * PEAK_FLOPS)


def presets_section() -> list[str]:
    """Per-GPU memory of the shipped presets' own healing settings (configs/*.yaml), one round-1 student.

    The pipeline does not turn gradient checkpointing on for Trainer healing today, so both columns.
    """
    import yaml

    rows = []
    for name, m in PRESETS.items():
        c = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
        method, b, s, r = c["heal_method"], c["per_device_batch_size"], c["heal_seq_len"], c["lora_r"]
        cells = [
            f"{healing_memory(m, method, 'ddp', 1, b, s, r, checkpointing=ck):.1f}" for ck in (False, True)
        ]
        fits = [smallest_set(m, method, b, s, r, g) for g in GPU_SIZES]
        rows.append([f"`{name}` ({m.name}, {method}, {b} x {s}, r={r})", *cells, *fits])
    header = ["preset", "DDP, no checkpointing", "DDP, checkpointing"] + [
        f"{g} GB (checkpointing)" for g in GPU_SIZES
    ]
    return [
        "## The shipped presets at their own settings (GiB per GPU)",
        "",
        f"Parameters: {', '.join(f'{m.name} {parameters(m):,}' for m in PRESETS.values())}.",
        "",
        *_table(header, rows),
    ]


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def report(batch: int, seq: int, r: int, tokens: int) -> str:
    """The markdown plan (every number computed by the functions above)."""
    names = list(MODELS)
    out = [
        "# Memory and time plan",
        "",
        "Computed by `python bench/memory_plan.py"
        f" --micro-batch {batch} --seq-len {seq} --lora-r {r} --calibration-tokens {tokens}`"
        " from the model configs alone; every formula, and which terms are approximate (activations,"
        " logits, time), is in that script's docstring. GiB = 2^30 bytes. LLaMA shapes: Llama-3.2-1B,"
        " Llama-3.1-8B, Llama-3.1-70B.",
        "",
        "## Model and pruning statistics (GiB)",
        "",
    ]
    stats = {k: pruning_memory(MODELS[k], tokens) for k in names}
    rows = [["parameters"] + [f"{parameters(MODELS[k]):,}" for k in names]]
    rows += [[label] + [f"{stats[k][label]:.3g}" for k in names] for label in stats[names[0]]]
    out += _table(["quantity", *names], rows)
    out += [
        "",
        "Sequential calibration needs one layer's Gram matrix; calibrating every layer at once needs all"
        " of them, which for 70B is more than a node's GPUs hold.",
        "",
        f"## Peak memory of sequential MLP pruning with refit ({tokens // 1024}k calibration tokens, GiB)",
        "",
    ]
    out += _table(
        ["mode", *names],
        [
            ["whole model resident (`prune_model`, bf16)"]
            + [f"{sequential_pruning_peak(MODELS[k], tokens, streamed=False):.1f}" for k in names],
            ["one block resident (`prune_checkpoint`, bf16)"]
            + [f"{sequential_pruning_peak(MODELS[k], tokens, streamed=True):.1f}" for k in names],
        ],
    )
    out += [
        "",
        "Streamed, the embeddings and the statistics dominate: a 70B model prunes in 18 GiB of host RAM"
        " (`prune_checkpoint` computes on the CPU). Measured on the demo model: docs/benchmarks/streamed.md.",
        "",
        f"## Peak memory of hidden-axis pruning with refit ({tokens // 1024}k calibration tokens, GiB)",
        "",
    ]
    rows = []
    for p in HIDDEN_PERCENTAGES:
        kept = ", ".join(f"{hidden_kept(MODELS[k], p)}" for k in names)
        for streamed, label in (
            (False, "whole model resident (`prune_model`)"),
            (True, "one block (`prune_checkpoint`)"),
        ):
            cells = [f"{hidden_pruning_peak(MODELS[k], tokens, p, streamed):.1f}" for k in names]
            rows.append([f"-{p:g}% (kept {kept})", label, *cells])
    out += _table(["hidden size", "mode", *names], rows)
    phases = {k: hidden_streamed_phases(MODELS[k], tokens, HIDDEN_PERCENTAGES[0]) for k in names}
    terms = {
        phase: hidden_memory_terms(MODELS["8B"], tokens, HIDDEN_PERCENTAGES[0], phase)
        for phase in HIDDEN_PHASES
    }
    out += [
        "",
        f"What is resident at once for 8B at -{HIDDEN_PERCENTAGES[0]:g}% (GiB, bf16 weights):",
        "",
    ]
    labels = list(terms["in memory"])
    rows = [[label] + [f"{terms[p][label] / GIB:.2f}" for p in HIDDEN_PHASES] for label in labels]
    rows.append(["total"] + [f"{sum(terms[p].values()) / GIB:.1f}" for p in HIDDEN_PHASES])
    out += _table(["", *HIDDEN_PHASES], rows)
    weights_line = ", ".join(f"{k} {2 * parameters(MODELS[k]) / GIB:.1f}" for k in names)
    head_phase = ", ".join(f"{k} {phases[k]['lm_head']:.1f}" for k in names if not MODELS[k].tied)
    out += [
        "",
        "In memory, the refit's statistics of every norm and the refit weights of every layer (float64) are"
        f" resident together with the model and outweigh its weights ({weights_line} GiB in bf16)."
        " Streamed, one block's statistics and"
        f" refit are resident; the lm_head's phase needs {head_phase} GiB at -{HIDDEN_PERCENTAGES[0]:g}%."
        " Measured on the demo model: docs/benchmarks/streamed-hidden.md.",
        "",
        f"## Healing memory per GPU (GiB), micro-batch {batch} x {seq} tokens, LoRA r={r}, gradient checkpointing",
        "",
    ]
    methods = METHODS
    header = ["model", "method", "DDP"] + [f"FSDP W={w}" for w in (1, 2, 4, 8)]
    rows = []
    for k in names:
        for method, label in methods.items():
            m = MODELS[k]
            row = [k, label, f"{healing_memory(m, method, 'ddp', 1, batch, seq, r):.1f}"]
            row += [f"{healing_memory(m, method, 'fsdp', w, batch, seq, r):.1f}" for w in (1, 2, 4, 8)]
            rows.append(row)
    out += _table(header, rows)
    logits = batch * seq * MODELS["1B"].vocab
    out += [
        "",
        "LoRA parameters: " + ", ".join(f"{k} {lora_parameters(MODELS[k], r):,}" for k in names) + ".",
        f"Logits alone (b*s*V at {LM_LOGIT_BYTES} / {KD_LOGIT_BYTES} bytes per element, LM loss / KD) take"
        f" {logits * LM_LOGIT_BYTES / GIB:.1f} / {logits * KD_LOGIT_BYTES / GIB:.1f}"
        " GiB for 1B at this micro-batch: with a 128k vocabulary they, not the weights, dominate small"
        " models. FSDP at W=1 costs more than DDP because the plan adds the gathered working set.",
        "",
        "## Between rounds: full weights for pruning",
        "",
        "`gather_full_state_dict` gives every rank a whole CPU copy (bf16); with 8 ranks on a node that is"
        " 8 copies in host RAM. Gathering on rank 0 only and reloading the pruned checkpoint on the others"
        " bounds it at one copy per node.",
        "",
    ]
    rows = [
        [k, f"{2 * parameters(MODELS[k]) / GIB:.0f}", f"{8 * 2 * parameters(MODELS[k]) / GIB:.0f}"]
        for k in names
    ]
    out += _table(["model", "one copy (GiB)", "8 ranks on a node (GiB)"], rows)
    out += [
        "",
        f"## Smallest GPU set (per-GPU memory within {BUDGET:.0%} of the card)",
        "",
        "'> 64' means sharding cannot fit it: an unsharded teacher larger than the card, or activations and"
        " logits (which FSDP does not shard) beyond it; a smaller micro-batch shrinks the latter"
        " linearly (`--micro-batch 1`).",
        "",
    ]
    header = ["model", "method"] + [f"{g} GB GPUs" for g in GPU_SIZES]
    rows = [
        [k, label] + [smallest_set(MODELS[k], method, batch, seq, r, g) for g in GPU_SIZES]
        for k in names
        for method, label in methods.items()
    ]
    out += _table(header, rows)
    out += ["", *presets_section()]
    out += [
        "",
        "## Time (compute-bound estimate)",
        "",
        f"GPU-seconds per million healing tokens at {MFU:.0%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s;"
        " calibration is a forward pass only (2P FLOPs per token).",
        "",
    ]
    rows = [
        [k]
        + [f"{gpu_seconds_per_million_tokens(MODELS[k], meth):.0f}" for meth in methods]
        + [f"{2 * parameters(MODELS[k]) * tokens / (MFU * PEAK_FLOPS):.1f}"]
        for k in names
    ]
    out += _table(["model", *methods.values(), f"calibration, {tokens // 1024}k tokens (s)"], rows)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "memory-plan.md"))
    args = parser.parse_args(argv)
    text = report(args.micro_batch, args.seq_len, args.lora_r, args.calibration_tokens)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
