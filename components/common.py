"""Helpers and constants shared by several components.

Anything two components need lives here, once: the special token ids, the on-disk
example format, text normalisation and the error type for mistakes a user can make.
"""

import re
import unicodedata

import tensorflow as tf

# SentencePiece ids of the special pieces; the tokenizer is trained to put them here.
PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

SPLITS = ("train", "eval", "test")

# Added to the logits or attention scores of what must not be chosen: exp gives 0 in float32.
NEG_INF = -1e9

# String features of a stored example (schemas/story_example.pbtxt describes the same record).
TEXT_FEATURES = ("prompt", "story", "title", "lang", "source", "id")
LIST_FEATURES = ("tags",)
# Set by ingest, not read from sources: 0 for a window that its story continues after.
ENDS_STORY = "ends_story"


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


def to_example(record: dict) -> tf.train.Example:
    """Serialises a record dict (TEXT_FEATURES strings, LIST_FEATURES string lists)."""
    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.get(key, "").encode("utf-8")]))
        for key in TEXT_FEATURES
    }
    for key in LIST_FEATURES:
        values = [v.encode("utf-8") for v in record.get(key, [])]
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    feature[ENDS_STORY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record.get(ENDS_STORY, 1))]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


FEATURE_SPEC = {
    **{key: tf.io.FixedLenFeature([], tf.string, default_value="") for key in TEXT_FEATURES},
    **{key: tf.io.VarLenFeature(tf.string) for key in LIST_FEATURES},
    ENDS_STORY: tf.io.FixedLenFeature([], tf.int64, default_value=1),
}


def split_pattern(examples_dir: str, split: str) -> str:
    """Glob of one split's TFRecord shards in an ingest output directory."""
    return f"{examples_dir}/{split}-*.tfrecord"


def read_split(examples_dir: str, split: str) -> tf.data.Dataset:
    """Parsed examples of one split, in a stable order (shards sorted, read one after another)."""
    files = sorted(tf.io.gfile.glob(split_pattern(examples_dir, split)))
    if not files:
        raise UserError(f"No {split} examples in {examples_dir}: run the ingest step first.")

    def parse(serialized):
        features = tf.io.parse_single_example(serialized, FEATURE_SPEC)
        return {**features, **{key: tf.sparse.to_dense(features[key]) for key in LIST_FEATURES}}

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def iterate_split(examples_dir: str, split: str):
    """Yields one split's records as Python dicts of str (tags as a list of str)."""
    for features in read_split(examples_dir, split).as_numpy_iterator():
        record = {key: features[key].decode("utf-8") for key in TEXT_FEATURES}
        record["tags"] = [v.decode("utf-8") for v in features["tags"]]
        record[ENDS_STORY] = int(features[ENDS_STORY])
        yield record
