"""Quality and speed measures: perplexity, greedy generation, tokens per second, parameter count."""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerBase

from optipfair_train.data import check_token_ids, tokenize_for_lm

logger = logging.getLogger(__name__)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and inference mode inside; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _blocks_for_perplexity(
    tokenizer: PreTrainedTokenizerBase | None,
    texts: Sequence[str] | None,
    input_ids: torch.Tensor | None,
    seq_len: int,
    max_tokens: int | None,
) -> torch.Tensor:
    max_blocks = None
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
        width = input_ids.shape[-1] if input_ids is not None and input_ids.dim() == 2 else seq_len
        max_blocks = max_tokens // width
        if max_blocks == 0:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one block of {width} tokens.")
    if input_ids is not None:
        if texts is not None:
            raise ValueError("Pass either texts (with a tokenizer) or input_ids, not both.")
        if input_ids.dim() == 1:
            usable = (input_ids.numel() // seq_len) * seq_len
            if usable == 0:
                raise ValueError(f"input_ids has {input_ids.numel()} tokens, fewer than seq_len={seq_len}.")
            input_ids = input_ids[:usable].view(-1, seq_len)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2 or input_ids.shape[0] == 0:
            raise ValueError(
                f"input_ids must be a 1-D token stream or [N, S] blocks with S >= 2, got shape {tuple(input_ids.shape)}."
            )
        blocks = input_ids.long()
        return blocks if max_blocks is None else blocks[:max_blocks]
    if tokenizer is None or texts is None:
        raise ValueError("perplexity needs a tokenizer and texts, or input_ids.")
    return tokenize_for_lm(tokenizer, texts, seq_len=seq_len, num_sequences=max_blocks)


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    texts: Sequence[str] | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    show_progress: bool = False,
) -> float:
    """Perplexity ``exp(mean token NLL)`` over non-overlapping blocks of ``seq_len`` tokens.

    Every token of a block but the first is predicted from the ones before it (no context crosses
    blocks). Runs under ``torch.inference_mode()`` in eval mode and restores the model's train/eval mode.
    Only one batch of logits exists at a time, and each row is upcast to float32 on its own.

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer, texts: the text to score (cut into blocks by :func:`~optipfair_train.data.tokenize_for_lm`).
        input_ids: instead of texts, ``[N, S]`` blocks (used as they are) or a 1-D stream (cut into
            ``seq_len`` blocks).
        seq_len: block length for texts and 1-D streams.
        max_tokens: score at most ``max_tokens // block length`` blocks.
        batch_size: blocks per forward pass.
        show_progress: show a tqdm bar over batches.

    Example:
        >>> texts = load_texts("demo", split="evaluation")
        >>> round(perplexity(model, tokenizer, texts, seq_len=512, max_tokens=16 * 512), 1)
        20.0
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    blocks = _blocks_for_perplexity(tokenizer, texts, input_ids, seq_len, max_tokens)
    check_token_ids(blocks, model.get_input_embeddings().num_embeddings, "perplexity: input_ids")
    device = _device_of(model)
    total_nll = 0.0
    total_tokens = 0
    starts = range(0, blocks.shape[0], batch_size)
    with _eval_mode(model):
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not show_progress):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for row in range(batch.shape[0]):
                total_nll += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").item()
            total_tokens += batch.shape[0] * (batch.shape[1] - 1)
            del logits
    mean_nll = total_nll / total_tokens
    logger.debug(
        "perplexity over %d blocks, %d predicted tokens: mean NLL %.4f", len(blocks), total_tokens, mean_nll
    )
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if chat:
        logger.warning("The tokenizer has no chat template; using the plain prompt.")
    return tokenizer(prompt, return_tensors="pt").input_ids


def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 20,
    chat: bool = False,
) -> str:
    """Greedy (deterministic) continuation of ``prompt``; returns only the new text.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer.
        prompt: the prompt text.
        max_new_tokens: at most this many new tokens (generation stops earlier at EOS).
        chat: wrap the prompt as a user turn with the tokenizer's chat template (plain prompt if it has none).

    Example:
        >>> greedy_generate(model, tokenizer, "The capital of France is", max_new_tokens=2)
        ' Paris.'
        >>> greedy_generate(model, tokenizer, "What is the capital of France?", chat=True)
        'The capital of France is Paris.'
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    _check_positive(max_new_tokens=max_new_tokens)
    ids = _prompt_ids(tokenizer, prompt, chat).to(_device_of(model))
    model_config = getattr(model, "generation_config", None)
    eos = getattr(model_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )
    with _eval_mode(model):
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def batch_prompt_ids(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, batch_size: int
) -> torch.Tensor:
    """``batch_size`` copies of the tokenized ``prompt`` on the model's device (speed measurements)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("The prompt gives no tokens; pass a non-empty prompt.")
    return ids.expand(batch_size, -1).contiguous().to(_device_of(model))


def new_kv_cache(model: torch.nn.Module) -> tuple[str, DynamicCache]:
    """``(argument name, empty cache)`` for cached decoding: ``model(ids, use_cache=True, **{name: cache})``.

    Transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` still works there, with a
    deprecation warning); a cache object the caller owns is filled in place, so no output attribute is read.

    Example:
        >>> name, cache = new_kv_cache(model)  # doctest: +SKIP
        >>> logits = model(input_ids=ids, use_cache=True, **{name: cache}).logits  # doctest: +SKIP
    """
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return cache_arg, DynamicCache(config=model.config)


def timed_generation(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Seconds of one prefill (a forward pass over ``ids``) and of ``max_new_tokens`` cached greedy decode
    steps; call it in eval and inference mode. ``timer`` is injectable for tests.

    Example:
        >>> with torch.inference_mode():
        ...     prefill_s, decode_s = timed_generation(model.eval(), ids, max_new_tokens=8)  # doctest: +SKIP
    """
    cache_arg, cache = new_kv_cache(model)
    start = timer()
    out = model(input_ids=ids, use_cache=True, **{cache_arg: cache})
    prefilled = timer()
    next_ids = out.logits[:, -1:].argmax(-1)
    for _ in range(max_new_tokens):
        out = model(input_ids=next_ids, use_cache=True, **{cache_arg: cache})
        next_ids = out.logits[:, -1:].argmax(-1)
    next_ids.cpu()  # waits for an accelerator to finish
    done = timer()
    return prefilled - start, done - prefilled


SPEED_PROMPT = "Structured pruning removes whole neurons, attention heads or blocks from a language model."


def tokens_per_second(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str = SPEED_PROMPT,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    warmup: int = 1,
    runs: int = 3,
) -> dict[str, float]:
    """Measure prefill and greedy decode speed with the KV cache (median over ``runs``).

    Prefill is one forward pass over the prompt (``batch_size`` copies); decode is ``max_new_tokens``
    single-token forward passes that reuse the cache. Speeds count tokens of all sequences in the batch.

    Returns:
        ``prefill_tokens_per_second``, ``decode_tokens_per_second``, ``prefill_seconds``, ``decode_seconds``,
        ``prompt_tokens``, ``new_tokens``, ``batch_size``.

    Example:
        >>> speed = tokens_per_second(model, tokenizer, max_new_tokens=16)
        >>> sorted(speed)[:2]
        ['batch_size', 'decode_seconds']
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size, runs=runs)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}.")
    ids = batch_prompt_ids(model, tokenizer, prompt, batch_size)
    prefill_times: list[float] = []
    decode_times: list[float] = []
    with _eval_mode(model):
        for run in range(warmup + runs):
            prefill_seconds, decode_seconds = timed_generation(model, ids, max_new_tokens)
            if run >= warmup:
                prefill_times.append(prefill_seconds)
                decode_times.append(decode_seconds)
    prefill = statistics.median(prefill_times)
    decode = statistics.median(decode_times)
    return {
        "prefill_tokens_per_second": batch_size * ids.shape[1] / prefill,
        "decode_tokens_per_second": batch_size * max_new_tokens / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "prompt_tokens": ids.shape[1],
        "new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
