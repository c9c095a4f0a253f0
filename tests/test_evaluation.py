"""Tests of optipfair_train.evaluation: perplexity, greedy generation, speed, parameter count."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXTS, make_char_tokenizer, make_tiny_model

from optipfair_train import evaluation
from optipfair_train.analysis import count_parameters
from optipfair_train.data import tokenize_for_lm
from optipfair_train.evaluation import greedy_generate, perplexity, tokens_per_second

WIKITEXT = Path(__file__).parents[1].parent / "shared" / "data" / "wikitext-2"
TEXTS = SAMPLE_TEXTS * 2


def _manual_perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(blocks).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


def _manual_greedy(model: torch.nn.Module, ids: list[int], steps: int, eos: int) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
    return new


# ---------------------------------------------------------------- perplexity


def test_perplexity_equals_hand_computed(tiny_model, tokenizer):
    blocks = tokenize_for_lm(tokenizer, TEXTS, seq_len=40)
    expected = _manual_perplexity(tiny_model, blocks)
    # batch_size 4 does not divide the number of blocks: the last batch is smaller
    got = perplexity(tiny_model, tokenizer, TEXTS, seq_len=40, batch_size=4)
    assert blocks.shape[0] % 4 != 0
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1 < got < 10 * tokenizer.vocab_size  # a random model: high, but finite


def test_perplexity_from_input_ids_and_max_tokens(tokenizer):
    model = make_tiny_model("llama")
    blocks = tokenize_for_lm(tokenizer, TEXTS, seq_len=32)
    from_texts = perplexity(model, tokenizer, TEXTS, seq_len=32)
    assert perplexity(model, input_ids=blocks) == pytest.approx(from_texts, rel=1e-6)
    assert perplexity(model, input_ids=blocks.flatten(), seq_len=32) == pytest.approx(from_texts, rel=1e-6)
    first_two = _manual_perplexity(model, blocks[:2])
    assert perplexity(model, tokenizer, TEXTS, seq_len=32, max_tokens=64 + 31) == pytest.approx(
        first_two, rel=1e-5
    )
    assert perplexity(model, input_ids=blocks, max_tokens=64) == pytest.approx(first_two, rel=1e-5)


def test_perplexity_restores_mode_and_needs_no_grad(tokenizer):
    model = make_tiny_model("qwen2").train()
    value = perplexity(model, tokenizer, TEXTS, seq_len=32, show_progress=True)
    assert model.training and math.isfinite(value)
    model.eval()
    perplexity(model, tokenizer, TEXTS, seq_len=32)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_perplexity_of_bfloat16_model_is_close(tokenizer):
    model = make_tiny_model("llama")
    full = perplexity(model, tokenizer, TEXTS, seq_len=32)
    half = perplexity(model.to(torch.bfloat16), tokenizer, TEXTS, seq_len=32)
    assert half == pytest.approx(full, rel=0.05)


def test_perplexity_bad_input(tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="needs a tokenizer and texts, or input_ids"):
        perplexity(model)
    with pytest.raises(ValueError, match="not both"):
        perplexity(model, tokenizer, TEXTS, input_ids=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="smaller than one block"):
        perplexity(model, tokenizer, TEXTS, seq_len=32, max_tokens=16)
    with pytest.raises(ValueError, match="S >= 2"):
        perplexity(model, input_ids=torch.ones(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        perplexity(model, tokenizer, TEXTS, batch_size=0)


# ---------------------------------------------------------------- generation and speed


def test_greedy_generate_returns_only_the_new_greedy_text(tiny_model, tokenizer):
    prompt = "The capital of France is"
    expected = _manual_greedy(
        tiny_model, tokenizer.convert_tokens_to_ids(list(prompt)), 8, tokenizer.eos_token_id
    )
    got = greedy_generate(tiny_model, tokenizer, prompt, max_new_tokens=8)
    assert got == tokenizer.decode(expected, skip_special_tokens=True)
    assert len(got) <= 8


def test_greedy_generate_chat_template(caplog):
    model = make_tiny_model("llama")
    plain = make_char_tokenizer()
    with caplog.at_level(logging.WARNING, logger="optipfair_train.evaluation"):
        no_template = greedy_generate(model, plain, "hi", max_new_tokens=6, chat=True)
    assert "no chat template" in caplog.text
    assert no_template == greedy_generate(model, plain, "hi", max_new_tokens=6)
    chat = make_char_tokenizer()
    chat.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    model.train()
    assert greedy_generate(model, chat, "hi", max_new_tokens=6, chat=True) == greedy_generate(
        model, plain, "Q: hi\nA:", max_new_tokens=6
    )
    assert model.training


def test_greedy_generate_bad_input(tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        greedy_generate(model, tokenizer, "")
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tokenizer, "a", max_new_tokens=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tokens_per_second(family, tokenizer):
    model = make_tiny_model(family).train()
    speed = tokens_per_second(
        model, tokenizer, prompt="hello there", max_new_tokens=4, batch_size=2, warmup=0, runs=2
    )
    assert speed["prefill_tokens_per_second"] > 0 and speed["decode_tokens_per_second"] > 0
    assert (
        speed["prompt_tokens"] == len("hello there") and speed["new_tokens"] == 4 and speed["batch_size"] == 2
    )
    assert speed["decode_tokens_per_second"] == pytest.approx(2 * 4 / speed["decode_seconds"])
    assert model.training
    with pytest.raises(ValueError, match="runs must be a positive integer"):
        tokens_per_second(model, tokenizer, runs=0)
    with pytest.raises(ValueError, match="warmup"):
        tokens_per_second(model, tokenizer, warmup=-1)


def test_tokens_per_second_decodes_from_the_cache(tokenizer):
    """Every decode step feeds one token and sees the cache filled by all tokens before it."""
    model = make_tiny_model("llama")
    seen: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], cache.get_seq_length()))

    model.register_forward_pre_hook(record, with_kwargs=True)
    tokens_per_second(model, tokenizer, prompt="hello", max_new_tokens=3, warmup=0, runs=1)
    assert seen == [(5, 0), (1, 5), (1, 6), (1, 7)]


# ---------------------------------------------------------------- parameters


def _by_hand(tied: bool) -> int:
    hidden, inter, layers, vocab, q_dim, kv_dim = 64, 128, 4, 104, 4 * 16, 2 * 16
    attention = hidden * q_dim * 2 + hidden * kv_dim * 2  # q, o and k, v
    block = attention + 3 * hidden * inter + 2 * hidden  # + gate/up/down + two norms
    return vocab * hidden * (1 if tied else 2) + layers * block + hidden


def test_count_parameters_tied_embeddings_counted_once():
    untied = make_tiny_model("llama")
    tied = make_tiny_model("llama-tied")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert count_parameters(untied) == _by_hand(tied=False)
    assert count_parameters(tied) == _by_hand(tied=True)
    # sharing the same storage through two distinct Parameter objects still counts once
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.data)
    assert count_parameters(untied) == _by_hand(tied=True)


def test_count_parameters_trainable_only():
    model = make_tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == _by_hand(tied=False) - 104 * 64


def test_evaluation_module_has_no_print():
    assert "print(" not in Path(evaluation.__file__).read_text()


# ---------------------------------------------------------------- the real demo model (slow)


@pytest.fixture(scope="module")
def demo():
    from optipfair_train.models import load_model_and_tokenizer

    return load_model_and_tokenizer("demo")


@pytest.mark.slow
@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"shared test data not found at {WIKITEXT}")
def test_demo_wikitext_perplexity(demo):
    from optipfair_train.data import load_texts

    model, tokenizer = demo
    texts = load_texts(str(WIKITEXT / "test.txt"))
    value = perplexity(model, tokenizer, texts, seq_len=512, max_tokens=16 * 512)
    assert 20 < value < 40  # measured 29.6 (the exact number depends on how the file is joined)


@pytest.mark.slow
def test_demo_model_quality_and_size(demo):
    from optipfair_train.data import load_texts

    model, tokenizer = demo
    assert count_parameters(model) == 134_515_008
    assert "Paris" in greedy_generate(model, tokenizer, "The capital of France is", max_new_tokens=8)
    assert greedy_generate(model, tokenizer, "The capital of France is", chat=True).strip()
    value = perplexity(
        model, tokenizer, load_texts("demo", split="evaluation"), seq_len=512, max_tokens=4 * 512
    )
    assert 5 < value < 60
