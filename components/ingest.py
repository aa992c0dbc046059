"""ExampleGen: reads story sources, validates them and writes deterministic TFRecord splits.

The sources (`--data`: the built-in grammar, a tfds split, or files) are read as a stream by
`components.sources`; every record is checked against the schema (bad ones are quarantined),
and the stories flow one at a time to the shard writers, so memory does not grow with the
corpus and the output is byte-identical whatever --num_parallel_reads is. With
--beam_pipeline_args the same work runs as an Apache Beam pipeline, spread over the pieces of
the source (`_ingest_with_beam`).

Each story becomes one or more (prompt, story) pairs: a story without a prompt is split
into its opening sentence(s) and the continuation, and a continuation longer than the
window becomes several windows, each prompted by the text just before it.

The output directory gets `{split}-NNNNN-of-NNNNN.tfrecord`, `quarantine.jsonl` (each bad
record with its reason and `file:line`, or `#index` for TFRecord and tfds), `statistics.json`
and a TensorBoard summary under `logs/`.
"""

import bisect
import collections
import hashlib
import json
import pickle
import re
import shlex
import shutil
import time

import tensorflow as tf

from components import sources
from components.common import SPLITS, UserError, detect_lang, normalize_text
from components.config import IngestConfig
from components.progress import Progress
from components.records import STATISTICS_FILE, to_example
from components.validate import QUARANTINE_FILE, Quarantine, RecordValidator, load_schema

# Story, prompt and example lengths in characters are counted in these buckets (lower edges).
LENGTH_BUCKETS = (0, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)

# A sentence ends at Chinese 。！？… or at . ! ? before a space, plus any closing quotes.
_SENTENCE = re.compile(r".*?(?:[。！？…]+|[.!?]+(?=[\s”’\"」』）)]|$))[”’\"」』）)]*\s*|.+$", re.S)


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

    def merge(self, other: "Statistics"):
        """Adds another run's counts (a Beam worker's) to these."""
        for split in SPLITS:
            self.stories[split].update(other.stories[split])
            self.examples[split].update(other.examples[split])
        for name, histogram in other.lengths.items():
            self.lengths[name] = [a + b for a, b in zip(self.lengths[name], histogram)]
        self.chars.update(other.chars)
        self.bad.update(other.bad)

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


def ingest(config: IngestConfig, output_dir: str) -> dict:
    """Writes `{split}-NNNNN-of-NNNNN.tfrecord`, `quarantine.jsonl`, `statistics.json` and
    `logs/` into output_dir for the stories of `config.data`, and returns the statistics.
    With `config.beam_pipeline_args` an Apache Beam pipeline does it (see `_ingest_with_beam`).

    Raises UserError, after writing the statistics, when the corpus is unusable or more than
    `config.max_bad_fraction` of its records are bad.
    """
    start = time.time()
    sources.python_codec(config.encoding)  # an unknown encoding fails before anything is read
    if config.beam_pipeline_args:
        stats, undecodable_file = _ingest_with_beam(config, output_dir)
    else:
        stats, undecodable_file = _ingest_records(sources.read_source(config.data, config), config, output_dir,
                                                  config.num_shards)
    summary = {"source": config.data, **stats.summary(time.time() - start)}
    with tf.io.gfile.GFile(f"{output_dir}/{STATISTICS_FILE}", "w") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False))
    _write_summary(summary, f"{output_dir}/logs")
    _check_outcome(summary, config, f"{output_dir}/{QUARANTINE_FILE}", undecodable_file)
    return summary


def _ingest_records(records, config: IngestConfig, output_dir: str, num_shards: int, prefix: str = ""):
    """Validates `records` ((record, Location) pairs), writes their examples into
    `{prefix}{split}-*.tfrecord` shards and the bad ones into `{prefix}quarantine.jsonl`; returns
    the Statistics and the first file found not to be in --encoding (None when there is none).
    Both paths, in-process and Beam, ingest through this."""
    validator = RecordValidator(load_schema(), max_chars=config.max_chars)
    quarantine = Quarantine(f"{output_dir}/{prefix}{QUARANTINE_FILE}")
    stats = Statistics()
    writers = _ShardWriters(output_dir, num_shards, prefix)
    undecodable, undecodable_file = sources.undecodable_reason(config.encoding), None  # the first file not in --encoding
    progress = Progress("ingest", "records read")
    read = story_bytes = 0
    try:
        for raw, location in records:
            read += 1
            progress.update(read, lambda: f", {read / progress.elapsed():,.0f} records/s, "
                                          f"{story_bytes / 1e6 / progress.elapsed():.1f} MB/s of stories")
            result = raw if isinstance(raw, str) else _examples_of(raw, location, validator, config.window_bytes)
            if isinstance(result, str):
                stats.add_bad(result)
                quarantine.add(result, str(location), None if isinstance(raw, str) else raw)
                if result == undecodable:
                    undecodable_file = undecodable_file or location.source
                continue
            story, examples = result
            story_bytes += len(story.encode("utf-8"))
            split = split_of(story, config.eval_fraction, config.test_fraction)
            writers.write(split, story, examples)
            stats.add_story(split, story, examples)
    finally:
        records.close()  # stops any reader threads now, should a record have raised
        writers.close()
        quarantine.close()
    return stats, undecodable_file


# ---------------------------------------------------------------- on Apache Beam


def _ingest_with_beam(config: IngestConfig, output_dir: str):
    """Ingest as an Apache Beam pipeline run with `--beam_pipeline_args` (any runner: DirectRunner
    with several processes, Dataflow, Flink, Spark); returns what `_ingest_records` returns.

    The source is cut into pieces (`sources.parts`: whole files, and JSONL files cut at line
    ends into about 16 pieces in all). Each worker ingests its pieces with `_ingest_records`,
    into files of their own under a scratch folder, so no story crosses a shuffle and no process
    holds more than a piece's shard writers. Then the shards are renamed in piece order, the
    quarantine files joined in piece order (the in-process run's order) and the statistics
    added up. A split gets one shard per piece that has examples of it; --num_shards is the
    in-process path's.
    """
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise UserError("--beam_pipeline_args needs Apache Beam: pip install 'storygen[beam]'.") from None
    pieces = sources.parts(config.data, config)
    scratch = f"{output_dir}/beam-scratch"
    if tf.io.gfile.exists(scratch):  # left by a run that was killed
        tf.io.gfile.rmtree(scratch)
    tf.io.gfile.makedirs(scratch)
    options = PipelineOptions(shlex.split(config.beam_pipeline_args))
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "Pieces" >> beam.Create(list(enumerate(pieces)))
             | "Spread" >> beam.Reshuffle()
             | "Ingest" >> beam.Map(_ingest_piece, config, scratch))
    stats, undecodable_file = Statistics(), None
    for index in range(len(pieces)):
        with tf.io.gfile.GFile(_piece_result(scratch, index), "rb") as f:
            result = pickle.load(f)
        if result["error"]:
            raise UserError(result["error"])
        stats.merge(result["statistics"])
        undecodable_file = undecodable_file or result["undecodable_file"]
    for split in SPLITS:
        shards = sorted(tf.io.gfile.glob(f"{scratch}/piece-*-{split}-*.tfrecord"))
        for k, shard in enumerate(shards):
            tf.io.gfile.rename(shard, f"{output_dir}/{_shard_name(split, k, len(shards))}", overwrite=True)
    quarantined = sorted(tf.io.gfile.glob(f"{scratch}/piece-*-{QUARANTINE_FILE}"))
    if quarantined:
        with tf.io.gfile.GFile(f"{output_dir}/{QUARANTINE_FILE}", "wb") as out:
            for name in quarantined:
                with tf.io.gfile.GFile(name, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    tf.io.gfile.rmtree(scratch)
    return stats, undecodable_file


def _ingest_piece(numbered_piece: tuple[int, sources.Part], config: IngestConfig, scratch: str):
    """A Beam worker's work: one piece (with its number) ingested into `scratch`, with its statistics, the first
    undecodable file and the error that stopped it, if any, pickled beside its shards."""
    index, piece = numbered_piece
    result = {"statistics": Statistics(), "undecodable_file": None, "error": None}
    try:
        result["statistics"], result["undecodable_file"] = _ingest_records(
            sources.read_part(piece, config), config, scratch, num_shards=1, prefix=f"piece-{index:05d}-")
    except UserError as e:  # a file that cannot be read: the launcher raises it as the in-process run would
        result["error"] = str(e)
    with tf.io.gfile.GFile(_piece_result(scratch, index), "wb") as f:
        pickle.dump(result, f)


def _piece_result(scratch: str, index: int) -> str:
    return f"{scratch}/piece-{index:05d}-result.pickle"


def describe(summary: dict) -> str:
    """The pipeline's one-line summary of the ingest step."""
    return (f"{summary['source']}: {summary['stories']} stories -> {summary['examples']} examples, "
            f"{summary['quarantined']} quarantined, {summary['stories_per_second']:.0f} stories/s")


def _shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


class _ShardWriters:
    """The TFRecord shards of every split (`{prefix}{split}-NNNNN-of-NNNNN.tfrecord`), opened as
    their first story comes; a story's shard is a hash of its text, so the same corpus always
    gives the same files."""

    def __init__(self, output_dir: str, num_shards: int, prefix: str = ""):
        self.output_dir, self.num_shards, self.prefix = output_dir, num_shards, prefix
        self.writers = {}

    def write(self, split: str, story: str, examples: list[dict]):
        shard = int(hashlib.sha256(story.encode("utf-8")).hexdigest(), 16) % self.num_shards
        writer = self.writers.get((split, shard))
        if writer is None:
            name = f"{self.output_dir}/{self.prefix}{_shard_name(split, shard, self.num_shards)}"
            writer = self.writers[(split, shard)] = tf.io.TFRecordWriter(name)
        for example in examples:
            # deterministic: map fields (the features) in a fixed order, the same in every process.
            writer.write(to_example(example).SerializeToString(deterministic=True))

    def close(self):
        for writer in self.writers.values():
            writer.close()


def _examples_of(raw: dict, location: sources.Location, validator: RecordValidator, window_bytes: int):
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


def _check_outcome(summary, config: IngestConfig, quarantine_path, undecodable_file):
    """Raises a one-sentence UserError when the run's output is unusable or too much was bad."""
    data, max_bad_fraction, encoding = config.data, config.max_bad_fraction, config.encoding
    total, bad = summary["stories"], summary["quarantined"]
    too_many_bad = bad > max_bad_fraction * total
    if undecodable_file and (too_many_bad or bad == total):
        raise UserError(f"{undecodable_file} is not {encoding} text: pass --encoding with its encoding "
                        f"(e.g. --encoding=gbk); {bad} of {total} records are bad, see {quarantine_path}.")
    most_often = ""
    if bad:
        reason, count = next(iter(summary["quarantine_reasons"].items()))
        most_often = f"most often {count}× {reason}"
    if bad == total:
        raise UserError(f"The corpus at '{data}' has no usable stories "
                        + (f"({bad} bad records, {most_often}): see {quarantine_path}." if bad
                           else "(it holds no records)."))
    if too_many_bad:
        raise UserError(f"{bad} of {total} records ({bad / total:.1%}) are bad, over --max_bad_fraction="
                        f"{max_bad_fraction} ({most_often}): see {quarantine_path}.")
    fractions = {"train": 1, "eval": config.eval_fraction, "test": config.test_fraction}
    empty = [split for split in SPLITS if fractions[split] > 0 and summary["examples"][split] == 0]
    if empty:
        stories = total - bad
        fix = ("add stories, or lower --eval_fraction/--test_fraction" if "train" in empty
               else "add stories, or raise " + " and ".join(f"--{split}_fraction" for split in empty))
        if sources.whole_text_files(data, config):
            fix = f"give --text_separator to split each .txt file into stories (without it a file is one), or {fix}"
        raise UserError(f"The corpus at '{data}' gave no {' or '.join(empty)} examples: its {stories} "
                        f"{'story goes' if stories == 1 else 'stories go'} to the splits whole; {fix}.")
