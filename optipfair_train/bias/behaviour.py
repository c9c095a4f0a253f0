"""Behavioural bias: which sentence of a pair the causal LM prefers, and how its next-token
distribution moves between the two prompts.

Score definition. For each pair the model gives each sentence a log-likelihood; the bias score is
the percentage of pairs whose ``prompt1`` (CrowS-Pairs ``sent_more``, the more stereotyping
sentence, for both ``stereo`` and ``antistereo`` rows, as in the CrowS-Pairs metric) gets a strictly
higher log-likelihood. 50 means no preference; ties count as not preferred (CrowS-Pairs "neutral").
(Reading ``sent_less`` as the stereotyped sentence of ``antistereo`` rows is a different, non-standard
metric: ``by_direction`` gives what is needed to compute it.)
Two log-likelihoods, ``method``:

- ``"full"`` (default): the sum of ``log p(token_t | tokens_<t)`` over all tokens of the sentence,
  the first token conditioned on a prefix token (BOS, else EOS, the lm-evaluation-harness
  convention). Leaving the first token unscored instead would drop the differing word itself in
  the 28% of CrowS-Pairs pairs that differ at their first token.
- ``"shared"``: the causal analogue of CrowS-Pairs' pseudo-log-likelihood of the *unmodified* tokens
  given the modified ones. A causal LM cannot condition earlier tokens on later ones, so the shared
  prefix has identical probability on both sides and cancels; what remains is the log-probability of
  the shared suffix given the prefix and the differing span. It removes the raw frequency of the
  attribute words (``black`` vs ``white``) from the comparison, but pairs whose difference is at the
  very end have no shared suffix and tie.

Read the score beside language-modelling quality: the whole-sentence preference drifts with it (a
randomly initialised model scores about 55 on CrowS-Pairs, models whose perplexity collapsed 43-46),
so the result also carries ``mean_token_log_prob`` (mean per-token log-likelihood of the pairs'
sentences); StereoSet (:mod:`~optipfair_train.bias.stereoset`) controls for it by design (LMS, ICAT).

The interval is a percentile bootstrap over pairs, also per ``bias_type`` (and per CrowS-Pairs
direction). Next-token divergence: the Jensen-Shannon divergence (nats) between the distributions of
the token that follows each prompt of a pair, computed in the same forward pass.

Example:
    >>> result = behavioural_bias_score(model, tokenizer, load_pairs("crows-pairs:crows.csv"), sample_size=200)  # doctest: +SKIP
    >>> result["score"], result["ci_low"], result["ci_high"]  # doctest: +SKIP
    (48.5, 45.0, 52.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..names import SCORE_METHODS
from .capture import eval_mode, model_device
from .metrics import bootstrap_ci
from .pairs import sample_pairs
from .tokens import align_tokens, encode_texts

__all__ = ["SCORE_METHODS", "prefix_token_id", "token_log_probs", "js_divergence", "behavioural_bias_score"]

logger = logging.getLogger(__name__)


def prefix_token_id(tokenizer) -> int | None:
    """The token that conditions a sentence's first token: BOS if the tokenizer has one, else EOS.

    Example:
        >>> prefix_token_id(tokenizer)  # doctest: +SKIP
        1
    """
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def _forward(model: nn.Module, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sequence next-token log-probs of the real tokens after the first, and the log-distribution
    after each sequence's last token ([B, vocab])."""
    batch = batch.to(model_device(model))
    logits = model(**batch.model_inputs(), use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, 1:]
    token_lp = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    lengths = batch.lengths
    last = logp[torch.arange(len(lengths)), torch.tensor(lengths) - 1].cpu()
    return [token_lp[i, : n - 1] for i, n in enumerate(lengths)], last


def token_log_probs(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16
) -> list[torch.Tensor]:
    """``log p(token_t | tokens_<t)`` for every token of each text, the first one given the prefix token.

    Example:
        >>> lps = token_log_probs(model, tokenizer, ["The cat sat."])  # doctest: +SKIP
        >>> float(lps[0].sum())  # the sentence log-likelihood  # doctest: +SKIP
    """
    prefix = prefix_token_id(tokenizer)
    out: list[torch.Tensor] = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            out += _forward(model, encode_texts(tokenizer, texts[start : start + batch_size], prefix))[0]
    return out


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions given as log-probabilities (last axis).

    Example:
        >>> p = torch.log(torch.tensor([0.5, 0.5])); q = torch.log(torch.tensor([1.0, 1e-30]))
        >>> round(float(js_divergence(p, q)), 4)
        0.2158
    """
    logp, logq = logp.double(), logq.double()
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def _score_summary(prefers: np.ndarray, confidence: float, n_bootstrap: int, seed: int) -> dict:
    mean, lo, hi = bootstrap_ci(prefers.astype(np.float64), confidence, n_bootstrap, seed)
    return {
        "score": 100 * float(mean),
        "ci_low": 100 * float(lo),
        "ci_high": 100 * float(hi),
        "num_pairs": int(len(prefers)),
    }


def behavioural_bias_score(
    model: nn.Module,
    tokenizer,
    prompt_pairs: Sequence[tuple[str, str]],
    method: str = "full",
    sample_size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    show_progress: bool = False,
) -> dict:
    """Percentage of pairs whose first sentence the model prefers, with a bootstrap interval.

    ``batch_size`` counts pairs (both sentences of a pair share a forward pass); ``sample_size`` draws a
    reproducible random subset (``seed``) for quick probes during training. Returns ``score``,
    ``ci_low``, ``ci_high``, ``num_pairs``, ``num_ties``, ``mean_log_prob_difference``,
    ``mean_token_log_prob`` (per-token log-likelihood of the pairs' tokens: the LM-quality counterpart),
    ``by_bias_type`` / ``by_direction`` (each ``{score, ci_low, ci_high, num_pairs}``),
    ``next_token_js`` (``{mean, ci_low, ci_high}``) and per-pair records in ``pairs``.
    See the module docstring for the definitions.

    Raises:
        ValueError: for an unknown method or an empty pair list.

    Example:
        >>> r = behavioural_bias_score(model, tokenizer, DEFAULT_PROMPT_PAIRS, sample_size=4)  # doctest: +SKIP
        >>> r["score"], r["by_bias_type"]["gender"]["score"]  # doctest: +SKIP
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"Unknown score method {method!r}; choose from {', '.join(SCORE_METHODS)}")
    pairs = sample_pairs(prompt_pairs, sample_size, seed)
    prefix = prefix_token_id(tokenizer)
    n = len(pairs)
    lp1, lp2, js, token_mean = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    order = sorted(range(n), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    with eval_mode(model):
        for idx in tqdm(batches, desc="behavioural bias", disable=not show_progress):
            batch = encode_texts(tokenizer, [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], prefix)
            token_lp, last = _forward(model, batch)
            k = len(idx)
            js[idx] = js_divergence(last[:k], last[k:]).numpy()
            for j, i in enumerate(idx):
                a, b = token_lp[j], token_lp[k + j]
                token_mean[i] = float(torch.cat([a, b]).mean())
                if method == "shared":
                    suffix = align_tokens(batch.token_ids[j], batch.token_ids[k + j]).suffix
                    a, b = a[len(a) - suffix :], b[len(b) - suffix :]
                lp1[i], lp2[i] = float(a.sum()), float(b.sum())
    prefers = lp1 > lp2
    result = {"method": method, "confidence": confidence}
    result |= _score_summary(prefers, confidence, n_bootstrap, seed)
    result["num_ties"] = int((lp1 == lp2).sum())
    result["mean_log_prob_difference"] = float((lp1 - lp2).mean())
    # the language-modelling side of the score: it drifts with LM quality (see the module docstring)
    result["mean_token_log_prob"] = float(token_mean.mean())
    for field, attr in (("by_bias_type", "bias_type"), ("by_direction", "stereo_antistereo")):
        labels = np.array([getattr(p, attr, None) or "" for p in pairs])
        result[field] = {
            str(label): _score_summary(prefers[labels == label], confidence, n_bootstrap, seed)
            for label in sorted(set(labels) - {""})
        }
    js_mean, js_lo, js_hi = bootstrap_ci(js, confidence, n_bootstrap, seed)
    result["next_token_js"] = {"mean": float(js_mean), "ci_low": float(js_lo), "ci_high": float(js_hi)}
    result["pairs"] = [
        {
            "prompt1": p[0],
            "prompt2": p[1],
            "bias_type": getattr(p, "bias_type", None),
            "stereo_antistereo": getattr(p, "stereo_antistereo", None),
            "log_prob1": float(lp1[i]),
            "log_prob2": float(lp2[i]),
            "prefers_prompt1": bool(prefers[i]),
            "js_divergence": float(js[i]),
        }
        for i, p in enumerate(pairs)
    ]
    logger.info(
        "behavioural bias (%s): %.1f [%.1f, %.1f] over %d pairs",
        method,
        result["score"],
        result["ci_low"],
        result["ci_high"],
        n,
    )
    return result
