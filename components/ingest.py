"""ExampleGen: reads story sources, validates them and writes deterministic TFRecord splits.

A source spec (`--data`) is one of

    builtin:fairy_tales          the built-in grammar (--builtin_count stories)
    tfds:NAME[/CONFIG][:SPLIT]   a tensorflow-datasets split prepared beforehand in --tfds_data_dir
    a file, directory or glob    local or any tf.io.gfile path; each file may be gzip-compressed (.gz):
      .jsonl / .json             one JSON object per line
      .csv / .tsv                a header row, then one story per row
      .txt                       one story per file, or several split by --text_separator
      .tfrecord / .tfrecords     tf.train.Example records with string features

JSON keys, CSV columns and Example or tfds features are named by --text_key, --prompt_key,
--title_key, --lang_key and --tags_key (tags: a list, or one comma-separated string).

Everything streams: records flow one at a time from the files (the next files read ahead in
threads, consumed in a fixed order) to the shard writers, so memory does not grow with the
corpus and the output is byte-identical whatever --num_parallel_reads is.

Each story becomes one or more (prompt, story) pairs: a story without a prompt is split
into its opening sentence(s) and the continuation, and a continuation longer than the
window becomes several windows, each prompted by the text just before it.

The output directory gets `{split}-NNNNN-of-NNNNN.tfrecord`, `quarantine.jsonl` (each bad
record with its reason and `file:line`, or `#index` for TFRecord and tfds), `statistics.json`
and a TensorBoard summary under `logs/`.
"""

import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import posixpath
import queue
import re
import threading
import time
import typing
import zlib

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from components import corpus
from components.common import LIST_FEATURES, SPLITS, UserError, detect_lang, normalize_text, to_example
from components.validate import Quarantine, RecordValidator, load_schema

BUILTIN_PREFIX = "builtin:"
TFDS_PREFIX = "tfds:"
BUILTIN_CORPORA = ("fairy_tales",)
DEFAULT_TEXT_KEYS = ("story", "text")  # without --text_key, the story is read from the first key present

# Story, prompt and example lengths in characters are counted in these buckets (lower edges).
LENGTH_BUCKETS = (0, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)

# A sentence ends at Chinese 。！？… or at . ! ? before a space, plus any closing quotes.
_SENTENCE = re.compile(r".*?(?:[。！？…]+|[.!?]+(?=[\s”’\"」』）)]|$))[”’\"」』）)]*\s*|.+$", re.S)
# Lone surrogates: bytes that did not decode (surrogateescape) or a JSON "\udXXX" escape.
_SURROGATE = re.compile("[\ud800-\udfff]")


def split_sentences(text: str) -> list[str]:
    """Splits text into sentences whose concatenation is the text.

    >>> split_sentences("从前有座山。山里有座庙！Once upon a time. The end")
    ['从前有座山。', '山里有座庙！', 'Once upon a time. ', 'The end']
    """
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]


def make_pairs(prompt: str, story: str, window_bytes: int, min_prompt_chars: int = 12) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs for one story; windows hold at most `window_bytes` of UTF-8.

    Windows are measured in bytes because a Chinese character (3 bytes) and about three
    English letters each make roughly one SentencePiece token, so bytes track tokens in both.
    """
    sentences = split_sentences(story)
    if not prompt:
        # The opening sentence, or two when the first is very short.
        take = 2 if len(sentences) > 2 and len(sentences[0]) < min_prompt_chars else 1
        prompt, sentences = "".join(sentences[:take]).strip(), sentences[take:]
    pairs, window, size = [], [], 0
    context = prompt
    for sentence in _cut_long(sentences, window_bytes):
        n = len(sentence.encode("utf-8"))
        if window and size + n > window_bytes:
            text = "".join(window).strip()
            pairs.append((context, text))
            context = _tail(text, window_bytes // 4)
            window, size = [], 0
        window.append(sentence)
        size += n
    if window and "".join(window).strip():
        pairs.append((context, "".join(window).strip()))
    return pairs


def _cut_long(sentences, limit):
    """Cuts any sentence longer than the window into window-sized pieces."""
    for s in sentences:
        data = s.encode("utf-8")
        while len(data) > limit:
            piece = data[:limit].decode("utf-8", errors="ignore")
            yield piece
            data = data[len(piece.encode("utf-8")):]
        if data:
            yield data.decode("utf-8")


def _tail(text: str, max_bytes: int) -> str:
    """The last sentences of `text` that fit in max_bytes (at least the end of the last one)."""
    out = ""
    for sentence in reversed(split_sentences(text)):
        if len((sentence + out).encode("utf-8")) > max_bytes:
            break
        out = sentence + out
    return (out or text.encode("utf-8")[-max_bytes:].decode("utf-8", errors="ignore")).strip()


def split_of(text: str, eval_fraction: float, test_fraction: float) -> str:
    """The split a story belongs to, from a hash of its normalised text: the same on any machine,
    and exact or whitespace/case-level duplicates always land together."""
    return SPLITS[_bucket(text, eval_fraction, test_fraction)]


def _bucket(text, eval_fraction, test_fraction):
    key = re.sub(r"\s+", "", text.casefold()).encode("utf-8")
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return 2 if u < test_fraction else 1 if u < test_fraction + eval_fraction else 0


# ---------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How to read a source (the ingest() arguments of the same names)."""

    encoding: str
    text_key: str | None
    prompt_key: str
    title_key: str
    lang_key: str
    tags_key: str
    text_separator: str | None
    tfds_text_key: str | None
    tfds_data_dir: str | None
    num_parallel_reads: int
    builtin_count: int
    builtin_langs: tuple
    seed: int

    def __post_init__(self):
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise UserError(f"Unknown --encoding '{self.encoding}': use a Python codec name such as utf-8, gbk or "
                            "big5.") from None

    @functools.cached_property
    def codec(self) -> str:
        # Files saved by Windows tools often start with a byte-order mark; it is not part of the text.
        return "utf-8-sig" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding

    @functools.cached_property
    def undecodable(self) -> str:
        """The quarantine reason of text that is not in --encoding."""
        return f"not valid {self.encoding} text"


class Location(typing.NamedTuple):
    """Where a record came from: its source (a file, or a builtin:/tfds: spec) and its place in
    it (':line' or '#index'; empty for a whole file)."""

    source: str
    place: str = ""

    def __str__(self):
        return self.source + self.place


def read_source(spec: str, options: SourceOptions):
    """Yields (record, Location) pairs from a source spec; a record is a dict of example-record
    fields or, when it could not be read, a string saying why."""
    if spec.startswith(BUILTIN_PREFIX):
        yield from _read_builtin(spec, options)
    elif spec.startswith(TFDS_PREFIX):
        yield from _read_tfds(spec, options)
    else:
        paths = _expand(spec)
        yield from _read_ahead(paths, lambda path: _read_file(path, options), options.num_parallel_reads)


def _read_builtin(spec, options):
    """Stories sampled from the built-in grammar; `builtin:NAME#index` locates each."""
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise UserError(f"Unknown built-in corpus '{name}' in --data: use one of {', '.join(BUILTIN_CORPORA)}.")
    for i, story in enumerate(corpus.sample(options.builtin_count, seed=options.seed, langs=options.builtin_langs)):
        record = {k: story[k] for k in ("prompt", "story", "lang", "tags", "id")}
        yield dict(record, source=spec), Location(spec, f"#{i}")


def _read_tfds(spec, options):
    """A split of a tensorflow-datasets dataset; `tfds:NAME:SPLIT#index` locates each record."""
    import tensorflow_datasets as tfds  # slow to import, and only this source needs it

    name, _, split = spec[len(TFDS_PREFIX):].partition(":")
    split = split or "train"
    data_dir = options.tfds_data_dir or tfds.core.constants.DATA_DIR
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
            values = {key: _plain(value, options.codec) for key, value in features.items()}
        except UnicodeDecodeError:
            yield options.undecodable, Location(source, f"#{index}")
            continue
        yield _fields(values, options, options.tfds_text_key), Location(source, f"#{index}")


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


def _read_file(path, options):
    """The records of one file, read by the reader of its type."""
    try:
        yield from READERS[_kind(path)](path, options)
    except (OSError, EOFError, zlib.error, tf.errors.OpError) as e:  # truncated gzip, corrupt TFRecord, I/O
        raise UserError(f"Cannot read {path} ({str(e).splitlines()[0]}): repair the file or leave it out of "
                        "--data.") from None


def _read_jsonl(path, options):
    """One JSON object per line; `path:line` locates each."""
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            location = Location(path, f":{number}")
            try:
                values = json.loads(line.decode(options.codec))
            except UnicodeDecodeError:
                yield options.undecodable, location
                continue
            except json.JSONDecodeError as e:
                if line.strip():
                    yield f"not valid JSON ({e.msg})", location
                continue
            yield (_fields(values, options) if isinstance(values, dict) else "a JSON line must be an object"), location


def _read_csv(path, options):
    """A header row naming the columns, then one record per row (quoted fields may span lines);
    `path:line` locates each by the line it starts on."""
    csv.field_size_limit(2**31 - 1)  # a whole story is one field: --max_chars limits it instead
    with _open(path) as f:
        # Bytes that do not decode become lone surrogates, so one bad row does not end the file.
        text = io.TextIOWrapper(f, encoding=options.codec, errors="surrogateescape", newline="")
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
                yield options.undecodable, location
            elif len(row) != len(header):
                yield f"a row with {len(row)} fields under a header of {len(header)}", location
            else:
                yield _fields(dict(zip(header, row)), options), location


def _read_text(path, options):
    """A whole file is one story (`path` locates it), or several split by --text_separator: each
    located by the line it starts on (`path:line`) and named by its place (`path#index`), as
    several may start on one line."""
    with _open(path) as f:
        if options.text_separator is None:
            yield _text_record(f.read(), options), Location(path)
            return
        # Split the bytes, not the text, so that a piece that does not decode is the only one lost.
        separator = options.text_separator.encode(options.codec.removesuffix("-sig"))
        for index, (piece, line) in enumerate(_pieces(f, separator)):
            yield _text_record(piece, options, id=f"{path}#{index}"), Location(path, f":{line}")


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


def _text_record(data, options, **fields):
    try:
        return {"story": data.decode(options.codec), **fields}
    except UnicodeDecodeError:
        return options.undecodable


def _read_tfrecord(path, options):
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
                values[name] = _plain(list(getattr(feature, kind).value) if kind else [], options.codec)
        except UnicodeDecodeError:
            yield options.undecodable, location
            continue
        yield _fields(values, options), location


READERS = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv, ".txt": _read_text,
           ".tfrecord": _read_tfrecord, ".tfrecords": _read_tfrecord}


def _fields(values: dict, options: SourceOptions, text_key: str | None = None) -> dict | str:
    """The example-record fields of a source record keyed by the user's names (--text_key, ...),
    or why it has no story. The types are left for the schema to check."""
    text_key = text_key or options.text_key
    candidates = (text_key,) if text_key else DEFAULT_TEXT_KEYS
    story_key = next((key for key in candidates if key in values), None)
    if story_key is None:
        return f"missing required field 'story' (no {' or '.join(map(repr, candidates))} key: see --text_key)"
    keys = {"story": story_key, "prompt": options.prompt_key, "title": options.title_key, "lang": options.lang_key,
            "tags": options.tags_key, "id": "id", "source": "source"}
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
def _open(path):
    """A buffered binary stream of a local or tf.io.gfile file, decompressed when it ends in .gz."""
    with tf.io.gfile.GFile(path, "rb") as f:
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


# ---------------------------------------------------------------- statistics


class Statistics:
    """Counts and histograms of an ingest run, in memory that does not grow with the corpus."""

    def __init__(self):
        self.stories = {split: collections.Counter() for split in SPLITS}  # by language
        self.examples = {split: collections.Counter() for split in SPLITS}
        self.lengths = {name: [0] * len(LENGTH_BUCKETS) for name in ("story_chars", "prompt_chars", "example_chars")}
        self.chars = collections.Counter()
        self.bad = collections.Counter()  # by reason

    def add_story(self, split: str, story: str, examples: list[dict]):
        lang = examples[0]["lang"]
        self.stories[split][lang] += 1
        self.examples[split][lang] += len(examples)
        self._count_length("story_chars", len(story))
        # The first prompt and the windows are the whole text once (later prompts repeat text).
        self.chars.update(examples[0]["prompt"])
        for example in examples:
            self._count_length("prompt_chars", len(example["prompt"]))
            self._count_length("example_chars", len(example["story"]))
            self.chars.update(example["story"])

    def add_bad(self, reason: str):
        self.bad[reason] += 1

    def _count_length(self, name, length):
        self.lengths[name][bisect.bisect_right(LENGTH_BUCKETS, length) - 1] += 1

    def summary(self, seconds: float) -> dict:
        good = sum(sum(c.values()) for c in self.stories.values())
        bad = sum(self.bad.values())
        labels = [f"{lo}-{hi - 1}" for lo, hi in zip(LENGTH_BUCKETS, LENGTH_BUCKETS[1:])] + [f"{LENGTH_BUCKETS[-1]}+"]
        total_chars = sum(self.chars.values())
        counts = [n for _, n in self.chars.most_common(3000)]
        return {
            "stories": good + bad, "quarantined": bad,
            "examples": {split: sum(c.values()) for split, c in self.examples.items()},
            "stories_by_lang": {split: dict(sorted(c.items())) for split, c in self.stories.items()},
            "examples_by_lang": {split: dict(sorted(c.items())) for split, c in self.examples.items()},
            "quarantine_reasons": dict(self.bad.most_common()),
            "length_histograms": {name: dict(zip(labels, hist)) for name, hist in self.lengths.items()},
            "characters": {"total": total_chars, "distinct": len(self.chars),
                           "top_1000_share": sum(counts[:1000]) / max(total_chars, 1),
                           "top_3000_share": sum(counts) / max(total_chars, 1)},
            "seconds": seconds, "stories_per_second": (good + bad) / max(seconds, 1e-9),
        }


def _write_summary(summary: dict, logdir: str):
    """A few scalars and one markdown table of the statistics, for TensorBoard."""
    rows = [f"| {split} | {lang} | {n} | {summary['examples_by_lang'][split][lang]} |"
            for split in SPLITS for lang, n in summary["stories_by_lang"][split].items()]
    table = "\n".join(["| split | language | stories | examples |", "|---|---|---|---|", *rows,
                       "", f"{summary['quarantined']} of {summary['stories']} records quarantined; "
                       f"{summary['characters']['distinct']} distinct characters."])
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.scalar("ingest/stories", summary["stories"], step=0)
        tf.summary.scalar("ingest/quarantined", summary["quarantined"], step=0)
        for split, n in summary["examples"].items():
            tf.summary.scalar(f"ingest/examples_{split}", n, step=0)
        tf.summary.scalar("ingest/distinct_characters", summary["characters"]["distinct"], step=0)
        tf.summary.scalar("ingest/top_1000_share", summary["characters"]["top_1000_share"], step=0)
        tf.summary.text("ingest/summary", table, step=0)
    writer.close()


# ---------------------------------------------------------------- the step


def ingest(data: str, output_dir: str, *, seed: int, eval_fraction: float, test_fraction: float,
           num_shards: int, window_bytes: int, max_chars: int, max_bad_fraction: float,
           builtin_count: int, builtin_langs, encoding: str = "utf-8", text_key: str | None = None,
           prompt_key: str = "prompt", title_key: str = "title", lang_key: str = "lang", tags_key: str = "tags",
           text_separator: str | None = None, tfds_text_key: str | None = None, tfds_data_dir: str | None = None,
           num_parallel_reads: int = 4) -> dict:
    """Writes `{split}-NNNNN-of-NNNNN.tfrecord`, `quarantine.jsonl`, `statistics.json` and
    `logs/` into output_dir and returns the statistics.

    text_key: the key, column or feature holding the story (None: 'story', or else 'text');
    tfds_text_key overrides it for tfds: sources. text_separator splits a .txt file into
    stories (backslash escapes \\n, \\t, \\r are understood; None: one story per file).
    num_parallel_reads: files read ahead in threads (1: one after another); it does not change
    the output. Raises UserError, after writing the statistics, when the corpus is unusable or
    more than max_bad_fraction of its records are bad.
    """
    start = time.time()
    options = SourceOptions(
        encoding=encoding, text_key=text_key, prompt_key=prompt_key, title_key=title_key, lang_key=lang_key,
        tags_key=tags_key, text_separator=_unescape(text_separator), tfds_text_key=tfds_text_key,
        tfds_data_dir=tfds_data_dir, num_parallel_reads=num_parallel_reads, builtin_count=builtin_count,
        builtin_langs=tuple(builtin_langs), seed=seed)
    validator = RecordValidator(load_schema(), max_chars=max_chars)
    quarantine = Quarantine(f"{output_dir}/quarantine.jsonl")
    stats = Statistics()
    writers = {}
    undecodable_file = None  # the first file with text that is not in --encoding
    records = read_source(data, options)
    try:
        for raw, location in records:
            result = raw if isinstance(raw, str) else _examples_of(raw, location, validator, window_bytes)
            if isinstance(result, str):
                stats.add_bad(result)
                quarantine.add(result, str(location), None if isinstance(raw, str) else raw)
                if result == options.undecodable:
                    undecodable_file = undecodable_file or location.source
                continue
            story, examples = result
            split = split_of(story, eval_fraction, test_fraction)
            shard = int(hashlib.sha256(story.encode("utf-8")).hexdigest(), 16) % num_shards
            writer = writers.get((split, shard))
            if writer is None:
                name = f"{output_dir}/{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"
                writer = writers[(split, shard)] = tf.io.TFRecordWriter(name)
            for example in examples:
                # deterministic: map fields (the features) in a fixed order, the same in every process.
                writer.write(to_example(example).SerializeToString(deterministic=True))
            stats.add_story(split, story, examples)
    finally:
        records.close()  # stops any reader threads now, should a record have raised
        for writer in writers.values():
            writer.close()
        quarantine.close()
    summary = stats.summary(time.time() - start)
    with tf.io.gfile.GFile(f"{output_dir}/statistics.json", "w") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False))
    _write_summary(summary, f"{output_dir}/logs")
    _check_outcome(summary, data, quarantine.path, max_bad_fraction, undecodable_file, encoding)
    return summary


def _unescape(separator):
    """'\\n\\n' typed on a command line is a blank line."""
    if separator is None:
        return None
    return separator.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def _examples_of(raw: dict, location: Location, validator: RecordValidator, window_bytes: int):
    """(normalised story, its example records), or the reason the record is bad."""
    reason = validator.check(raw)
    if reason is not None:
        return reason
    story = normalize_text(raw["story"])
    pairs = make_pairs(normalize_text(raw.get("prompt") or ""), story, window_bytes)
    if not pairs:
        return "too short: needs at least two sentences (a prompt and a continuation)"
    record_id = raw.get("id") or str(location)
    shared = {"title": normalize_text(raw.get("title") or ""), "lang": raw.get("lang") or detect_lang(story),
              "tags": raw.get("tags") or [], "source": raw.get("source") or location.source}
    return story, [dict(shared, prompt=prompt, story=window, id=record_id if len(pairs) == 1 else f"{record_id}#w{k}",
                        ends_story=int(k == len(pairs) - 1))
                   for k, (prompt, window) in enumerate(pairs)]


def _check_outcome(summary, data, quarantine_path, max_bad_fraction, undecodable_file, encoding):
    """Raises a one-sentence UserError when the run's output is unusable or too much was bad."""
    total, bad = summary["stories"], summary["quarantined"]
    too_many_bad = bad > max_bad_fraction * total
    if undecodable_file and (too_many_bad or bad == total):
        raise UserError(f"{undecodable_file} is not {encoding} text: pass --encoding with its encoding "
                        f"(e.g. --encoding=gbk); {bad} of {total} records are bad, see {quarantine_path}.")
    if bad == total:
        raise UserError(f"The corpus at '{data}' has no usable stories "
                        + (f"({bad} bad records, see {quarantine_path})." if bad else "(it holds no records)."))
    if too_many_bad:
        reason, count = next(iter(summary["quarantine_reasons"].items()))
        raise UserError(f"{bad} of {total} records ({bad / total:.1%}) are bad, over --max_bad_fraction="
                        f"{max_bad_fraction} (most often {count}× {reason}): see {quarantine_path}.")
    if summary["examples"]["train"] == 0:
        raise UserError(f"The corpus at '{data}' gave no training examples: add stories or lower "
                        "--eval_fraction/--test_fraction.")
