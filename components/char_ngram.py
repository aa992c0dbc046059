"""A character n-gram language model with interpolated Kneser-Ney smoothing.

The evaluator's baseline: trained on the same training split as the Transformer, it gives
the bits per character any model of the text should beat. Written here because the usual
libraries either cannot train (kenlm's Python module only queries) or are far too slow for
millions of characters (nltk.lm).

Example:
>>> lm = CharNGramModel(order=3).fit(["abcabcabc", "abcab"])
>>> round(lm.bits_per_char(["abcabc"]), 2) < round(lm.bits_per_char(["cbacba"]), 2)
True
"""

import collections
import math


class CharNGramModel:
    """Interpolated Kneser-Ney over characters (Chen & Goodman's formulation, one discount
    per order estimated from the counts of counts), backed off to a uniform distribution
    over the seen characters plus one unknown."""

    def __init__(self, order: int = 5):
        self.order = order

    def fit(self, texts):
        order = self.order
        # counts[n][(context, char)]: raw counts at the highest order, continuation counts
        # (distinct left extensions) at the lower ones, as Kneser-Ney prescribes.
        highest = collections.Counter()
        for text in texts:
            padded = "\x02" * (order - 1) + text + "\x03"
            for i in range(order - 1, len(padded)):
                highest[padded[i - order + 1: i + 1]] += 1
        self.counts = {order: highest}
        for n in range(order - 1, 0, -1):
            lower = collections.Counter()
            for gram in self.counts[n + 1]:
                lower[gram[1:]] += 1
            self.counts[n] = lower
        self.vocab_size = len(self.counts[1]) + 1  # seen characters plus one for the unknown
        self.discounts, self.context_totals, self.context_types = {}, {}, {}
        for n, counts in self.counts.items():
            n1 = sum(1 for c in counts.values() if c == 1)
            n2 = sum(1 for c in counts.values() if c == 2)
            self.discounts[n] = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
            totals, types = collections.Counter(), collections.Counter()
            for gram, count in counts.items():
                totals[gram[:-1]] += count
                types[gram[:-1]] += 1
            self.context_totals[n], self.context_types[n] = totals, types
        return self

    def prob(self, context: str, char: str) -> float:
        """P(char | the last order-1 characters of context)."""
        p = 1.0 / self.vocab_size
        for n in range(1, self.order + 1):
            history = context[len(context) - n + 1:] if n > 1 else ""
            total = self.context_totals[n].get(history, 0)
            if total == 0:
                continue  # unseen history: keep the lower order's estimate
            d = self.discounts[n]
            count = self.counts[n].get(history + char, 0)
            p = max(count - d, 0.0) / total + d * self.context_types[n][history] / total * p
        return p

    def log_prob(self, text: str, context: str = "", with_end: bool = True) -> float:
        """Natural-log probability of text (and, with_end, of its end) after context."""
        padded = "\x02" * (self.order - 1) + context
        total = 0.0
        for char in text + ("\x03" if with_end else ""):
            total += math.log(self.prob(padded[-(self.order - 1):], char))
            padded += char
        return total

    def bits_per_char(self, texts, contexts=None) -> float:
        contexts = contexts or [""] * len(texts)
        nats = sum(self.log_prob(t, c) for t, c in zip(texts, contexts))
        return -nats / math.log(2) / sum(len(t) for t in texts)
