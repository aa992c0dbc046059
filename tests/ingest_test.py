import csv
import glob
import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from components import ingest, progress, sources
from components.common import SPLITS, UserError, detect_lang, normalize_text
from components.config import IngestConfig
from components.records import iterate_split
from conftest import REPO, STORIES, write_jsonl

OPTIONS = dict(seed=1, eval_fraction=0.2, test_fraction=0.2, num_shards=3, max_chars=100_000, max_bad_fraction=0.0)


def read_all(out):
    return {split: list(iterate_split(out, split)) if glob.glob(f"{out}/{split}-*") else [] for split in SPLITS}


def run_ingest(tmp_path, source, **overrides):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    stats = ingest.ingest(IngestConfig(data=str(source), **{**OPTIONS, **overrides}), str(out))
    return stats, read_all(str(out))


def many_stories(n=60):
    return [dict(s, story=s["story"] + f" ({i})") for i in range(n // len(STORIES)) for s in STORIES]


def test_split_sentences_keeps_text_and_punctuation():
    text = "从前有座山。山里有座庙！“你好？”他说。Once upon a time. The end"
    sentences = ingest.split_sentences(text)
    assert "".join(sentences) == text
    assert sentences == ["从前有座山。", "山里有座庙！", "“你好？”", "他说。", "Once upon a time. ", "The end"]


def test_make_pairs_derives_prompt_and_windows():
    story = "First one. " + " ".join(f"Sentence number {i} is here." for i in range(30))
    pairs = ingest.make_pairs("", story, window_bytes=200)
    # The first sentence is short, so the opening is two sentences.
    assert pairs[0][0] == "First one. Sentence number 0 is here."
    assert all(len(s.encode()) <= 200 for _, s in pairs)
    assert " ".join(s for _, s in pairs) == story[len(pairs[0][0]) + 1:]
    # Each later window is prompted by the end of the text before it.
    for (_, before), (prompt, _) in zip(pairs, pairs[1:]):
        assert before.endswith(prompt)


def test_make_pairs_keeps_a_given_prompt():
    assert ingest.make_pairs("从前有座山，", "山里有座庙。庙里有个和尚。", 1024) == [("从前有座山，", "山里有座庙。庙里有个和尚。")]


def test_split_is_deterministic_disjoint_and_independent_of_shards(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", many_stories(200))
    stats, splits = run_ingest(tmp_path, source)
    (tmp_path / "again").mkdir()
    _, again = run_ingest(tmp_path / "again", source, num_shards=1)
    ids = {split: sorted(r["id"] for r in records) for split, records in splits.items()}
    assert ids == {split: sorted(r["id"] for r in records) for split, records in again.items()}
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["train"]) & set(ids["eval"])
    assert sum(len(v) for v in ids.values()) == 200
    assert all(len(v) > 10 for v in ids.values())  # 60/20/20 of 200, give or take the hash
    assert stats["examples"] == {split: len(v) for split, v in ids.items()}


def test_duplicates_never_straddle_splits():
    story = "Once upon a time there was a fox.  The fox was clever."
    variants = [story, story.upper(), story.replace("  ", " "), "  " + story]
    assert len({ingest.split_of(normalize_text(v), 0.3, 0.3) for v in variants}) == 1


def test_records_are_normalised_and_languages_detected(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"text": "从前有座山，\n\n山里有座庙。庙里有个老和尚。"},
                                                {"story": "Once upon a time.   A fox lived here.", "tags": ["fable"],
                                                 "author": "ignored"}])
    stats, splits = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0)
    records = {r["lang"]: r for r in splits["train"]}
    # The blank line folds to one space; full-width punctuation stays.
    assert records["zh"]["prompt"] == "从前有座山， 山里有座庙。"
    assert records["zh"]["story"] == "庙里有个老和尚。"
    assert records["en"] == dict(records["en"], prompt="Once upon a time.", story="A fox lived here.", tags=["fable"])
    assert records["en"]["source"].endswith("s.jsonl") and records["en"]["id"].endswith("s.jsonl:2")
    assert stats["examples_by_lang"]["train"] == {"zh": 1, "en": 1}


def test_text_files_and_gzip(tmp_path):
    folder = tmp_path / "stories"
    folder.mkdir()
    (folder / "a.txt").write_text(STORIES[0]["story"], encoding="utf-8")
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(STORIES[2]["story"])
    with gzip.open(folder / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"story": STORIES[3]["story"]}) + "\n")
    (folder / "ignored.csv").write_text("not read")
    stats, splits = run_ingest(tmp_path, folder, eval_fraction=0.0, test_fraction=0.0)
    assert stats["stories"] == 3
    assert sorted(r["lang"] for r in splits["train"]) == ["en", "en", "zh"]


def test_bad_records_are_quarantined_with_reason_and_location(tmp_path):
    lines = [json.dumps({"story": s["story"]}, ensure_ascii=False) for s in many_stories(40)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"story": ""})
    lines[9] = json.dumps({"story": 42})
    lines[11] = json.dumps({"story": "Bad\x07bell. Two sentences."})
    lines[13] = json.dumps({"story": "One sentence only"})
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats, _ = run_ingest(tmp_path, path, max_bad_fraction=0.5)
    assert stats["quarantined"] == 5 and stats["stories"] == 40
    with open(tmp_path / "out" / "quarantine.jsonl", encoding="utf-8") as f:
        bad = [json.loads(line) for line in f]
    assert [b["location"].rsplit(":", 1)[1] for b in bad] == ["4", "8", "10", "12", "14"]
    reasons = [b["reason"] for b in bad]
    assert reasons[0] == "not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert reasons[1] == "required field 'story' is empty"
    assert reasons[2] == "field 'story' must be a string, not int"
    assert reasons[3] == "field 'story' contains control characters"
    assert reasons[4].startswith("too short")


def test_too_many_bad_records_stop_with_one_sentence(tmp_path):
    lines = [json.dumps({"story": s["story"]}, ensure_ascii=False) for s in many_stories(20)] + ["{bad"] * 2
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=r"2 of 22 records .* over --max_bad_fraction=0.01"):
        run_ingest(tmp_path, path, max_bad_fraction=0.01)


def test_non_utf8_file_names_the_encoding_flag(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps({"story": STORIES[0]["story"]}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(UserError, match="gbk.jsonl is not utf-8 text: pass --encoding"):
        run_ingest(tmp_path, path)
    stats, _ = run_ingest(tmp_path, path, encoding="gbk", eval_fraction=0.0, test_fraction=0.0)
    assert stats["examples"]["train"] == 1


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.jsonl", "No input found at"),
    ("{tmp}/empty.jsonl", r"has no usable stories \(it holds no records\)"),
    ("{tmp}/only.parquet", "No .jsonl, .json, .csv, .tsv, .txt, .tfrecord, .tfrecords files"),
    ("builtin:nope", "Unknown built-in corpus 'nope'"),
])
def test_source_errors(tmp_path, spec, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "only.parquet").write_text("a,b")
    with pytest.raises(UserError, match=message):
        run_ingest(tmp_path, spec.format(tmp=tmp_path))


def test_a_txt_file_read_as_one_story_names_text_separator_whichever_split_it_lands_in(tmp_path):
    path = tmp_path / "tales.txt"
    path.write_text("\n\n".join(s["story"] for s in many_stories(20)), encoding="utf-8")
    messages = []
    for fractions in [(0.05, 0.05), (0.45, 0.45)]:  # the story lands in train, then in another split
        with pytest.raises(UserError) as error:
            run_ingest(tmp_path, path, eval_fraction=fractions[0], test_fraction=fractions[1])
        messages.append(str(error.value))
    for message, empty in zip(messages, ["eval or test", "train or "]):
        assert message.startswith(f"The corpus at '{path}' gave no {empty}")
        assert ("examples: its 1 story goes to the splits whole; give --text_separator to split each .txt file into "
                "stories (without it a file is one), or add stories") in message
    stats, _ = run_ingest(tmp_path, path, text_separator="\\n\\n")
    assert stats["stories"] == 20


def test_a_csv_without_the_story_column_says_which_column_is_missing(tmp_path):
    path = tmp_path / "tales.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("title", "body")] + [(s["title"], s["story"]) for s in STORIES])
    with pytest.raises(UserError, match=r"has no usable stories \(4 bad records, most often 4× missing required "
                                        r"field 'story' \(no 'story' or 'text' key: see --text_key\)\): see "):
        run_ingest(tmp_path, path)


def test_progress_lines_and_the_summary_name_what_was_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)  # a progress line for every record
    source = write_jsonl(tmp_path / "s.jsonl", many_stories(20))
    stats, _ = run_ingest(tmp_path, source)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[ingest]")]
    assert [line.split(",")[0] for line in lines] == [f"[ingest] {n} records read" for n in range(1, 21)]
    assert all(re.search(r", [\d,]+ records/s, [\d.]+ MB/s of stories$", line) for line in lines)
    assert ingest.describe(stats).startswith(f"{source}: 20 stories -> ")


def test_an_unknown_encoding_is_one_sentence(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", STORIES)
    with pytest.raises(UserError, match="Unknown --encoding 'gbkk': use a Python codec name"):
        run_ingest(tmp_path, source, encoding="gbkk")


def test_detect_lang():
    assert detect_lang("从前有座山，山里有座庙。") == "zh"
    assert detect_lang("Once upon a time.") == "en"
    assert detect_lang("12345 !!!") == "other"


def test_examples_are_tf_examples(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", STORIES)
    run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0, num_shards=1)
    [path] = glob.glob(str(tmp_path / "out" / "train-*.tfrecord"))
    assert path.endswith("train-00000-of-00001.tfrecord")
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(path))).numpy())
    assert set(example.features.feature) == {"prompt", "story", "title", "lang", "tags", "source", "id", "ends_story"}


# ---------------------------------------------------------------- sources


def by_id(records):
    return sorted(records, key=lambda r: r["id"])


def read_quarantine(tmp_path):
    with open(tmp_path / "out" / "quarantine.jsonl", encoding="utf-8") as f:
        return [(b["reason"], b["location"]) for b in map(json.loads, f)]


def test_jsonl_keys_are_configurable(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [
        {"body": "A fox lived here. It was clever.", "headline": "Fox", "language": "en", "labels": "fable, short",
         "opening": "Once upon a time,"},
        {"body": "从前有座山。山里有座庙。", "labels": ["zh"], "story": "not read: --text_key names the story"},
        {"story": "No body here. Only a story."},
    ])
    keys = dict(text_key="body", prompt_key="opening", title_key="headline", lang_key="language", tags_key="labels")
    stats, splits = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5, **keys)
    assert by_id(splits["train"]) == [
        {"prompt": "Once upon a time,", "story": "A fox lived here. It was clever.", "title": "Fox", "lang": "en",
         "tags": ["fable", "short"], "source": source, "id": f"{source}:1", "ends_story": 1},
        {"prompt": "从前有座山。", "story": "山里有座庙。", "title": "", "lang": "zh", "tags": ["zh"], "source": source,
         "id": f"{source}:2", "ends_story": 1},
    ]
    assert read_quarantine(tmp_path) == [("missing required field 'story' (no 'body' key: see --text_key)", f"{source}:3")]


def test_jsonl_story_key_defaults_to_story_then_text(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"story": "A fox ran. It hid.", "text": "Not this one. No."},
                                                {"text": "A hen sat. She slept."}, {"body": "Nothing to read. At all."}])
    stats, splits = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5)
    assert [(r["prompt"], r["story"]) for r in by_id(splits["train"])] == [("A fox ran.", "It hid."),
                                                                           ("A hen sat.", "She slept.")]
    assert read_quarantine(tmp_path) == [("missing required field 'story' (no 'story' or 'text' key: see --text_key)",
                                          f"{source}:3")]


def test_csv_and_tsv(tmp_path):
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a.csv").write_bytes(
        b'story,title,tags,lang\n'
        b'"Once upon a time, a fox said ""hi"".\nIt ran away. The end.",The Fox,"fable, fox",en\n'
        + "从前有座山。山里有座庙。,山,,\n".encode()
        + b'only,two\n'
        b'"",Empty,,\n'
        b'Caf\xe9 stories are not UTF-8. Two of them.,Latin-1,,\n')
    (folder / "b.tsv").write_text("text\tlang\nA hen found a seed. She planted it.\ten\n", encoding="utf-8")
    stats, splits = run_ingest(tmp_path, folder, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5)
    csv_path, tsv_path = f"{folder}/a.csv", f"{folder}/b.tsv"
    assert by_id(splits["train"]) == [
        {"prompt": 'Once upon a time, a fox said "hi".', "story": "It ran away. The end.", "title": "The Fox",
         "lang": "en", "tags": ["fable", "fox"], "source": csv_path, "id": f"{csv_path}:2", "ends_story": 1},
        {"prompt": "从前有座山。", "story": "山里有座庙。", "title": "山", "lang": "zh", "tags": [], "source": csv_path,
         "id": f"{csv_path}:4", "ends_story": 1},
        {"prompt": "A hen found a seed.", "story": "She planted it.", "title": "", "lang": "en", "tags": [],
         "source": tsv_path, "id": f"{tsv_path}:2", "ends_story": 1},
    ]
    assert read_quarantine(tmp_path) == [
        ("a row with 2 fields under a header of 4", f"{csv_path}:5"),
        ("required field 'story' is empty", f"{csv_path}:6"),
        ("not valid utf-8 text", f"{csv_path}:7"),
    ]


def test_text_files_split_by_a_separator(tmp_path):
    path = tmp_path / "many.txt"
    path.write_bytes(b"Once upon a time there was a fox. The fox was clever.\n\n\nCaf\xe9 au lait. Latin-1.\n\n  \n\n"
                     + "Too short\n\n从前有座山。山里有座庙。\n\n".encode())
    # The separator as typed on a command line: --text_separator='\n\n'.
    stats, splits = run_ingest(tmp_path, path, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5,
                               text_separator="\\n\\n")
    assert [(r["id"], r["prompt"], r["story"]) for r in by_id(splits["train"])] == [
        (f"{path}#0", "Once upon a time there was a fox.", "The fox was clever."),
        (f"{path}#3", "从前有座山。", "山里有座庙。"),
    ]
    assert read_quarantine(tmp_path) == [("not valid utf-8 text", f"{path}:4"),
                                         ("too short: needs at least two sentences (a prompt and a continuation)",
                                          f"{path}:8")]
    # Several stories may start on one line; a bad one is located by its line.
    gz = tmp_path / "gpt.txt.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"A fox ran. It hid.<|endoftext|>A hen sat.\nShe slept.<|endoftext|>Caf\xe9. Latin-1.<|endoftext|>")
    (tmp_path / "again").mkdir()
    stats, splits = run_ingest(tmp_path / "again", gz, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5,
                               text_separator="<|endoftext|>")
    assert [(r["id"], r["story"]) for r in by_id(splits["train"])] == [(f"{gz}#0", "It hid."),
                                                                         (f"{gz}#1", "She slept.")]
    assert read_quarantine(tmp_path / "again") == [("not valid utf-8 text", f"{gz}:2")]


def make_example(**features):
    """A serialised tf.train.Example: str/bytes values become bytes features, ints int64 features."""
    def feature(values):
        values = values if isinstance(values, list) else [values]
        if all(isinstance(v, int) for v in values):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else v
                                                                     for v in values]))
    return tf.train.Example(features=tf.train.Features(
        feature={k: feature(v) for k, v in features.items()})).SerializeToString()


def write_tfrecord(path, records, compression=None):
    with tf.io.TFRecordWriter(str(path), options=compression) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_tfrecord_examples(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    plain = write_tfrecord(folder / "a.tfrecord", [
        make_example(story="Once upon a time there was a fox. The fox was clever.", title="Fox", tags=["fable", "fox"]),
        make_example(story=5),
        make_example(story=b"\xff\xfe is not UTF-8. Really not."),
        b"not a tf.train.Example",
        make_example(text="从前有座山。山里有座庙。", lang="zh"),
        make_example(story=["Two values. Here.", "One too many. Yes."]),
    ])
    packed = write_tfrecord(folder / "b.tfrecords.gz", [make_example(story="A hen sat. She slept.")], "GZIP")
    stats, splits = run_ingest(tmp_path, folder, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.6)
    assert by_id(splits["train"]) == [
        {"prompt": "Once upon a time there was a fox.", "story": "The fox was clever.", "title": "Fox", "lang": "en",
         "tags": ["fable", "fox"], "source": plain, "id": f"{plain}#0", "ends_story": 1},
        {"prompt": "从前有座山。", "story": "山里有座庙。", "title": "", "lang": "zh", "tags": [], "source": plain,
         "id": f"{plain}#4", "ends_story": 1},
        {"prompt": "A hen sat.", "story": "She slept.", "title": "", "lang": "en", "tags": [], "source": packed,
         "id": f"{packed}#0", "ends_story": 1},
    ]
    assert read_quarantine(tmp_path) == [
        ("field 'story' must be a string, not int", f"{plain}#1"),
        ("not valid utf-8 text", f"{plain}#2"),
        ("not a tf.train.Example", f"{plain}#3"),
        ("field 'story' has 2 values, at most 1 allowed", f"{plain}#5"),
    ]


def test_every_malformed_record_is_quarantined_with_its_reason(tmp_path):
    good = [json.dumps({"story": s["story"]}, ensure_ascii=False).encode() for s in many_stories(20)]
    bad = [
        b'{"story": "Caf\xe9 is Latin-1. Not UTF-8."}',
        json.dumps({"story": "x" * 1001 + ". Two."}).encode(),
        json.dumps({"story": "A lone \udc80 surrogate. Here."}).encode(),
        json.dumps({"story": "Tags. Must be strings.", "tags": [1]}).encode(),
        json.dumps({"title": "No story"}).encode(),
        json.dumps({"story": "   \n  "}).encode(),
        b"[1, 2]",
        b'{"story": "A tab\x01 inside. Two."}',
    ]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join(good[:10] + bad + good[10:]) + b"\n")
    stats, _ = run_ingest(tmp_path, path, max_chars=1000, max_bad_fraction=0.3)
    assert read_quarantine(tmp_path) == [
        ("not valid utf-8 text", f"{path}:11"),
        ("field 'story' is longer than 1000 characters", f"{path}:12"),
        ("field 'story' is not valid Unicode (it has a lone surrogate)", f"{path}:13"),
        ("field 'tags' must be a string, not int", f"{path}:14"),
        ("missing required field 'story' (no 'story' or 'text' key: see --text_key)", f"{path}:15"),
        ("too short: needs at least two sentences (a prompt and a continuation)", f"{path}:16"),
        ("a JSON line must be an object", f"{path}:17"),
        ("not valid JSON (Invalid control character at column 17)", f"{path}:18"),
    ]
    assert stats["stories"] == 28 and stats["quarantined"] == 8


def test_a_partly_non_utf8_file_names_the_file_and_the_encoding_flag(tmp_path):
    english = [{"story": s["story"]} for s in many_stories(20) if detect_lang(s["story"]) == "en"]
    chinese = [{"story": s["story"]} for s in many_stories(20) if detect_lang(s["story"]) == "zh"]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode("gbk") + b"\n" for r in english + chinese))
    with pytest.raises(UserError, match=r"mixed.jsonl is not utf-8 text: pass --encoding with its encoding "
                                        r"\(e.g. --encoding=gbk\); 10 of 20 records are bad"):
        run_ingest(tmp_path, path, max_bad_fraction=0.01)
    # Under --max_bad_fraction the bad lines are only quarantined; with the right encoding none is.
    stats, _ = run_ingest(tmp_path, path, max_bad_fraction=0.5)
    assert stats["quarantine_reasons"] == {"not valid utf-8 text": 10}
    stats, _ = run_ingest(tmp_path, path, encoding="gbk")
    assert stats["quarantined"] == 0 and sum(stats["examples"].values()) == 20


def test_gfile_paths_and_globs(tmp_path):
    # TensorFlow's in-memory filesystem stands for any tf.io.gfile one (gs://, hdfs://, ...).
    folder = f"ram://{tmp_path.name}"
    tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(f"{folder}/a.jsonl", "w") as f:
        f.write(json.dumps({"story": "A fox ran. It hid."}) + "\n")
    with tf.io.gfile.GFile(f"{folder}/b.csv.gz", "wb") as f:
        f.write(gzip.compress(b"text\nA hen sat. She slept.\n"))
    _, splits = run_ingest(tmp_path, folder, eval_fraction=0.0, test_fraction=0.0)
    assert [(r["id"], r["story"]) for r in by_id(splits["train"])] == [(f"{folder}/a.jsonl:1", "It hid."),
                                                                         (f"{folder}/b.csv.gz:2", "She slept.")]
    (tmp_path / "again").mkdir()
    _, splits = run_ingest(tmp_path / "again", f"{folder}/*.csv*", eval_fraction=0.0, test_fraction=0.0)
    assert [r["id"] for r in splits["train"]] == [f"{folder}/b.csv.gz:2"]


def mixed_folder(tmp_path):
    """Files of every type, some with bad records; the JSONL files are longer than a read-ahead queue."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    stories = many_stories(1200)
    for k in range(3):
        write_jsonl(folder / f"part-{k}.jsonl", stories[k::3] + [{"story": ""}])
    with open(folder / "table.csv", "w", encoding="utf-8", newline="") as f:
        f.write("title,text\n" + "".join(f'"{s["title"]}","{s["story"]} [csv]"\n' for s in stories[:50]))
    (folder / "one.txt").write_text(STORIES[2]["story"] + " [txt]", encoding="utf-8")
    write_tfrecord(folder / "records.tfrecord", [make_example(story=s["story"] + " [tfrecord]") for s in stories[:40]])
    return folder


def test_parallel_and_serial_reading_in_two_processes_write_identical_shards(tmp_path):
    folder = mixed_folder(tmp_path)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    serial.mkdir()
    parallel.mkdir()
    options = dict(OPTIONS, max_bad_fraction=0.01)
    # The serial run is in another process, as protobuf could order an Example's features by a per-process hash.
    code = (f"from components import ingest; from components.config import IngestConfig; "
            f"ingest.ingest(IngestConfig(data={str(folder)!r}, num_parallel_reads=1, **{options!r}), {str(serial)!r})")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)
    stats = ingest.ingest(IngestConfig(data=str(folder), num_parallel_reads=4, **options), str(parallel))
    assert stats["stories"] == 1200 + 3 + 50 + 1 + 40 and stats["quarantined"] == 3
    outputs = [{p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("logs", "statistics.json")}
               for out in (serial, parallel)]
    assert len([name for name in outputs[0] if name.endswith(".tfrecord")]) == 9
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("parallelism", [1, 4])
def test_an_unreadable_file_stops_with_one_sentence(tmp_path, parallelism):
    folder = mixed_folder(tmp_path)
    data = gzip.compress(b'{"story": "A fox ran. It hid."}\n' * 100)
    (folder / "part-1.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"Cannot read .*part-1.jsonl.gz \(.*\): repair the file or leave it out"):
        run_ingest(tmp_path, folder, max_bad_fraction=0.01, num_parallel_reads=parallelism)


ANDERSEN = os.path.join(REPO, "..", "shared", "corpora", "andersen_en.jsonl")


def test_andersen_fairy_tales_ingest_with_nothing_quarantined(tmp_path):
    if not os.path.exists(ANDERSEN):
        pytest.skip("../shared/corpora/andersen_en.jsonl is not beside this checkout")
    stats, splits = run_ingest(tmp_path, ANDERSEN, max_chars=1_000_000, eval_fraction=0.05, test_fraction=0.05)
    assert stats["stories"] == 156 and stats["quarantined"] == 0
    assert sum(sum(by_lang.values()) for by_lang in stats["stories_by_lang"].values()) == 156
    assert {lang for by_lang in stats["stories_by_lang"].values() for lang in by_lang} == {"en"}
    first = [r for r in splits["train"] + splits["eval"] + splits["test"] if r["id"] == f"{ANDERSEN}:1#w0"]
    assert first[0]["title"] == "The tinder-box" and first[0]["prompt"].startswith("A soldier came marching along")
    assert stats["length_histograms"]["story_chars"]["100000+"] == 1  # the longest tale, 101,295 characters


def test_statistics_json_and_tensorboard_summary(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [{"story": "Once upon a time. A fox lived here."},
                                                {"story": "从前有座山，山里有座庙。庙里有个老和尚。"}, {"story": ""}])
    stats, _ = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0, max_bad_fraction=0.5)
    with open(tmp_path / "out" / "statistics.json", encoding="utf-8") as f:
        assert json.load(f) == stats
    text = "Once upon a time." + "A fox lived here." + "从前有座山，山里有座庙。" + "庙里有个老和尚。"
    lengths = {"0-99": 2, **{label: 0 for label in ["100-199", "200-499", "500-999", "1000-1999", "2000-4999",
                                                    "5000-9999", "10000-19999", "20000-49999", "50000-99999", "100000+"]}}
    assert {k: v for k, v in stats.items() if k not in ("seconds", "stories_per_second")} == {
        "source": str(source), "stories": 3, "quarantined": 1, "quarantine_reasons": {"required field 'story' is empty": 1},
        "examples": {"train": 2, "eval": 0, "test": 0},
        "stories_by_lang": {"train": {"en": 1, "zh": 1}, "eval": {}, "test": {}},
        "examples_by_lang": {"train": {"en": 1, "zh": 1}, "eval": {}, "test": {}},
        "length_histograms": {"story_chars": lengths, "prompt_chars": lengths, "example_chars": lengths},
        "characters": {"total": len(text), "distinct": len(set(text)), "top_1000_share": 1.0, "top_3000_share": 1.0},
    }
    assert stats["stories_per_second"] > 0
    [events] = glob.glob(str(tmp_path / "out" / "logs" / "events.out.tfevents.*"))
    values = {v.tag: tf.make_ndarray(v.tensor)
              for event in tf.compat.v1.train.summary_iterator(events) for v in event.summary.value}
    assert values["ingest/stories"] == 3 and values["ingest/quarantined"] == 1 and values["ingest/examples_train"] == 2
    assert "| train | zh | 1 | 1 |" in values["ingest/summary"].item().decode()


def test_character_coverage_counts_the_most_frequent_characters(tmp_path):
    # 1,500 distinct characters: the first 1,000 appear twice (a story says each sentence twice), the rest once.
    chars = [chr(0x4E00 + i) for i in range(1500)]
    twice = ["".join(chars[i:i + 50]) + "。" + "".join(chars[i:i + 50]) + "。" for i in range(0, 1000, 50)]
    once = ["".join(chars[i:i + 25]) + "。" + "".join(chars[i + 25:i + 50]) + "。" for i in range(1000, 1500, 50)]
    source = write_jsonl(tmp_path / "s.jsonl", [{"story": story} for story in twice + once])
    stats, _ = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0)
    total = 1000 * 2 + 500 + 30 * 2  # and two 。 in each of the 30 stories
    assert stats["characters"]["total"] == total and stats["characters"]["distinct"] == 1501
    # The most frequent: 。 (60 times), then 999 of the characters seen twice.
    assert stats["characters"]["top_1000_share"] == pytest.approx((60 + 999 * 2) / total)
    assert stats["characters"]["top_3000_share"] == 1.0


def test_windows_know_whether_they_end_their_story(tmp_path):
    story = "First one. " + " ".join(f"Sentence number {i} is here." for i in range(60))
    source = write_jsonl(tmp_path / "long.jsonl", [{"story": story}])
    _, splits = run_ingest(tmp_path, source, eval_fraction=0.0, test_fraction=0.0, window_bytes=300)
    windows = sorted(splits["train"], key=lambda r: int(r["id"].rsplit("#w", 1)[1]))
    assert len(windows) > 3
    assert [w["ends_story"] for w in windows] == [0] * (len(windows) - 1) + [1]


# ---------------------------------------------------------------- on Apache Beam


def ingested(out):
    """What an ingest run wrote, free of how it is sharded: each split's records (sorted), the
    quarantine file's lines and the statistics without timings."""
    splits = {split: sorted(json.dumps(r, sort_keys=True) for r in records) for split, records in read_all(out).items()}
    quarantine = (out / "quarantine.jsonl").read_text(encoding="utf-8") if (out / "quarantine.jsonl").exists() else ""
    with open(out / "statistics.json", encoding="utf-8") as f:
        stats = {k: v for k, v in json.load(f).items() if k not in ("seconds", "stories_per_second")}
    return splits, quarantine.splitlines(), stats


def in_process_and_on_beam(tmp_path, source, beam_args="--runner=DirectRunner", **overrides):
    """ingested() of an in-process run and of a Beam run on the same source and options."""
    outputs = []
    for name, args in (("in_process", None), ("beam", beam_args)):
        out = tmp_path / name
        out.mkdir()
        ingest.ingest(IngestConfig(data=str(source), beam_pipeline_args=args, **{**OPTIONS, **overrides}), str(out))
        outputs.append(ingested(out))
    return outputs


def test_beam_writes_the_in_process_examples_quarantine_and_statistics_for_every_source_kind(tmp_path, monkeypatch):
    folder = mixed_folder(tmp_path)  # JSONL (with bad lines), CSV, TXT and TFRecord files
    with gzip.open(folder / "packed.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"story": "A hen sat. She slept."}\n[1, 2]\n')
    # JSONL pieces of ~4 kB: each part-k.jsonl (~40 kB) is read in ten pieces.
    monkeypatch.setattr(sources, "MIN_PIECE_BYTES", 4096)
    monkeypatch.setattr(sources, "PIECES", 100)
    assert len(sources.parts(str(folder), IngestConfig(data=str(folder)))) > 30
    in_process, beam = in_process_and_on_beam(tmp_path, folder, max_bad_fraction=0.01)
    splits, quarantine, stats = beam
    assert stats["stories"] == 1200 + 3 + 50 + 1 + 40 + 2 and stats["quarantined"] == 4
    assert len(quarantine) == 4 and all(len(records) > 100 for records in splits.values())
    assert beam == in_process  # the quarantine in the same order, with the same file:line


def test_beam_ingests_the_builtin_corpus_as_in_process(tmp_path):
    in_process, beam = in_process_and_on_beam(tmp_path, "builtin:fairy_tales", builtin_count=200)
    assert beam == in_process and beam[2]["stories"] == 200


@pytest.mark.slow
def test_beam_on_two_worker_processes_writes_the_in_process_output(tmp_path, monkeypatch):
    folder = mixed_folder(tmp_path)
    monkeypatch.setattr(sources, "MIN_PIECE_BYTES", 16384)
    in_process, beam = in_process_and_on_beam(
        tmp_path, folder, "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing",
        max_bad_fraction=0.01)
    assert beam == in_process and beam[2]["quarantined"] == 3
    shards = sorted(p.name for p in (tmp_path / "beam").glob("train-*.tfrecord"))  # one per JSONL piece and file
    assert len(shards) > 6 and shards == [f"train-{k:05d}-of-{len(shards):05d}.tfrecord" for k in range(len(shards))]


def test_pieces_of_a_jsonl_file_read_its_lines_once_each(tmp_path, monkeypatch):
    lines = [json.dumps({"story": f"Story {i}. " + "Word. " * (i % 7)}) for i in range(200)]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # the last line without its newline
    monkeypatch.setattr(sources, "MIN_PIECE_BYTES", 100)
    config = IngestConfig(data=str(path))
    pieces = sources.parts(str(path), config)
    assert sources.PIECES - 4 <= len(pieces) <= sources.PIECES and pieces[0].start == 0 and pieces[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    read = [(record, str(location)) for piece in pieces for record, location in sources.read_part(piece, config)]
    assert read == [(record, str(location)) for record, location in sources.read_source(str(path), config)]
    assert [location for _, location in read] == [f"{path}:{n}" for n in range(1, 201)]
    # Lines longer than a piece: each piece still starts at a line.
    long_lines = [json.dumps({"story": f"Story {i}. " + "Word. " * 100}) for i in range(20)]
    path.write_text("\n".join(long_lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(sources, "PIECES", 1000)  # pieces of 100 bytes, lines of 600
    pieces = sources.parts(str(path), config)
    assert [piece.first_line for piece in pieces] == list(range(1, 21))


def test_beam_stops_at_an_unreadable_file_with_the_in_process_sentence(tmp_path):
    folder = mixed_folder(tmp_path)
    data = gzip.compress(b'{"story": "A fox ran. It hid."}\n' * 100)
    (folder / "part-1.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"Cannot read .*part-1.jsonl.gz \(.*\): repair the file or leave it out"):
        run_ingest(tmp_path, folder, max_bad_fraction=0.01, beam_pipeline_args="--runner=DirectRunner")


def test_beam_pipeline_args_without_beam_installed_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam raises ImportError
    with pytest.raises(UserError, match=re.escape("--beam_pipeline_args needs Apache Beam: pip install "
                                                  "'storygen[beam]'.")):
        run_ingest(tmp_path, "builtin:fairy_tales", beam_pipeline_args="--runner=DirectRunner")
