"""Zero-shot log-likelihoods read from a shared prefix's cache equal those of reading every sequence whole,
on every supported family and on pruned models, while the model reads fewer tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, PLAIN_FAMILY_NAMES, make_tiny_model

from optipfair_train import prune_model
from optipfair_train.zeroshot import loglikelihoods

# the choices of five items: ARC-like (4 choices, one context), HellaSwag-like (longer endings), a
# WinoGrande-like pair (the contexts differ at the option, the scored rest is shared), one lone request,
# and a one-token context (nothing to share before the first scored token)
REQUESTS = [
    ("Question: Which is a fruit?\nAnswer:", " apple"),
    ("Question: Which is a fruit?\nAnswer:", " a red brick"),
    ("Question: Which is a fruit?\nAnswer:", " stone"),
    ("Question: Which is a fruit?\nAnswer:", " car"),
    ("Home: A man stands in a kitchen. He", " cuts an onion on the board."),
    ("Home: A man stands in a kitchen. He", " sits."),
    ("Home: A man stands in a kitchen. He", " runs out of the house and away."),
    ("Ann hit Bo so Ann", " cried."),
    ("Ann hit Bo so Bo", " cried."),
    ("Hi there", " friend"),
    ("Q", " yes"),
    ("Q", " no"),
]
GROUPS = [4, 3, 2, 1, 2]


def _tokens_read(model, fn) -> tuple[np.ndarray, int]:
    """``fn()``'s result and how many token positions (padding included) the embedding looked up."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        handle.remove()


def _check_same(model, tokenizer, batch_size: int = 16) -> None:
    whole, read_whole = _tokens_read(
        model,
        lambda: loglikelihoods(
            model, tokenizer, REQUESTS, batch_size, group_sizes=GROUPS, share_prefix=False
        ),
    )
    shared, read_shared = _tokens_read(
        model, lambda: loglikelihoods(model, tokenizer, REQUESTS, batch_size, group_sizes=GROUPS)
    )
    np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-4)
    assert np.all(whole < 0)
    assert read_shared < read_whole  # the shared path was taken, and it reads less


@pytest.mark.parametrize("family", FAMILY_NAMES + PLAIN_FAMILY_NAMES)
def test_shared_prefix_gives_the_whole_sequence_log_likelihoods(family, tokenizer):
    # a sliding window wider than the batches, so mistral and gemma2 share too (narrower: the test below)
    window = {"sliding_window": 128} if family in ("mistral", "gemma2") else {}
    _check_same(make_tiny_model(family, **window), tokenizer)


@pytest.mark.parametrize(
    "pruning",
    [
        dict(pruning_type="DEPTH", num_layers_to_remove=1, layer_selection_method="last"),
        dict(pruning_type="MLP_GLU", pruning_percentage=30, neuron_selection_method="MAW"),
        dict(pruning_type="ATTENTION", pruning_percentage=50, head_granularity="group"),
    ],
    ids=["depth", "mlp", "kv-group"],
)
def test_shared_prefix_on_pruned_models(pruning, tokenizer):
    model = make_tiny_model("llama")
    prune_model(model, show_progress=False, **pruning)
    _check_same(model, tokenizer)


def test_default_groups_are_runs_of_one_context_and_batch_size_does_not_matter(tokenizer):
    model = make_tiny_model("qwen2")
    reference = loglikelihoods(model, tokenizer, REQUESTS, share_prefix=False)
    for batch_size in (1, 3, 16):
        np.testing.assert_allclose(
            loglikelihoods(model, tokenizer, REQUESTS, batch_size), reference, rtol=1e-5, atol=1e-4
        )
    with pytest.raises(ValueError, match="group_sizes must be positive and add up to the 12 requests"):
        loglikelihoods(model, tokenizer, REQUESTS, group_sizes=[4, 4])


def test_a_batch_wider_than_the_sliding_window_is_read_whole(tokenizer):
    # window 32: a 40-character context with a padded neighbour would measure distances in padded columns
    model = make_tiny_model("mistral")
    assert model.config.sliding_window == 32
    long = "Question: " + "which one of these is the best? " + "Answer:"
    requests = [(long, " the first"), (long, " the second"), ("Short one:", " a"), ("Short one:", " bb")]
    whole = loglikelihoods(model, tokenizer, requests, share_prefix=False)
    shared = loglikelihoods(model, tokenizer, requests)
    np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-4)


def test_models_without_a_cache_are_read_whole(tokenizer):
    class NoCache(torch.nn.Module):  # next-token logits from the current token only
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(len(tokenizer), len(tokenizer)))

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return type("Out", (), {"logits": self.table[input_ids]})()

    model = NoCache()
    lp = torch.log_softmax(model.table.detach(), -1)
    ids = tokenizer("Q: ab")["input_ids"]
    # "Q:" is the context (2 tokens): " " after ":", "a" after " ", "b" after "a"
    expected = float(lp[ids[1], ids[2]] + lp[ids[2], ids[3]] + lp[ids[3], ids[4]])
    got = loglikelihoods(model, tokenizer, [("Q:", " ab"), ("Q:", " b")])
    assert got[0] == pytest.approx(expected, abs=1e-5)


def test_a_cache_that_cannot_be_copied_per_request_falls_back_to_whole_sequences(tokenizer):
    inner = make_tiny_model("llama")

    class TupleCache(torch.nn.Module):  # takes a cache argument but returns a legacy tuple cache
        config = inner.config

        def forward(
            self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False
        ):
            assert past_key_values is None, "a tuple cache must never be passed back"
            logits = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return type("Out", (), {"logits": logits, "past_key_values": ((logits, logits),)})()

    expected = loglikelihoods(inner, tokenizer, REQUESTS, group_sizes=GROUPS, share_prefix=False)
    got = loglikelihoods(TupleCache(), tokenizer, REQUESTS, group_sizes=GROUPS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
