"""Constants and helpers shared by several components, light enough for any module.

The special token ids, the splits, text normalisation and the error type for mistakes a
user can make. No TensorFlow here: the stored example format is `components.records`.
"""

import re
import unicodedata
from typing import NamedTuple

# SentencePiece ids of the special pieces; the tokenizer is trained to put them here.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

SPLITS = ("train", "eval", "test")


class SpecialIds(NamedTuple):
    """How a model frames its ids: the padding id, the id the decoder starts from, the id that
    ends a story, the ids before and after a prompt, and an id that opens every story window
    as its first target (BART's <s> after the decoder's start </s>); None: no such id."""

    pad: int
    start: int
    eos: int
    prompt_start: int | None
    prompt_end: int | None
    story_start: int | None = None

    @property
    def opening(self) -> list[int]:
        """The ids every story window's targets begin with."""
        return [] if self.story_start is None else [self.story_start]

    @property
    def decoder_prefix(self) -> list[int]:
        """The decoder's inputs before the first generated token."""
        return [self.start] + self.opening


# storygen's own tokenizer and model: BOS opens the prompt and the story, EOS ends the story.
STORYGEN_IDS = SpecialIds(pad=PAD_ID, start=BOS_ID, eos=EOS_ID, prompt_start=BOS_ID, prompt_end=None)

# The name of the training step's loop over the output loss's chunks (trainer.output_loss_sum):
# its ops' names in a profile contain "output_loss/".
OUTPUT_LOSS_LOOP = "output_loss"

# Added to the logits or attention scores of what must not be chosen: exp gives 0 in float32.
NEG_INF = -1e9


class UserError(Exception):
    """A mistake the user can fix (bad path, bad record, bad flag); its message is one sentence."""


_SPACE_RUN = re.compile(r"\s+")


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: '45 s', '3 min 05 s', '2 h 07 min'.

    >>> format_duration(185.2)
    '3 min 05 s'
    """
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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
