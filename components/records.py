"""The stored example: a tf.train.Example whose features schemas/story_example.pbtxt defines.

The schema is the one description of the record: the string features, which of them hold a
list, and the integer `ends_story` (set by ingest, 0 for a window its story continues after)
are all read from it.

>>> sorted(FEATURE_SPEC)
['ends_story', 'id', 'lang', 'prompt', 'source', 'story', 'tags', 'title']
>>> LIST_FEATURES
('tags',)
"""

import json

import tensorflow as tf
from tensorflow_metadata.proto.v0 import schema_pb2

from components.common import UserError
from components.validate import load_schema

ENDS_STORY = "ends_story"
STATISTICS_FILE = "statistics.json"  # what ingest counted, beside the splits


def _features(schema: schema_pb2.Schema):
    """(single-string, list-of-string) feature names of the schema, in its order."""
    strings = [f for f in schema.feature if f.type == schema_pb2.BYTES]
    lists = tuple(f.name for f in strings if f.value_count.max > 1)
    return tuple(f.name for f in strings if f.name not in lists), lists


TEXT_FEATURES, LIST_FEATURES = _features(load_schema())

FEATURE_SPEC = {
    **{key: tf.io.FixedLenFeature([], tf.string, default_value="") for key in TEXT_FEATURES},
    **{key: tf.io.VarLenFeature(tf.string) for key in LIST_FEATURES},
    ENDS_STORY: tf.io.FixedLenFeature([], tf.int64),
}


def to_example(record: dict) -> tf.train.Example:
    """Serialises a record dict (TEXT_FEATURES strings, LIST_FEATURES string lists, ends_story)."""
    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.get(key, "").encode("utf-8")]))
        for key in TEXT_FEATURES
    }
    for key in LIST_FEATURES:
        values = [v.encode("utf-8") for v in record.get(key, [])]
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    feature[ENDS_STORY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(record.get(ENDS_STORY, 1))]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def split_pattern(examples_dir: str, split: str) -> str:
    """Glob of one split's TFRecord shards in an ingest output directory."""
    return f"{examples_dir}/{split}-*.tfrecord"


def read_statistics(examples_dir: str) -> dict:
    """The statistics an ingest run wrote into examples_dir; UserError when it holds none."""
    path = f"{examples_dir}/{STATISTICS_FILE}"
    if not tf.io.gfile.exists(path):
        raise UserError(f"{examples_dir} is not an ingest output (it has no {STATISTICS_FILE}): give --examples_dir "
                        "the ingest/ folder of a run, such as one made with --stop_after=ingest.")
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def split_size(examples_dir: str, split: str) -> int:
    """How many examples the ingest step wrote to `split` (from its statistics)."""
    return read_statistics(examples_dir)["examples"][split]


def read_split(examples_dir: str, split: str) -> tf.data.Dataset:
    """Parsed examples of one split, in a stable order (shards sorted, read one after another)."""
    files = sorted(tf.io.gfile.glob(split_pattern(examples_dir, split)))
    if not files:
        raise UserError(f"No {split} examples in {examples_dir}: the ingest step wrote none for this split "
                        "(see --eval_fraction and --test_fraction).")

    def parse(serialized):
        features = tf.io.parse_single_example(serialized, FEATURE_SPEC)
        return {**features, **{key: tf.sparse.to_dense(features[key]) for key in LIST_FEATURES}}

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def iterate_split(examples_dir: str, split: str):
    """Yields one split's records as Python dicts of str (tags as a list of str)."""
    for features in read_split(examples_dir, split).as_numpy_iterator():
        record = {key: features[key].decode("utf-8") for key in TEXT_FEATURES}
        record.update({key: [v.decode("utf-8") for v in features[key]] for key in LIST_FEATURES})
        record[ENDS_STORY] = int(features[ENDS_STORY])
        yield record
