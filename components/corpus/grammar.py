"""The engine of the built-in story grammar: choice points, sampling, parsing, log-probability.

A story is written by a plain Python function (one per language) that calls `say(text)` for
fixed text and `choose(name, options)` at each choice point. The same function samples a
story (a random generator picks the options) or parses one (the text picks them): every
option's surface text is emitted at once, and the options of a choice point are prefix-free
(none is the start of another), so at most one option can match the text at any point. The
grammar is therefore unambiguous: a text has exactly one derivation or none, and the
probability of a text is the product of its choices' probabilities.

The opening is produced by the first choices, and `prompt_ends_here()` marks its end, so
log p(story) = log p(prompt) + log p(continuation | prompt) exactly.
"""

import dataclasses
import math
import random

# Each story's genre, chosen with these probabilities where it ends (a fable with its moral, a
# fairy tale with a closing formula), apart from its hero: a prompt tagged with the genre tells
# a model what the opening cannot.
GENRES = {"fable": 0.5, "fairy_tale": 0.5}


@dataclasses.dataclass(frozen=True)
class Option:
    text: str
    weight: float = 1.0
    value: object = None


def options(*entries, weights=None):
    """Options from texts (their value is the text) or (text, value) pairs, equally likely
    unless weights are given. Checks that the texts are prefix-free."""
    built = []
    for i, entry in enumerate(entries):
        text, value = entry if isinstance(entry, tuple) else (entry, entry)
        built.append(Option(text, 1.0 if weights is None else weights[i], value))
    check_prefix_free([o.text for o in built])
    return built


def check_prefix_free(texts):
    ordered = sorted(texts)
    for a, b in zip(ordered, ordered[1:]):
        if not a or b.startswith(a):
            raise ValueError(f"choice texts are not prefix-free: {a!r} / {b!r}")


def endings(by_genre: dict) -> list:
    """The options of a story's last choice: {genre: its closing texts}, each (text, genre),
    weighted so that each genre has its GENRES probability."""
    entries, weights = [], []
    for genre, texts in by_genre.items():
        entries += [(text, genre) for text in texts]
        weights += [GENRES[genre] / len(texts)] * len(texts)
    return options(*entries, weights=weights)


class Rejected(Exception):
    """The text is not in the grammar; the message says where and why."""


class Derivation:
    """One pass of a story function: sampling when `text` is None, else parsing `text`."""

    def __init__(self, rng: random.Random | None = None, text: str | None = None):
        self.rng = rng
        self.text = text
        self.pos = 0
        self.out = []
        self.log_prob = 0.0
        self.choices = []  # (choice point name, option index)
        self.prompt_length = None
        self.prompt_log_prob = None
        self.tags = []  # what the story function returns: its genre

    def say(self, text: str):
        if self.text is None:
            self.out.append(text)
            return
        if not self.text.startswith(text, self.pos):
            raise Rejected(f"expected {text!r} at character {self.pos}, found {self.text[self.pos:self.pos + 12]!r}")
        self.pos += len(text)

    def choose(self, name: str, opts: list):
        total = sum(o.weight for o in opts)
        if self.text is None:
            x = self.rng.random() * total
            index = len(opts) - 1
            for i, o in enumerate(opts):
                x -= o.weight
                if x < 0:
                    index = i
                    break
        else:
            matches = [i for i, o in enumerate(opts) if self.text.startswith(o.text, self.pos)]
            if not matches:
                raise Rejected(f"no {name} fits at character {self.pos}: {self.text[self.pos:self.pos + 12]!r}")
            if len(matches) > 1:  # cannot happen with prefix-free options; guards the grammar itself
                raise Rejected(f"ambiguous {name} at character {self.pos}")
            index = matches[0]
        option = opts[index]
        self.log_prob += math.log(option.weight / total)
        self.choices.append((name, index))
        self.say(option.text)
        return option.value

    def prompt_ends_here(self):
        self.prompt_length = len("".join(self.out)) if self.text is None else self.pos
        self.prompt_log_prob = self.log_prob

    @property
    def story(self) -> str:
        return "".join(self.out)


def sample_one(story_fn, rng: random.Random) -> Derivation:
    derivation = Derivation(rng=rng)
    derivation.tags = story_fn(derivation)
    return derivation


def parse(story_fn, text: str) -> Derivation:
    """The one derivation of `text`, or Rejected."""
    derivation = Derivation(text=text)
    derivation.tags = story_fn(derivation)
    if derivation.pos != len(text):
        raise Rejected(f"text goes on after the story ends, at character {derivation.pos}")
    return derivation


def log2(x):
    return math.log(x) / math.log(2)
