"""Control tags: a story's language and tags, written before its prompt as `<en><fable> Once upon a time`.

The tokenizer step gives the training split's languages and its most frequent tags a piece
each (SentencePiece user-defined symbols, so no text is ever split into them). The encoder
reads a prompt's control pieces right after its start id, then the prompt's text: when a long
prompt is cut to its last tokens, or the decoder's window slides and the encoder reads the
story so far instead, the pieces stay. A prompt is a string in every signature, so any TF
Serving client sets tags by writing them; tags the model has no piece for are left out.

Training prompts carry their record's language and tags, each left out of a share of them
(DROPPED_TAG_SHARE, by record id and tag), so that a prompt with only some of its tags, or
none, is one the model knows too. This module is plain Python (clients use it without
TensorFlow); transform.py does the same in the graph.

>>> tagged("Once upon a time", ["en", "fable"])
'<en><fable> Once upon a time'
>>> split_tags("<en><fable> Once upon a time")
(['en', 'fable'], 'Once upon a time')
"""

import collections
import re

# A tag is written <tag>; a tag itself holds no space and no angle bracket.
TAG = r"[^<>\s]+"
LEADING_TAGS = rf"^((?:<{TAG}>)+) ?"  # the tags a prompt starts with, and the space after them
MAX_TAGS = 64  # the most frequent tags that get a piece; rarer ones teach the model little
MIN_RECORDS = 2  # a tag on fewer training records gets no piece
DROPPED_TAG_SHARE = 0.25  # of the training prompts, by record id, that leave out a given tag


def piece(tag: str) -> str:
    return f"<{tag}>"


def tag_of(piece: str) -> str:
    """`piece`'s inverse: the tag a control piece stands for."""
    return piece[1:-1]


def of_model(loaded) -> list[str]:
    """The control tags a loaded storygen SavedModel lists (`loaded.control_tags`); none for
    other SavedModels."""
    variable = getattr(loaded, "control_tags", None)
    return [t.decode("utf-8") for t in variable.numpy()] if variable is not None else []


def tagged(prompt: str, tags) -> str:
    """The prompt with its control tags before it (those that can be written as tags)."""
    written = "".join(piece(t) for t in tags if re.fullmatch(TAG, t))
    return f"{written} {prompt}" if written else prompt


def split_tags(prompt: str) -> tuple[list[str], str]:
    """(the tags a prompt starts with, its text): `tagged`'s inverse."""
    match = re.match(LEADING_TAGS, prompt)
    if not match:
        return [], prompt
    return re.findall(TAG, match.group(1).replace("<", " ").replace(">", " ")), prompt[match.end():]


def control_pieces(records) -> list[str]:
    """The pieces a tokenizer trained on `records` (dicts with lang and tags) gives control
    tags: every language's, then the MAX_TAGS most frequent tags on MIN_RECORDS or more."""
    langs, tags = collections.Counter(), collections.Counter()
    for record in records:
        langs.update([record["lang"]] if re.fullmatch(TAG, record["lang"] or "") else [])
        tags.update(t for t in set(record["tags"]) if re.fullmatch(TAG, t))
    frequent = [t for t, n in tags.most_common() if n >= MIN_RECORDS and t not in langs][:MAX_TAGS]
    return [piece(t) for t in sorted(langs)] + [piece(t) for t in frequent]
