"""Checks raw records against schemas/story_example.pbtxt and quarantines the bad ones.

The schema is a tensorflow_metadata Schema, so the same file can drive TFDV or TFX's
ExampleValidator; here it is read directly to keep ingestion streaming and dependency-light.
"""

import json
import os
import re

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas", "story_example.pbtxt")

# C0/C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def load_schema(path: str = SCHEMA_PATH) -> schema_pb2.Schema:
    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())


class RecordValidator:
    """Returns the reason a record breaks the schema, or None when it is valid.

    >>> RecordValidator(load_schema(), max_chars=100).check({"story": ""})
    "required field 'story' is empty"
    """

    def __init__(self, schema: schema_pb2.Schema, max_chars: int):
        self.features = {f.name: f for f in schema.feature}
        self.domains = {d.name: set(d.value) for d in schema.string_domain}
        self.max_chars = max_chars

    def check(self, record: dict) -> str | None:
        for key in record:
            if key not in self.features:
                return f"unknown field '{key}'"
        for name, feature in self.features.items():
            if feature.type != schema_pb2.BYTES:
                continue  # set by ingest itself, never read from a source
            value = record.get(name)
            values = value if isinstance(value, list) else ([] if value in (None, "") else [value])
            if feature.presence.min_fraction >= 1.0 and not values:
                return f"required field '{name}' is empty" if name in record else f"missing required field '{name}'"
            if feature.HasField("value_count") and len(values) > feature.value_count.max:
                return f"field '{name}' has {len(values)} values, at most {feature.value_count.max} allowed"
            for v in values:
                if not isinstance(v, str):
                    return f"field '{name}' must be a string, not {type(v).__name__}"
                if _CONTROL.search(v):
                    return f"field '{name}' contains control characters"
                if len(v) > self.max_chars:
                    return f"field '{name}' is longer than {self.max_chars} characters"
                if feature.domain and v not in self.domains[feature.domain]:
                    return f"field '{name}' is '{v}', not one of {sorted(self.domains[feature.domain])}"
        return None


QUARANTINE_FILE = "quarantine.jsonl"


class Quarantine:
    """Appends bad records to a quarantine.jsonl (local or any tf.io.gfile path) with the reason
    and where they came from."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self._file = None

    def add(self, reason: str, location: str, record=None):
        if self._file is None:
            import tensorflow as tf  # only a run with bad records needs it (validation alone does not)

            self._file = tf.io.gfile.GFile(self.path, "w")
        self.count += 1
        self._file.write(json.dumps({"reason": reason, "location": location, "record": record}, ensure_ascii=False) + "\n")

    def close(self):
        if self._file is not None:
            self._file.close()
