"""Word-level gender swapping: counterfactual pairs and counterfactual data augmentation (CDA).

:func:`swap_gender` exchanges gendered words in both directions ("he" <-> "she", "man" <-> "woman",
"Mr." <-> "Mrs.", "John" <-> "Mary", ...) and keeps each word's capitalisation (lower, Title, UPPER).
Rules for what a word-level swap cannot see:

- Only whole words swap: a word glued to letters, digits or a hyphen stays ("the", "shell",
  "mankind", "man-made", "Heathrow"). An apostrophe ends a word, so "he's" -> "she's".
- "his" -> "hers" when no word follows (end of text or punctuation: "the book is his."), else "her".
- "her" -> "him" when no word follows or the next word is a function word (a preposition,
  determiner, conjunction, pronoun or common adverb: "gave her the book", "saw her yesterday"), else
  "his" ("her book", "her old car"). "hers" -> "his"; "him" -> "her".
- "Ms." and "Mrs." both become "Mr."; "Mr." becomes "Mrs.".
- First names swap only when capitalised (names double as words: "will", "mark").

:func:`counterfactual_pairs` turns texts into (original, swapped) prompt pairs for
:func:`~optipfair_train.bias.debias.estimate_bias_subspace`; :func:`augment_counterfactual` is two-sided
CDA for healing text (Webster et al. 2020): every text that names a gender is followed by its swap.

Example:
    >>> swap_gender("He gave her his book, Mr. Smith said.")
    'She gave him her book, Mrs. Smith said.'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .pairs import PromptPair

__all__ = ["GENDER_WORD_PAIRS", "NAME_PAIRS", "swap_gender", "counterfactual_pairs", "augment_counterfactual"]

#: (male, female) words swapped both ways; "his" / "her" / "hers" follow the rules in the module docstring.
GENDER_WORD_PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"),
    ("himself", "herself"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("boys", "girls"),
    ("male", "female"),
    ("males", "females"),
    ("father", "mother"),
    ("fathers", "mothers"),
    ("dad", "mom"),
    ("dads", "moms"),
    ("daddy", "mommy"),
    ("son", "daughter"),
    ("sons", "daughters"),
    ("brother", "sister"),
    ("brothers", "sisters"),
    ("husband", "wife"),
    ("husbands", "wives"),
    ("boyfriend", "girlfriend"),
    ("boyfriends", "girlfriends"),
    ("uncle", "aunt"),
    ("uncles", "aunts"),
    ("nephew", "niece"),
    ("nephews", "nieces"),
    ("grandfather", "grandmother"),
    ("grandson", "granddaughter"),
    ("grandpa", "grandma"),
    ("king", "queen"),
    ("kings", "queens"),
    ("prince", "princess"),
    ("gentleman", "lady"),
    ("gentlemen", "ladies"),
    ("sir", "madam"),
    ("groom", "bride"),
    ("actor", "actress"),
    ("actors", "actresses"),
    ("waiter", "waitress"),
    ("masculine", "feminine"),
    ("fraternity", "sorority"),
    ("mr", "mrs"),
)

#: (male, female) first names, swapped only when capitalised.
NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("John", "Mary"),
    ("James", "Jennifer"),
    ("Robert", "Linda"),
    ("Michael", "Elizabeth"),
    ("David", "Susan"),
    ("Richard", "Jessica"),
    ("Thomas", "Sarah"),
    ("Charles", "Karen"),
    ("Daniel", "Nancy"),
    ("Matthew", "Lisa"),
    ("Anthony", "Betty"),
    ("Steven", "Sandra"),
    ("Paul", "Ashley"),
    ("Andrew", "Emily"),
    ("Joshua", "Michelle"),
    ("Kevin", "Amanda"),
    ("Brian", "Melissa"),
    ("George", "Stephanie"),
    ("Edward", "Rebecca"),
    ("Peter", "Laura"),
)

# Words after which "her" is an object ("him"), not a possessive ("his").
_FUNCTION_WORDS = frozenset(
    """a an the this that these those my your our their its his her some any all every each no another
    and or but nor so yet because if when while as than then though although unless until since
    to for with from in on at by of into onto over under about after before through during without
    against among between around behind beside near off out up down away back home again too very
    yesterday today tomorrow tonight now here there once twice well first last later soon often always
    never really just also only even still what who whom whose which where why how i you he she it we
    they me him us them is was are were be been being will would can could should must may might do
    does did have has had not""".split()
)

_WORD = re.compile(r"(?<![\w'-])([A-Za-z]+)(?![\w-])")
_NEXT_WORD = re.compile(r"\s*([A-Za-z]+)")


def _build_map() -> dict[str, str]:
    table: dict[str, str] = {}
    for male, female in GENDER_WORD_PAIRS:
        table[male], table[female] = female, male
    table["ms"] = "mr"
    return table


_SWAP = _build_map()
_NAMES = {a: b for male, female in NAME_PAIRS for a, b in ((male, female), (female, male))}


def _match_case(word: str, replacement: str) -> str:
    if word.isupper() and len(word) > 1:
        return replacement.upper()
    if word[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def _next_word(text: str, end: int) -> str | None:
    """The word right after position ``end`` (only spaces between), or None (end or punctuation)."""
    found = _NEXT_WORD.match(text, end)
    return found.group(1).lower() if found else None


def _replacement(text: str, match: re.Match) -> str:
    word = match.group(1)
    lower = word.lower()
    if word in _NAMES:
        return _NAMES[word]
    if lower == "his":
        target = "hers" if _next_word(text, match.end()) is None else "her"
    elif lower == "her":
        following = _next_word(text, match.end())
        target = "him" if following is None or following in _FUNCTION_WORDS else "his"
    elif lower == "hers":
        target = "his"
    elif lower == "him":
        target = "her"
    elif lower in _SWAP:
        target = _SWAP[lower]
    else:
        return word
    return _match_case(word, target)


def swap_gender(text: str) -> str:
    """``text`` with every gendered word and first name swapped (rules in the module docstring).

    Example:
        >>> swap_gender("The waiter thanked his boss; she smiled at HIM.")
        'The waitress thanked her boss; he smiled at HER.'
    """
    return _WORD.sub(lambda m: _replacement(text, m), text)


def counterfactual_pairs(texts: Iterable[str], bias_type: str = "gender") -> list[PromptPair]:
    """(text, gender-swapped text) pairs for every text the swap changes (texts without a gendered word
    are dropped: a pair of equal prompts carries no signal).

    Example:
        >>> counterfactual_pairs(["He is a nurse.", "It rained."])
        [('He is a nurse.', 'She is a nurse.')]
    """
    pairs = []
    for text in texts:
        swapped = swap_gender(text)
        if swapped != text:
            pairs.append(PromptPair(text, swapped, bias_type))
    return pairs


def augment_counterfactual(texts: Sequence[str]) -> list[str]:
    """Two-sided counterfactual data augmentation: each text, followed by its gender swap when it has one.

    Example:
        >>> augment_counterfactual(["His son plays.", "It rained."])
        ['His son plays.', 'Her daughter plays.', 'It rained.']
    """
    out: list[str] = []
    for text in texts:
        out.append(text)
        swapped = swap_gender(text)
        if swapped != text:
            out.append(swapped)
    return out
