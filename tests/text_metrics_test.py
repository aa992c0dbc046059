import pytest

from components.text_metrics import bleu, distinct_n, generation_metrics, repeated_ngram_rate, rouge, units


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
