"""Metrics of generated text against references: BLEU, ROUGE, distinct-n, repetition, length.

BLEU and ROUGE are keras-hub's metrics. Chinese is scored at character level: each
character becomes one ASCII token (`u4e00`), because rouge-score, which keras-hub's ROUGE
wraps, keeps only [a-z0-9] and would drop Chinese characters altogether.

>>> units("从前 有座山", "zh"), units("Once upon a time.", "en")
(['从', '前', '有', '座', '山'], ['once', 'upon', 'a', 'time'])
>>> round(distinct_n([["a", "b", "a", "b"]], 2), 3)
0.667
"""

import re

import keras_hub

_WORD = re.compile(r"[\w']+")


def units(text: str, lang: str) -> list[str]:
    """What the metrics count: characters for Chinese (punctuation and spaces left out),
    lower-cased words elsewhere."""
    if lang == "zh":
        return [c for c in text if c.isalnum()]
    return _WORD.findall(text.lower())


def _as_ascii(tokens) -> str:
    return " ".join(t if t.isascii() else f"u{ord(t[0]):x}" for t in tokens)


def bleu(references, hypotheses, langs) -> float:
    """Corpus BLEU-4 (keras_hub.metrics.Bleu) over the units of each text."""
    metric = keras_hub.metrics.Bleu(max_order=4)
    metric.update_state([[_as_ascii(units(r, l))] for r, l in zip(references, langs)],
                        [_as_ascii(units(h, l)) for h, l in zip(hypotheses, langs)])
    return float(metric.result())


def rouge(references, hypotheses, langs) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 (keras_hub.metrics.RougeN, RougeL), averaged over texts."""
    refs = [_as_ascii(units(r, l)) for r, l in zip(references, langs)]
    hyps = [_as_ascii(units(h, l)) for h, l in zip(hypotheses, langs)]
    scores = {}
    for name, metric in (("rouge_1", keras_hub.metrics.RougeN(order=1)), ("rouge_2", keras_hub.metrics.RougeN(order=2)),
                         ("rouge_l", keras_hub.metrics.RougeL())):
        metric.update_state(refs, hyps)
        scores[name] = float(metric.result()["f1_score"])
    return scores


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists, n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al., 2016)."""
    grams = [g for tokens in token_lists for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(token_lists, n: int = 4) -> float:
    """The share of n-grams that already occurred earlier in the same text: degenerate loops score high."""
    repeated = total = 0
    for tokens in token_lists:
        seen = set()
        for gram in _ngrams(tokens, n):
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def generation_metrics(prompts, references, hypotheses, langs) -> dict:
    """Every text metric for a slice of generated continuations."""
    hyp_units = [units(h, l) for h, l in zip(hypotheses, langs)]
    ref_units = [units(r, l) for r, l in zip(references, langs)]
    return {
        "bleu": bleu(references, hypotheses, langs),
        **rouge(references, hypotheses, langs),
        "distinct_1": distinct_n(hyp_units, 1),
        "distinct_2": distinct_n(hyp_units, 2),
        "repeated_4gram_rate": repeated_ngram_rate(hyp_units, 4),
        "length_ratio": sum(map(len, hyp_units)) / max(sum(map(len, ref_units)), 1),
        "count": len(hypotheses),
    }
