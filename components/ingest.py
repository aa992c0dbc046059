"""ExampleGen: reads story sources, validates them and writes deterministic TFRecord splits.

A source spec is `builtin:fairy_tales` (the built-in grammar) or a path: a file, a directory
or a glob, local or any tf.io.gfile filesystem, of `.jsonl` / `.json` records or `.txt`
stories (one story per file), optionally gzip-compressed (`.gz`).

Each story becomes one or more (prompt, story) pairs: a story without a prompt is split
into its opening sentence(s) and the continuation, and a continuation longer than the
window becomes several windows, each prompted by the text just before it.
"""

import gzip
import hashlib
import json
import re
import time

import tensorflow as tf

from components import corpus
from components.common import LIST_FEATURES, SPLITS, TEXT_FEATURES, UserError, detect_lang, normalize_text, to_example
from components.validate import Quarantine, RecordValidator, load_schema

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("fairy_tales",)
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
JSON_TEXT_KEYS = ("story", "text")  # the story is read from the first key present

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


# ---------------------------------------------------------------- sources


def read_source(spec: str, *, builtin_count: int, builtin_langs, seed: int, encoding: str):
    """Yields (raw record, location) pairs from a source spec; raw records are dicts or, for
    lines that could not be read, a string saying why."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise UserError(f"Unknown built-in corpus '{name}' in --data: use one of {', '.join(BUILTIN_CORPORA)}.")
        for i, story in enumerate(corpus.sample(builtin_count, seed=seed, langs=tuple(builtin_langs))):
            record = {k: story[k] for k in ("prompt", "story", "lang", "tags", "id")}
            yield dict(record, source=spec), f"{spec}#{i}"
        return
    files = _expand(spec)
    for path in files:
        base = path[:-3] if path.endswith(".gz") else path
        if base.endswith(JSON_SUFFIXES):
            yield from _read_jsonl(path, encoding)
        elif base.endswith(TEXT_SUFFIXES):
            yield from _read_text_file(path, encoding)


def _expand(spec: str) -> list[str]:
    if tf.io.gfile.isdir(spec):
        paths = [f"{root}/{name}" for root, _, names in tf.io.gfile.walk(spec) for name in names]
    else:
        paths = tf.io.gfile.glob(spec)
    readable = sorted(p for p in paths if p.removesuffix(".gz").endswith(JSON_SUFFIXES + TEXT_SUFFIXES))
    if not paths:
        raise UserError(f"No input found at '{spec}': give --data a file, directory or glob, or builtin:fairy_tales.")
    if not readable:
        raise UserError(f"No .jsonl, .json or .txt files (optionally .gz) at '{spec}': check --data.")
    return readable


def _open(path):
    f = tf.io.gfile.GFile(path, "rb")
    return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f


def _read_jsonl(path, encoding):
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            location = f"{path}:{number}"
            try:
                record = json.loads(line.decode(encoding))
            except UnicodeDecodeError:
                yield f"not valid {encoding}", location
                continue
            except json.JSONDecodeError as e:
                if line.strip():
                    yield f"not valid JSON ({e.msg})", location
                continue
            if not isinstance(record, dict):
                yield "a JSON line must be an object", location
                continue
            if "story" not in record and "text" in record:
                record["story"] = record.pop("text")
            # Keys outside the example record (author, url, ...) are not ours to check.
            yield {k: v for k, v in record.items() if k in TEXT_FEATURES + LIST_FEATURES}, location


def _read_text_file(path, encoding):
    with _open(path) as f:
        data = f.read()
    try:
        yield {"story": data.decode(encoding), "source": path}, path
    except UnicodeDecodeError:
        yield f"not valid {encoding}", path


# ---------------------------------------------------------------- the step


def ingest(data: str, output_dir: str, *, seed: int, eval_fraction: float, test_fraction: float,
           num_shards: int, window_bytes: int, max_chars: int, max_bad_fraction: float,
           builtin_count: int, builtin_langs, encoding: str = "utf-8") -> dict:
    """Writes `{split}-NNNNN-of-NNNNN.tfrecord`, `quarantine.jsonl` and returns statistics."""
    start = time.time()
    validator = RecordValidator(load_schema(), max_chars=max_chars)
    quarantine = Quarantine(f"{output_dir}/quarantine.jsonl")
    writers = {}
    counts = {split: {} for split in SPLITS}
    stories = bad = 0
    undecodable = {}
    try:
        for raw, location in read_source(data, builtin_count=builtin_count, builtin_langs=builtin_langs,
                                         seed=seed, encoding=encoding):
            stories += 1
            reason = raw if isinstance(raw, str) else validator.check(raw)
            if reason is None:
                pairs = _pairs_of(raw, window_bytes)
                reason = None if pairs else "too short: needs at least two sentences (a prompt and a continuation)"
            if reason is not None:
                bad += 1
                quarantine.add(reason, location, None if isinstance(raw, str) else raw)
                if reason.startswith("not valid"):
                    undecodable[location.rsplit(":", 1)[0]] = True
                continue
            story_text = normalize_text(raw["story"])
            split = split_of(story_text, eval_fraction, test_fraction)
            lang = raw.get("lang") or detect_lang(story_text)
            shard = int(hashlib.sha256(story_text.encode("utf-8")).hexdigest(), 16) % num_shards
            writer = writers.get((split, shard))
            if writer is None:
                name = f"{output_dir}/{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"
                writer = writers[(split, shard)] = tf.io.TFRecordWriter(name)
            record_id = str(raw.get("id") or location)
            for k, (prompt, story) in enumerate(pairs):
                record = {"prompt": prompt, "story": story, "title": normalize_text(str(raw.get("title") or "")),
                          "lang": lang, "tags": list(raw.get("tags") or []),
                          "source": str(raw.get("source") or location.rsplit(":", 1)[0]),
                          "id": record_id if len(pairs) == 1 else f"{record_id}#w{k}"}
                writer.write(to_example(record).SerializeToString())
                counts[split][lang] = counts[split].get(lang, 0) + 1
    finally:
        for writer in writers.values():
            writer.close()
        quarantine.close()
    if undecodable and bad == stories:
        raise UserError(f"{next(iter(undecodable))} is not {encoding} text: pass --encoding with its encoding (e.g. --encoding=gbk).")
    if stories == 0 or bad == stories:
        raise UserError(f"The corpus at '{data}' has no usable stories ({bad} bad records, see quarantine.jsonl).")
    if bad > max_bad_fraction * stories:
        raise UserError(f"{bad} of {stories} records ({bad / stories:.1%}) are bad, over --max_bad_fraction={max_bad_fraction}: "
                        f"see {output_dir}/quarantine.jsonl.")
    examples = {split: sum(c.values()) for split, c in counts.items()}
    if examples["train"] == 0:
        raise UserError(f"The corpus at '{data}' gave no training examples: add stories or lower --eval_fraction/--test_fraction.")
    return {"stories": stories, "quarantined": bad, "examples": examples, "examples_by_lang": counts,
            "stories_per_second": stories / max(time.time() - start, 1e-9)}


def _pairs_of(raw, window_bytes):
    story = normalize_text(raw["story"])
    prompt = normalize_text(raw.get("prompt") or "")
    return make_pairs(prompt, story, window_bytes)
