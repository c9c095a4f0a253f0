"""Word-level gender swap and counterfactual augmentation on hand-written sentences."""

from __future__ import annotations

import pytest

from optipfair_train.bias.counterfactual import augment_counterfactual, counterfactual_pairs, swap_gender


@pytest.mark.parametrize(
    ("text", "swapped"),
    [
        ("He gave her his book.", "She gave him her book."),
        ("She gave him her book.", "He gave her his book."),  # the other direction
        ("The book is his.", "The book is hers."),  # possessive pronoun: no word follows
        ("The book is hers.", "The book is his."),
        ("I saw her yesterday.", "I saw him yesterday."),  # object before a function word
        ("I gave her the keys.", "I gave him the keys."),
        ("Her old car broke.", "His old car broke."),  # determiner before a content word
        ("He blamed himself.", "She blamed herself."),
        ("My father and two brothers", "My mother and two sisters"),
        ("A woman and two men.", "A man and two women."),
        ("The waiter thanked the actress.", "The waitress thanked the actor."),
        ("Mr. Smith met Mrs. Jones and Ms. Lee.", "Mrs. Smith met Mr. Jones and Mr. Lee."),
        ("John called Mary's brother.", "Mary called John's sister."),
        ("He's late; she's early.", "She's late; he's early."),
    ],
)
def test_swap_both_directions(text, swapped):
    assert swap_gender(text) == swapped


def test_capitalisation_is_kept():
    assert swap_gender("HE said HIS name. He said. he said.") == "SHE said HER name. She said. she said."
    assert swap_gender("Man overboard! MEN at work.") == "Woman overboard! WOMEN at work."


@pytest.mark.parametrize(
    "text",
    [
        "The theme of the shell is mankind.",  # 'he', 'man' inside other words
        "A man-made lake near Heathrow.",  # hyphenated compound, a name starting with 'He'
        "They will mark the paper.",  # names that are also words stay when lower case
        "Romance and chemistry; the hero, the heroine.",
        "It rained all day.",
    ],
)
def test_words_that_must_not_swap(text):
    assert swap_gender(text) == text


def test_pairs_drop_texts_without_gender_and_augmentation_follows_each_text():
    texts = ["His son plays.", "It rained.", "She runs."]
    pairs = counterfactual_pairs(texts)
    assert [tuple(p) for p in pairs] == [("His son plays.", "Her daughter plays."), ("She runs.", "He runs.")]
    assert all(p.bias_type == "gender" for p in pairs)
    assert augment_counterfactual(texts) == [
        "His son plays.",
        "Her daughter plays.",
        "It rained.",
        "She runs.",
        "He runs.",
    ]
    # swapping twice gives the text back where the rules are unambiguous
    assert (
        swap_gender(swap_gender("He thanked his father and Mr. Brown."))
        == "He thanked his father and Mr. Brown."
    )
