"""Story sources: every record of a `--data` spec, read as a stream.

A source spec is one of

    builtin:fairy_tales          the built-in grammar (--builtin_count stories)
    tfds:NAME[/CONFIG][:SPLIT]   a tensorflow-datasets split prepared beforehand in --tfds_data_dir
    a file, directory or glob    local or any tf.io.gfile path; each file may be gzip-compressed (.gz):
      .jsonl / .json             one JSON object per line
      .csv / .tsv                a header row, then one story per row
      .txt                       one story per file, or several split by --text_separator
      .tfrecord / .tfrecords     tf.train.Example records with string features

JSON keys, CSV columns and Example or tfds features are named by --text_key, --prompt_key,
--title_key, --lang_key and --tags_key (tags: a list, or one comma-separated string).

Records flow one at a time from the files, the next files read ahead in threads and consumed
in a fixed order, so memory does not grow with the corpus and the order is the same whatever
--num_parallel_reads is.
"""

import codecs
import collections
import concurrent.futures
import contextlib
import csv
import functools
import gzip
import io
import itertools
import json
import posixpath
import queue
import re
import threading
import typing
import zlib

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from components import corpus
from components.common import UserError
from components.config import BUILTIN_CORPORA, BUILTIN_PREFIX, TFDS_PREFIX, IngestConfig
from components.records import LIST_FEATURES

# Beam workers read uncompressed JSONL files in about PIECES pieces (see `parts`): enough for a
# few workers to share them evenly, and a split's shards are as many whatever the corpus size.
PIECES = 16
MIN_PIECE_BYTES = 4 << 20  # below this a piece's start-up would cost more than its lines
DEFAULT_TEXT_KEYS = ("story", "text")  # without --text_key, the story is read from the first key present
# Lone surrogates: bytes that did not decode (surrogateescape) or a JSON "\udXXX" escape.
_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.cache
def python_codec(encoding: str) -> str:
    """The Python codec that reads --encoding; UserError when there is none."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"Unknown --encoding '{encoding}': use a Python codec name such as utf-8, gbk or "
                        "big5.") from None
    # Files saved by Windows tools often start with a byte-order mark; it is not part of the text.
    return "utf-8-sig" if name == "utf-8" else encoding


def undecodable_reason(encoding: str) -> str:
    """The quarantine reason of text that is not in --encoding."""
    return f"not valid {encoding} text"


class Location(typing.NamedTuple):
    """Where a record came from: its source (a file, or a builtin:/tfds: spec) and its place in
    it (':line' or '#index'; empty for a whole file)."""

    source: str
    place: str = ""

    def __str__(self):
        return self.source + self.place


def read_source(spec: str, config: IngestConfig):
    """Yields (record, Location) pairs from a source spec; a record is a dict of example-record
    fields or, when it could not be read, a string saying why."""
    if spec.startswith(BUILTIN_PREFIX):
        yield from _read_builtin(spec, config)
    elif spec.startswith(TFDS_PREFIX):
        yield from _read_tfds(spec, config)
    else:
        paths = _expand(spec)
        yield from _read_ahead(paths, lambda path: _read_file(path, config), config.num_parallel_reads)


class Part(typing.NamedTuple):
    """A piece of a source that one Beam worker reads: a whole file, a builtin:/tfds: spec, or
    the lines of an uncompressed JSONL file from byte `start` (line `first_line`) to byte `end`."""

    source: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


def parts(spec: str, config: IngestConfig) -> list[Part]:
    """The pieces of a source spec in its reading order: their records, read one piece after
    another, are `read_source`'s. Uncompressed JSONL files are cut at line ends into about
    PIECES pieces in all, of MIN_PIECE_BYTES at least (one pass counts their lines, so that every
    record keeps its `file:line`); other files are one piece each."""
    if spec.startswith((BUILTIN_PREFIX, TFDS_PREFIX)):
        return [Part(spec)]
    paths = _expand(spec)
    sizes = {path: tf.io.gfile.stat(path).length for path in paths
             if READERS[_kind(path)] is _read_jsonl and not path.endswith(".gz")}
    piece_bytes = max(-(-sum(sizes.values()) // PIECES), MIN_PIECE_BYTES)
    return [piece for path in paths
            for piece in (_line_parts(path, sizes[path], piece_bytes) if path in sizes else [Part(path)])]


def _line_parts(path: str, size: int, piece_bytes: int) -> list[Part]:
    """A JSONL file of `size` bytes cut into pieces of piece_bytes and the rest of the line they
    cut; their first line numbers are counted in one pass of 1 MB reads."""
    ends = []
    while (start := ends[-1] if ends else 0) < size:
        if start + piece_bytes >= size:
            ends.append(size)
            continue
        with _open(path, start + piece_bytes - 1) as f:
            ends.append(start + piece_bytes - 1 + len(f.readline()))
    pieces, line = [], 1
    with _open(path) as f:
        for start, end in zip([0] + ends, ends):
            pieces.append(Part(path, start, end, line))
            for offset in range(start, end, 1 << 20):
                line += f.read(min(1 << 20, end - offset)).count(b"\n")
    return pieces or [Part(path)]


def read_part(part: Part, config: IngestConfig):
    """Yields the (record, Location) pairs of one piece of a source (see `parts`)."""
    if part.source.startswith((BUILTIN_PREFIX, TFDS_PREFIX)):
        yield from read_source(part.source, config)
    else:
        yield from _read_file(part.source, config, part)


def whole_text_files(spec: str, config: IngestConfig) -> bool:
    """Whether `spec` reads .txt files as one story each (no --text_separator splits them)."""
    if config.text_separator is not None or spec.startswith((BUILTIN_PREFIX, TFDS_PREFIX)):
        return False
    return any(_kind(path) == ".txt" for path in _expand(spec))


def _read_builtin(spec, config):
    """Stories sampled from the built-in grammar; `builtin:NAME#index` locates each."""
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise UserError(f"Unknown built-in corpus '{name}' in --data: use one of {', '.join(BUILTIN_CORPORA)}.")
    for i, story in enumerate(corpus.sample(config.builtin_count, seed=config.seed, langs=config.builtin_langs)):
        record = {k: story[k] for k in ("prompt", "story", "lang", "tags", "id")}
        yield dict(record, source=spec), Location(spec, f"#{i}")


def _read_tfds(spec, config):
    """A split of a tensorflow-datasets dataset; `tfds:NAME:SPLIT#index` locates each record."""
    import tensorflow_datasets as tfds  # slow to import, and only this source needs it

    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    split = split or "train"
    data_dir = config.tfds_data_dir or tfds.core.constants.DATA_DIR
    not_prepared = UserError(
        f"The tfds dataset '{name}' is not prepared in {data_dir}: ingest never downloads, so it must be prepared "
        f"beforehand, e.g. with `tfds build {name} --data_dir={data_dir}` on a machine with internet "
        f"(then copy that folder here or point --tfds_data_dir at it).")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.DatasetNotFoundError, ValueError):  # ValueError: an unknown config
        raise not_prepared from None
    if not builder.is_prepared():
        raise not_prepared
    try:
        # Reads the prepared files only: this is tfds.load(download=False), with the checks above first.
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except ValueError:
        raise UserError(f"The tfds dataset '{name}' has no split '{split}': use one of "
                        f"{', '.join(sorted(builder.info.splits))}.") from None
    source = f"{TFDS_PREFIX}{name}:{split}"
    for index, features in enumerate(tfds.as_numpy(dataset)):
        try:
            values = {key: _plain(value, python_codec(config.encoding)) for key, value in features.items()}
        except UnicodeDecodeError:
            yield undecodable_reason(config.encoding), Location(source, f"#{index}")
            continue
        yield _fields(values, config, config.tfds_text_key), Location(source, f"#{index}")


def _expand(spec: str) -> list[str]:
    """The readable files of a file, directory or glob, sorted (the order of the output)."""
    if tf.io.gfile.isdir(spec):
        paths = [f"{root}/{name}" for root, _, names in tf.io.gfile.walk(spec) for name in names]
    else:
        paths = tf.io.gfile.glob(spec)
    readable = sorted(p for p in paths if _kind(p) in READERS)
    if not paths:
        raise UserError(f"No input found at '{spec}': give --data a file, directory or glob, builtin:fairy_tales "
                        "or tfds:NAME.")
    if not readable:
        raise UserError(f"No {', '.join(READERS)} files (optionally .gz) at '{spec}': check --data.")
    return readable


def _kind(path: str) -> str:
    """A file's type: its suffix without an outer .gz, in lower case."""
    return posixpath.splitext(path.removesuffix(".gz"))[1].lower()


def _read_file(path, config, part: Part | None = None):
    """The records of one file, or of the lines of one of its parts, read by the reader of its type."""
    try:
        if part is not None and part.end is not None:
            yield from _read_jsonl(path, config, part.start, part.end, part.first_line)
        else:
            yield from READERS[_kind(path)](path, config)
    except (OSError, EOFError, zlib.error, tf.errors.OpError) as e:  # truncated gzip, corrupt TFRecord, I/O
        raise UserError(f"Cannot read {path} ({str(e).splitlines()[0]}): repair the file or leave it out of "
                        "--data.") from None


def _read_jsonl(path, config, start: int = 0, end: int | None = None, first_line: int = 1):
    """One JSON object per line (those from byte `start`, line `first_line`, to byte `end`);
    `path:line` locates each."""
    with _open(path, start) as f:
        lines = f if end is None else _lines_before(f, end - start)
        for number, line in enumerate(lines, first_line):
            location = Location(path, f":{number}")
            try:
                values = json.loads(line.decode(python_codec(config.encoding)))
            except UnicodeDecodeError:
                yield undecodable_reason(config.encoding), location
                continue
            except json.JSONDecodeError as e:
                if line.strip():  # e.msg is cut before its position ("Invalid control character at")
                    yield f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})", location
                continue
            yield (_fields(values, config) if isinstance(values, dict) else "a JSON line must be an object"), location


def _lines_before(stream, size: int):
    """The lines of a binary stream that start within its first `size` bytes."""
    read = 0
    for line in stream:
        if read >= size:
            return
        read += len(line)
        yield line


def _read_csv(path, config):
    """A header row naming the columns, then one record per row (quoted fields may span lines);
    `path:line` locates each by the line it starts on."""
    csv.field_size_limit(2**31 - 1)  # a whole story is one field: --max_chars limits it instead
    with _open(path) as f:
        # Bytes that do not decode become lone surrogates, so one bad row does not end the file.
        text = io.TextIOWrapper(f, encoding=python_codec(config.encoding), errors="surrogateescape", newline="")
        rows = csv.reader(text, dialect="excel-tab" if _kind(path) == ".tsv" else "excel")
        header = None
        while True:
            location = Location(path, f":{rows.line_num + 1}")
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"not valid CSV ({e})", location
                continue
            if not row:
                continue
            if header is None:
                header = row
            elif any(_SURROGATE.search(value) for value in row):
                yield undecodable_reason(config.encoding), location
            elif len(row) != len(header):
                yield f"a row with {len(row)} fields under a header of {len(header)}", location
            else:
                yield _fields(dict(zip(header, row)), config), location


def _read_text(path, config):
    """A whole file is one story (`path` locates it), or several split by --text_separator: each
    located by the line it starts on (`path:line`) and named by its place (`path#index`), as
    several may start on one line."""
    with _open(path) as f:
        if config.text_separator is None:
            yield _text_record(f.read(), config), Location(path)
            return
        # Split the bytes, not the text, so that a piece that does not decode is the only one lost.
        separator = _unescape(config.text_separator).encode(python_codec(config.encoding).removesuffix("-sig"))
        for index, (piece, line) in enumerate(_pieces(f, separator)):
            yield _text_record(piece, config, id=f"{path}#{index}"), Location(path, f":{line}")


def _pieces(stream, separator):
    """The pieces of a binary stream between separators, each with the line it starts on;
    pieces of only whitespace are left out."""
    line, rest = 1, b""
    # A separator after the last block flushes the last piece.
    for block in itertools.chain(iter(lambda: stream.read(1 << 20), b""), [separator]):
        *pieces, rest = (rest + block).split(separator)
        for piece in pieces:
            text = piece.lstrip()
            if text.rstrip():
                yield piece, line + piece[:len(piece) - len(text)].count(b"\n")
            line += piece.count(b"\n") + separator.count(b"\n")


def _text_record(data, config, **fields):
    try:
        return {"story": data.decode(python_codec(config.encoding)), **fields}
    except UnicodeDecodeError:
        return undecodable_reason(config.encoding)


def _read_tfrecord(path, config):
    """tf.train.Example records, their features named like JSON keys; `path#index` locates each."""
    records = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
    for index, data in enumerate(records.as_numpy_iterator()):
        location = Location(path, f"#{index}")
        try:
            features = tf.train.Example.FromString(data).features.feature
        except DecodeError:
            yield "not a tf.train.Example", location
            continue
        values = {}
        try:
            for name, feature in features.items():
                kind = feature.WhichOneof("kind")  # bytes_list, float_list, int64_list or None when empty
                values[name] = _plain(list(getattr(feature, kind).value) if kind else [], python_codec(config.encoding))
        except UnicodeDecodeError:
            yield undecodable_reason(config.encoding), location
            continue
        yield _fields(values, config), location


READERS = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv, ".txt": _read_text,
           ".tfrecord": _read_tfrecord, ".tfrecords": _read_tfrecord}


def _fields(values: dict, config: IngestConfig, text_key: str | None = None) -> dict | str:
    """The example-record fields of a source record keyed by the user's names (--text_key, ...),
    or why it has no story. The types are left for the schema to check."""
    text_key = text_key or config.text_key
    candidates = (text_key,) if text_key else DEFAULT_TEXT_KEYS
    story_key = next((key for key in candidates if key in values), None)
    if story_key is None:
        return f"missing required field 'story' (no {' or '.join(map(repr, candidates))} key: see --text_key)"
    keys = {"story": story_key, "prompt": config.prompt_key, "title": config.title_key, "lang": config.lang_key,
            "tags": config.tags_key, "id": "id", "source": "source"}
    record = {}
    for field, key in keys.items():
        if key not in values:
            continue
        value = values[key]
        if field in LIST_FEATURES and isinstance(value, str):
            value = [tag.strip() for tag in value.split(",") if tag.strip()]
        elif field not in LIST_FEATURES and isinstance(value, list) and len(value) == 1:
            value = value[0]  # a TFRecord feature holds a list even for one value
        if any(isinstance(v, str) and _SURROGATE.search(v) for v in (value if isinstance(value, list) else [value])):
            return f"field '{field}' is not valid Unicode (it has a lone surrogate)"
        record[field] = value
    return record


def _plain(value, codec):
    """A feature value (bytes, numpy scalar or array, list, dict) as Python str, number, list or dict."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode(codec)
    if isinstance(value, list):
        return [_plain(v, codec) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, codec) for k, v in value.items()}
    return value


class _GFileReader(io.RawIOBase):
    """A tf.io.gfile.GFile as a raw binary stream, so that io and gzip can buffer and wrap it
    (GFile itself lacks readable() and readinto())."""

    def __init__(self, gfile):
        self._gfile = gfile

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._gfile.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def _open(path, start: int = 0):
    """A buffered binary stream of a local or tf.io.gfile file, decompressed when it ends in .gz
    (from byte `start` of an uncompressed file)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        if start:
            f.seek(start)
        stream = io.BufferedReader(_GFileReader(f), buffer_size=1 << 20)
        yield gzip.GzipFile(fileobj=stream) if path.endswith(".gz") else stream


_END = object()  # a file's reader thread puts this after its last batch
# Records are handed over in batches (one hand-off costs about as much as a small record), and a
# file read ahead holds at most this many batches: memory is bounded whatever the corpus size.
_BATCH = 64
_BATCHES_AHEAD = 4


def _read_ahead(paths, read, parallelism):
    """Yields read(path)'s items for each path in turn, while the next files are read ahead in
    up to `parallelism` threads (I/O, decompression and parsing overlap the caller's work).

    Items come out in the order of `paths` whatever the parallelism, and each file's queue
    is bounded, so the output is deterministic and memory stays flat.
    """
    if parallelism <= 1:
        for path in paths:
            yield from read(path)
        return
    stop = threading.Event()

    def put(out, item):
        while not stop.is_set():  # the consumer may stop early (an error): then give up
            try:
                return out.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce(path, out):
        batch, end = [], _END
        try:
            for item in read(path):
                batch.append(item)
                if len(batch) == _BATCH:
                    put(out, batch)
                    batch = []
        except Exception as e:  # raised again by the consumer after this file's earlier records
            end = e
        put(out, batch)
        put(out, end)

    pending = collections.deque()
    paths = iter(paths)
    with concurrent.futures.ThreadPoolExecutor(parallelism) as pool:

        def start_next():
            path = next(paths, None)
            if path is not None:
                pending.append(queue.Queue(maxsize=_BATCHES_AHEAD))
                pool.submit(produce, path, pending[-1])

        try:
            for _ in range(parallelism):
                start_next()
            while pending:
                out = pending.popleft()
                while (batch := out.get()) is not _END:
                    if isinstance(batch, Exception):
                        raise batch
                    yield from batch
                start_next()
        finally:
            stop.set()


def _unescape(separator):
    """'\\n\\n' typed on a command line is a blank line."""
    if separator is None:
        return None
    return separator.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
