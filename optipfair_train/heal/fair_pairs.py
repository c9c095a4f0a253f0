"""A counterfactual-invariance fairness loss: the model should predict the same words whichever group a
sentence names.

For a StereoSet **build** item, each of its stereotype and anti-stereotype texts (an intersentence item's
context followed by the option) is paired with a counterfactual: gender items through
:func:`~optipfair_train.bias.counterfactual.swap_gender` ("mother" -> "father", "she" -> "he"), the other
bias types by replacing the item's target term with another target of the same type from the build half
("Ethiopian" -> "Italian", "chess player" -> "nurse"; whole words, case of the first letter kept). The two
texts are tokenized, aligned on their common tokens (:class:`difflib.SequenceMatcher` on the token ids),
and at every aligned token after the first difference both of the model's next-token distributions are
pulled toward one target: the average of the two distributions of the model as it was before healing
(the *anchor*: a frozen copy, or a PEFT model's base with its adapters disabled), by
``(KL(r||p) + KL(r||q)) / 2``, averaged over the text's aligned positions and over the item's texts.

Why the anchor: pulling the two distributions toward each other alone is most cheaply satisfied by a
model that stops reading its context; measured on the demo compression
(docs/benchmarks/fair-heal-counterfactual.md), that version bought its lower SS with LMS (intersentence
items above all) and perplexity. Anchored, the only zero of the loss is a model that predicts, for either
group, what the model before healing predicted on average over the two.

Why this objective: the option-gap losses (:mod:`.fair_loss`) push each build item's own preference, which
a held-out item does not share; invariance asks for something that holds for every sentence naming a
group, so it can transfer to sentences the loss never saw (counterfactual logit pairing, Garg et al.
2019, applied to a language model's next-token distributions). Texts whose swap changes nothing (no
gendered word, target not found) are skipped. The partner target of an item at a step is drawn from a
seed, the step and the item's own text, so a resumed run draws the same pairs.

Example:
    >>> swap = TargetSwap(build, seed=0)  # doctest: +SKIP
    >>> groups = swap.pairs(build[:8], step=0)  # doctest: +SKIP
    >>> invariance_losses(model, tokenizer, groups, anchor_for(model)).mean().backward()  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..bias.behaviour import prefix_token_id
from ..bias.capture import model_device
from ..bias.counterfactual import swap_gender
from ..bias.stereoset import context_sentence, padded_options
from ..bias.stereoset_data import StereoSetItem
from ..bias.tokens import pad_token_id

__all__ = ["TargetSwap", "replace_target", "aligned_positions", "anchor_for", "invariance_losses"]

#: A text and its counterfactual.
TextPair = tuple[str, str]


def replace_target(text: str, target: str, partner: str) -> str:
    """``text`` with every whole-word occurrence of ``target`` (any case) replaced by ``partner``, the
    first letter's case kept.

    Example:
        >>> replace_target("The chess player won. Chess player fans cheered.", "chess player", "nurse")
        'The nurse won. Nurse fans cheered.'
    """

    def repl(m: re.Match) -> str:
        word = m.group(0)
        return partner[:1].upper() + partner[1:] if word[:1].isupper() else partner[:1].lower() + partner[1:]

    return re.sub(r"(?<![\w-])" + re.escape(target) + r"(?![\w-])", repl, text, flags=re.IGNORECASE)


def _item_texts(item: StereoSetItem) -> list[str]:
    """The stereotype and anti-stereotype texts as the probe reads them (context first for intersentence)."""
    if item.task == "intrasentence":
        return [item.stereotype, item.anti_stereotype]
    context = context_sentence(item)
    return [f"{context} {item.stereotype.strip()}", f"{context} {item.anti_stereotype.strip()}"]


class TargetSwap:
    """Counterfactual text pairs of StereoSet items: gender swapped, other types' targets exchanged.

    Args:
        items: the build items; their targets per bias type are the partners a target can become.
        seed: with the step and the item's text, chooses each item's partner target.

    Example:
        >>> a = StereoSetItem("intrasentence", "Italian", "race", "", "Italian food is good.", "x", "y")
        >>> b = StereoSetItem("intrasentence", "Ethiopian", "race", "", "The Ethiopian ran.", "z", "w")
        >>> TargetSwap([a, b], seed=0).pairs([a], step=0)[0][0]
        ('Italian food is good.', 'Ethiopian food is good.')
    """

    def __init__(self, items: Sequence[StereoSetItem], seed: int = 0):
        targets: dict[str, set[str]] = {}
        for item in items:
            targets.setdefault(item.bias_type, set()).add(item.target)
        self.targets = {kind: sorted(names) for kind, names in targets.items()}
        self.seed = seed

    def _partner(self, item: StereoSetItem, step: int) -> str | None:
        others = [t for t in self.targets.get(item.bias_type, []) if t.lower() != item.target.lower()]
        if not others:
            return None
        return random.Random(f"{self.seed}:{step}:{item.target}:{item.context}:{item.stereotype}").choice(
            others
        )

    def pairs(self, items: Sequence[StereoSetItem], step: int) -> list[list[TextPair]]:
        """Per item, its (text, counterfactual) pairs at ``step`` (an empty list when nothing swaps)."""
        out = []
        for item in items:
            partner = None if item.bias_type == "gender" else self._partner(item, step)
            group = []
            for text in _item_texts(item):
                if item.bias_type == "gender":
                    other = swap_gender(text)
                else:
                    other = text if partner is None else replace_target(text, item.target, partner)
                if other != text:
                    group.append((text, other))
            out.append(group)
        return out


def aligned_positions(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` with ``a[i] == b[j]`` on the two sequences' common blocks, ``i, j >= 1`` and at or
    after the first position where they differ: the logits at ``i - 1`` and ``j - 1`` predict the same
    token from different prefixes.

    Example:
        >>> aligned_positions([1, 5, 7, 8, 9], [1, 6, 6, 7, 8, 9])
        [(2, 3), (3, 4), (4, 5)]
    """
    first = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    out = []
    for i, j, size in difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).get_matching_blocks():
        out.extend((i + t, j + t) for t in range(size) if i + t > first and j + t > first)
    return out


Anchor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def anchor_for(model: nn.Module, reference: nn.Module | None = None) -> Anchor:
    """The anchor of the counterfactual objective: logits of the model as it was before healing, without
    gradients. ``reference`` (a frozen copy taken before training) when given; else, for a PEFT model,
    ``model`` with its adapters disabled (the base weights, unchanged by LoRA training).

    Raises:
        ValueError: neither a reference nor a PEFT model.

    Example:
        >>> anchor = anchor_for(peft_model)  # doctest: +SKIP
        >>> logits = anchor(input_ids, attention_mask)  # doctest: +SKIP
    """
    if reference is not None:
        frozen = reference.eval()

        def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return frozen(input_ids=ids, attention_mask=mask, use_cache=False).logits

        return run
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the counterfactual fairness objective anchors on the model before healing: pass reference= "
            "(a frozen copy taken before training) or train a PEFT (LoRA) model, whose adapters are "
            "disabled to read the base."
        )

    def run_base(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return run_base


def invariance_losses(
    model: nn.Module, tokenizer, groups: Sequence[Sequence[TextPair]], anchor: Anchor
) -> torch.Tensor:
    """Per group (an item's pairs), the counterfactual loss of its texts (float32, [n_groups]; 0 for a group
    without pairs or aligned positions): at each aligned position the target is ``r`` = the mean of the
    anchor's next-token distributions on the text and on its counterfactual, and the loss is
    ``(KL(r || p) + KL(r || q)) / 2`` for the model's distributions ``p`` and ``q`` there, averaged over the
    text's positions and the group's texts. Zero only when the model predicts the same on both texts
    *and* that prediction is the anchor's average: invariance that cannot be bought by ignoring context.
    One padded forward pass of the model (differentiable) and one of the anchor; the caller chooses the
    model's mode.

    Example:
        >>> invariance_losses(model, tokenizer, [[("He ran.", "She ran.")]], anchor_for(model, frozen))  # doctest: +SKIP
        tensor([0.0132], grad_fn=...)
    """
    prefix = prefix_token_id(tokenizer)
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition a first token on")
    seqs, where = [], []  # where: (group, row of a, row of b, aligned positions)
    for g, group in enumerate(groups):
        for a_text, b_text in group:
            a = [prefix] + tokenizer(a_text, add_special_tokens=False)["input_ids"]
            b = [prefix] + tokenizer(b_text, add_special_tokens=False)["input_ids"]
            pos = aligned_positions(a, b)
            if pos:
                where.append((g, len(seqs), len(seqs) + 1, pos))
                seqs += [a, b]
    device = model_device(model)
    losses = torch.zeros(len(groups), device=device)
    if not seqs:
        return losses
    ids, mask, _ = padded_options([(s, 1) for s in seqs], pad_token_id(tokenizer))
    ids, mask = ids.to(device), mask.to(device)
    reference = anchor(ids, mask)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    counts = torch.zeros(len(groups), device=device)
    for g, ra, rb, pos in where:
        ia = torch.tensor([i - 1 for i, _ in pos], device=device)
        ib = torch.tensor([j - 1 for _, j in pos], device=device)
        target = 0.5 * (
            torch.softmax(reference[ra, ia].float(), dim=-1)
            + torch.softmax(reference[rb, ib].float(), dim=-1)
        )
        log_target = target.clamp_min(1e-30).log()
        p = torch.log_softmax(logits[ra, ia].float(), dim=-1)
        q = torch.log_softmax(logits[rb, ib].float(), dim=-1)
        kl = 0.5 * ((target * (log_target - p)).sum(-1) + (target * (log_target - q)).sum(-1))
        losses = losses.index_add(0, torch.tensor([g], device=device), kl.mean()[None])
        counts[g] += 1
    return losses / counts.clamp(min=1)
