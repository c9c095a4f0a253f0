"""Shared fixtures: tiny random models of every supported family and an offline character tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB_SIZE = 104  # 4 special tokens + printable ASCII (95), rounded up

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "llama": (LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(sliding_window=32)),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    "gemma": (GemmaConfig, {}),
    "gemma2": (Gemma2Config, dict(sliding_window=32)),
}
FAMILY_NAMES = list(CONFIGS)  # GLU families

_TOKENS = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PLAIN_CONFIGS = {  # plain fc1/fc2 MLPs; GPT-2 stores Conv1D weights [in, out]
    "gpt2": (GPT2Config, dict(n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=256, **_TOKENS)),
    "opt": (
        OPTConfig,
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            **_TOKENS,
        ),
    ),
    "phi": (
        PhiConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            **_TOKENS,
        ),
    ),
}
PLAIN_FAMILY_NAMES = list(PLAIN_CONFIGS)


def make_tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` in eval mode (deterministic for a seed)."""
    if family in PLAIN_CONFIGS:
        config_class, kwargs = PLAIN_CONFIGS[family]
        config = config_class(**{**kwargs, **overrides})
    else:
        config_class, extra = CONFIGS[family]
        config = config_class(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init of these tiny models is close to zero; scale up so units differ clearly.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built offline (no hub access)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Default-suite tests run torch on one thread: tiny models gain nothing from more, and on a busy
    machine (CI beside other jobs) two threads per process wait on each other (one test measured 3.8 s on
    one thread, 42.5 s on two, at load 10 on 2 cores). The slow set (the real model) keeps torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes whole neurons, heads or blocks from a network.",
    "A small model can still answer simple questions well.",
    "Paris is the capital of France and a large city.",
    "Calibration text decides which units matter most.",
    "Fairness is measured on pairs that differ in one word.",
]


@pytest.fixture
def calibration_batches(tokenizer):
    """Four padded batches of two sentences: a list of dicts with input_ids and attention_mask."""
    batches = []
    for i in range(0, 8, 2):
        texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], SAMPLE_TEXTS[(i + 1) % len(SAMPLE_TEXTS)]]
        batches.append(dict(tokenizer(texts, padding=True, return_tensors="pt")))
    return batches
