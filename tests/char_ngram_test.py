import math

import pytest

from components.char_ngram import CharNGramModel


def test_probabilities_sum_to_one():
    lm = CharNGramModel(order=3).fit(["从前有座山，山里有座庙。", "abcab", "the cat sat"])
    chars = set("从前有座山，里庙。abcthes ") | {"\x03", "?"}  # every seen character, the end, one unseen
    for context in ["", "从前", "ab", "zz", "t"]:
        total = sum(lm.prob(context, c) for c in chars)
        # The unseen character stands for the one unknown slot of the vocabulary.
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_learns_the_text():
    lm = CharNGramModel(order=5).fit(["once upon a time there was a fox. "] * 20)
    assert lm.bits_per_char(["once upon a time"]) < 1.0  # its early end costs a few bits
    assert lm.bits_per_char(["zq xv wk jj"]) > 3.0


def test_uniform_when_untrained():
    lm = CharNGramModel(order=2).fit(["ab"])
    # Vocabulary: a, b, end, unknown -> an unseen character gets a share of the uniform floor.
    assert lm.vocab_size == 4
    assert 0 < lm.prob("", "z") <= 1 / 4


def test_context_helps():
    lm = CharNGramModel(order=4).fit(["山里有座庙"] * 10)
    assert lm.log_prob("座庙", context="山里有") > lm.log_prob("座庙", context="")
    assert math.isfinite(lm.log_prob("新字", context="山"))
