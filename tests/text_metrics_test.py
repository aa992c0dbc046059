import random
import string

import pytest

from components.text_metrics import (Copies, CopyIndex, bleu, copy_metrics, distinct_n, generation_metrics,
                                     repeated_ngram_rate, rouge, units)


def test_units():
    assert units("从前有座山，山里有座庙。", "zh") == list("从前有座山山里有座庙")
    assert units("Once upon a time, Anna's fox.", "en") == ["once", "upon", "a", "time", "anna's", "fox"]


def test_bleu_on_known_pairs():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"], ["en"]) == pytest.approx(1.0)
    assert bleu(["the cat sat on the mat"], ["dogs run fast"], ["en"]) == 0.0
    # Hand-computed: "the cat sat on a mat" against the reference has n-gram precisions
    # 5/6, 3/5, 2/4 and 1/3 and the same length (brevity penalty 1).
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"], ["en"]) == pytest.approx(expected, abs=1e-6)
    # Chinese counts characters: identical text scores 1.
    assert bleu(["从前有座山，山里有座庙"], ["从前有座山，山里有座庙"], ["zh"]) == pytest.approx(1.0)


def test_rouge_on_known_pairs():
    scores = rouge(["the cat sat"], ["the cat ran"], ["en"])
    assert scores["rouge_1"] == pytest.approx(2 / 3, abs=1e-6)  # 2 of 3 unigrams on each side
    assert scores["rouge_2"] == pytest.approx(1 / 2, abs=1e-6)  # "the cat" of 2 bigrams
    assert scores["rouge_l"] == pytest.approx(2 / 3, abs=1e-6)  # LCS "the cat"
    zh = rouge(["山里有座庙"], ["山里有庙"], ["zh"])
    assert zh["rouge_1"] == pytest.approx(2 * (4 / 4) * (4 / 5) / (4 / 4 + 4 / 5), abs=1e-6)


def test_distinct_and_repetition():
    assert distinct_n([list("abcabc")], 1) == 0.5
    assert distinct_n([list("abcabc")], 2) == pytest.approx(3 / 5)
    assert distinct_n([[]], 2) == 0.0
    assert repeated_ngram_rate([list("abababab")], 2) == pytest.approx(5 / 7)
    assert repeated_ngram_rate([list("abcdefg")], 4) == 0.0


def test_generation_metrics():
    metrics = generation_metrics(["从前", "Once"], ["山里有座庙。", "the cat sat"], ["山里有座庙。", "the cat sat down"],
                                 ["zh", "en"])
    assert metrics["count"] == 2 and metrics["rouge_1"] > 0.8
    assert metrics["length_ratio"] == pytest.approx((5 + 4) / (5 + 3))


def test_generation_metrics_report_the_references_repetition_beside_the_generated_texts():
    # The reference's 4-grams: abcd bcda cdab dabc abcd, one of five repeated; the hypothesis repeats none.
    metrics = generation_metrics(["p"], ["a b c d a b c d"], ["a b c d e"], ["en"])
    assert metrics["reference_repeated_4gram_rate"] == pytest.approx(1 / 5)
    assert metrics["repeated_4gram_rate"] == 0.0


# Training text for the copy tests: pseudo-random letters, so that any 50-character window occurs once.
_RANDOM = random.Random(0)
LETTERS = "".join(_RANDOM.choice(string.ascii_lowercase) for _ in range(2000))
HAN = "".join(chr(0x4E00 + _RANDOM.randrange(2000)) for _ in range(500))


def test_a_copy_of_73_characters_is_73_long():
    index = CopyIndex([LETTERS])
    story = "0123456789" + LETTERS[500:573] + "9876543210"  # digits: not in the training text
    # 93 characters: 44 windows, of which the 73 - 49 = 24 inside the copy occur in the training text.
    assert index.copies(story) == Copies(windows=44, copied=24, longest=73)


def test_nothing_copied_and_copies_shorter_than_the_span_report_zero():
    index = CopyIndex([LETTERS])
    assert index.copies("0123456789" * 12) == Copies(windows=71, copied=0, longest=0)
    # 49 copied characters are below the 50-character span: not measured, reported as 0.
    assert index.copies(LETTERS[100:149] + "#" * 60) == Copies(windows=60, copied=0, longest=0)
    assert index.copies("short") == Copies(windows=0, copied=0, longest=0)


def test_chinese_counts_characters_not_bytes():
    index = CopyIndex([HAN])
    story = "。" * 5 + HAN[100:160] + "。" * 5  # 70 characters, 210 UTF-8 bytes
    assert index.copies(story) == Copies(windows=21, copied=11, longest=60)


def test_the_longest_copy_is_one_place_in_the_training_text():
    # Every window of the story occurs in the training text, but the story does not: its start
    # continues the first text, its end the second, around a 55-character core they share.
    core = LETTERS[:55]
    first, second = LETTERS[100:130] + core + LETTERS[200:230], LETTERS[300:330] + core + LETTERS[400:430]
    story = LETTERS[120:130] + core + LETTERS[400:410]
    index = CopyIndex([first, second])
    assert index.copies(story) == Copies(windows=26, copied=26, longest=65)
    # Nor does a copy run from the end of one training text into the start of the next.
    assert index.copies(first[-40:] + second[:40]).longest == 0


def test_the_longest_copy_follows_every_occurrence_of_a_window():
    # The window occurs 20 times; only its last occurrence goes on as the story does.
    window, story_end = LETTERS[:50], LETTERS[600:640]
    texts = [window + LETTERS[1000 + 10 * i:1010 + 10 * i] for i in range(19)] + [window + story_end]
    assert CopyIndex(texts).copies(window + story_end + "0") == Copies(windows=42, copied=41, longest=90)


def test_copy_metrics_pool_the_windows_and_keep_the_longest():
    metrics = copy_metrics([Copies(44, 24, 73), Copies(71, 0, 0), Copies(0, 0, 0)])
    assert metrics == {"copied_50char_span_rate": pytest.approx(24 / 115), "longest_copied_span_chars": 73}
    assert copy_metrics([]) == {"copied_50char_span_rate": 0.0, "longest_copied_span_chars": 0}
