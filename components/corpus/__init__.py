"""The built-in corpus: a probabilistic grammar of fairy tales and fables in Chinese and English.

Each language is written natively (zh.py, en.py) on one small engine (grammar.py). Every
sampled story carries the exact log-probability of its derivation, and `accept` parses any
text back to its one derivation or says why it is not a story of the grammar.

>>> story = sample(1, seed=1, langs=("zh",))[0]
>>> result = accept(story["prompt"], story["story"], "zh")
>>> result.accepted, abs(result.log_prob - story["log_prob"]) < 1e-9
(True, True)
"""

import dataclasses
import random
import re

from components.corpus import en, zh
from components.corpus.grammar import Rejected, parse, sample_one

LANGS = ("zh", "en")
STORY_FUNCTIONS = {"zh": zh.story, "en": en.story}
# How the prompt and the continuation join into one text.
SEPARATORS = {"zh": "", "en": " "}


def sample(n: int, seed: int, langs=LANGS) -> list[dict]:
    """n stories, the languages taking turns; the same seed gives the same stories anywhere.

    Each is {prompt, story (the continuation), lang, tags, log_prob (natural log of the whole
    story), prompt_log_prob, id}."""
    rng = random.Random(seed)
    stories = []
    for i in range(n):
        lang = langs[i % len(langs)]
        derivation = sample_one(STORY_FUNCTIONS[lang], rng)
        text = derivation.story
        stories.append({
            "prompt": text[:derivation.prompt_length],
            "story": text[derivation.prompt_length:].strip(),
            "lang": lang,
            "tags": list(derivation.tags),
            "log_prob": derivation.log_prob,
            "prompt_log_prob": derivation.prompt_log_prob,
            "id": f"{lang}-{i:06d}-s{seed}",
        })
    return stories


@dataclasses.dataclass
class Acceptance:
    accepted: bool
    reason: str
    log_prob: float | None = None
    prompt_log_prob: float | None = None
    derivation: list | None = None  # (choice point, option index) pairs
    tags: list | None = None  # the story's genre, as its record's tags


def accept(prompt: str, story: str, lang: str | None = None) -> Acceptance:
    """Parses prompt + story with the grammar of `lang` (or of whichever language accepts it)."""
    reasons = []
    for candidate in [lang] if lang else LANGS:
        if candidate not in STORY_FUNCTIONS:
            return Acceptance(False, f"unknown language '{candidate}'")
        try:
            derivation = parse(STORY_FUNCTIONS[candidate], prompt + SEPARATORS[candidate] + story)
        except Rejected as e:
            reasons.append(str(e))
            continue
        if derivation.prompt_length != len(prompt):
            reasons.append(f"the prompt should end at character {derivation.prompt_length}, not {len(prompt)}")
            continue
        return Acceptance(True, "", derivation.log_prob, derivation.prompt_log_prob, derivation.choices,
                          list(derivation.tags))
    return Acceptance(False, "; ".join(reasons))


_NAMED = re.compile(r"(?:名叫|named |called )(\w+)")


def protagonist(prompt: str) -> str | None:
    """The hero's name that a built-in opening introduces, or None for other prompts."""
    match = _NAMED.search(prompt)
    return match.group(1) if match else None
