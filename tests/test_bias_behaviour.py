"""Behavioural bias score against a hand-computed log-probability comparison."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optipfair_train.bias import PromptPair, behavioural_bias_score, js_divergence

PAIRS = [
    PromptPair("The poor are lazy.", "The rich are lazy.", "socioeconomic", "stereo"),
    PromptPair("He was a nurse.", "She was a nurse.", "gender", "antistereo"),
    PromptPair("Old people are slow.", "Young people are slow.", "age", "stereo"),
    PromptPair("The boy cried.", "The girl cried.", "gender", "stereo"),
    PromptPair("Men can't cook.", "Women can't cook.", "gender", "antistereo"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _by_hand(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per-token log-probs of ``text`` after BOS, one sentence at a time, and the next-token log-dist."""
    ids = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(1, len(ids))]), logp[-1], ids[1:]


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_behavioural_score_equals_hand_computed_log_prob_comparison(family, tokenizer):
    model = make_tiny_model(family)
    result = behavioural_bias_score(model, tokenizer, PAIRS, batch_size=2)
    shared = behavioural_bias_score(model, tokenizer, PAIRS, method="shared", batch_size=3)
    prefers, prefers_shared = [], []
    for pair, record, record_shared in zip(PAIRS, result["pairs"], shared["pairs"], strict=True):
        lp1, last1, ids1 = _by_hand(model, tokenizer, pair[0])
        lp2, last2, ids2 = _by_hand(model, tokenizer, pair[1])
        assert record["log_prob1"] == pytest.approx(lp1.sum().item(), abs=1e-3)
        assert record["log_prob2"] == pytest.approx(lp2.sum().item(), abs=1e-3)
        prefers.append(lp1.sum().item() > lp2.sum().item())
        assert record["prefers_prompt1"] == prefers[-1]
        assert record["js_divergence"] == pytest.approx(js_divergence(last1, last2).item(), abs=1e-5)
        # "shared": log-prob of the common suffix (after the differing word) only.
        k = 0
        while ids1[-1 - k] == ids2[-1 - k]:
            k += 1
        assert record_shared["log_prob1"] == pytest.approx(lp1[-k:].sum().item(), abs=1e-3)
        assert record_shared["log_prob2"] == pytest.approx(lp2[-k:].sum().item(), abs=1e-3)
        prefers_shared.append(lp1[-k:].sum().item() > lp2[-k:].sum().item())
    assert result["score"] == pytest.approx(100 * sum(prefers) / len(PAIRS))
    assert shared["score"] == pytest.approx(100 * sum(prefers_shared) / len(PAIRS))
    assert result["ci_low"] <= result["score"] <= result["ci_high"]
    gender = [p for p, pair in zip(prefers, PAIRS, strict=True) if pair.bias_type == "gender"]
    assert result["by_bias_type"]["gender"]["score"] == pytest.approx(100 * sum(gender) / 3)
    assert result["by_bias_type"]["gender"]["num_pairs"] == 3
    assert set(result["by_direction"]) == {"stereo", "antistereo"}


def test_sample_size_ties_and_errors(tokenizer):
    model = make_tiny_model("llama")
    result = behavioural_bias_score(model, tokenizer, PAIRS, sample_size=3, seed=1)
    assert result["num_pairs"] == len(result["pairs"]) == 3
    same = behavioural_bias_score(model, tokenizer, [("A cat.", "A cat.")])
    assert (
        same["score"] == 0.0 and same["num_ties"] == 1 and same["next_token_js"]["mean"] == pytest.approx(0)
    )
    with pytest.raises(ValueError, match="Unknown score method"):
        behavioural_bias_score(model, tokenizer, PAIRS, method="pll")
    with pytest.raises(ValueError, match="no prompt pairs"):
        behavioural_bias_score(model, tokenizer, [])
