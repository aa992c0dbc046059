import glob
import gzip
import json

import pytest
import tensorflow as tf

from components import ingest
from components.common import SPLITS, UserError, detect_lang, iterate_split, normalize_text
from conftest import STORIES, write_jsonl

OPTIONS = dict(seed=1, eval_fraction=0.2, test_fraction=0.2, num_shards=3, window_bytes=1024, max_chars=100_000,
               max_bad_fraction=0.0, builtin_count=0, builtin_langs=["zh", "en"])


def read_all(out):
    return {split: list(iterate_split(out, split)) if glob.glob(f"{out}/{split}-*") else [] for split in SPLITS}


def run_ingest(tmp_path, source, **overrides):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    stats = ingest.ingest(str(source), str(out), **{**OPTIONS, **overrides})
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
    assert reasons[0].startswith("not valid JSON")
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
    ("{tmp}/empty.jsonl", "has no usable stories"),
    ("{tmp}/only.csv", "No .jsonl, .json or .txt files"),
    ("builtin:nope", "Unknown built-in corpus 'nope'"),
])
def test_source_errors(tmp_path, spec, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "only.csv").write_text("a,b")
    with pytest.raises(UserError, match=message):
        run_ingest(tmp_path, spec.format(tmp=tmp_path))


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
    assert set(example.features.feature) == {"prompt", "story", "title", "lang", "tags", "source", "id"}
