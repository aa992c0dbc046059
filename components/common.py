"""Constants and helpers shared by several components, light enough for any module.

The special token ids, the splits, text normalisation and the error type for mistakes a
user can make. No TensorFlow here: the stored example format is `components.records`.
"""

import re
import unicodedata

# SentencePiece ids of the special pieces; the tokenizer is trained to put them here.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

SPLITS = ("train", "eval", "test")

# Added to the logits or attention scores of what must not be chosen: exp gives 0 in float32.
NEG_INF = -1e9


class UserError(Exception):
    """A mistake the user can fix (bad path, bad record, bad flag); its message is one sentence."""


_SPACE_RUN = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC with runs of whitespace folded to one space; full-width punctuation is kept as is."""
    return _SPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)).strip()


def detect_lang(text: str) -> str:
    """'zh' when Han characters make up a fifth of the letters, 'en' for Latin script, else 'other'."""
    han = latin = 0
    for ch in text[:2000]:
        if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
            han += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
    letters = han + latin
    if letters == 0:
        return "other"
    if han >= 0.2 * letters:
        return "zh"
    return "en" if latin else "other"
