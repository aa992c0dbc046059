"""The storygen_fairy_tales tfds builder, and ingesting tfds:NAME sources (never downloading)."""

import glob

import pytest
import tensorflow_datasets as tfds

import components.corpus.tfds_builder  # noqa: F401  (registers storygen_fairy_tales)
from components import corpus, ingest
from components.common import SPLITS, UserError, normalize_text
from components.config import IngestConfig
from components.records import iterate_split

OPTIONS = dict(seed=1, eval_fraction=0.0, test_fraction=0.0, window_bytes=100_000, max_chars=100_000,
               max_bad_fraction=0.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_dir in which tfds.load prepared storygen_fairy_tales, and its test split."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    test = list(tfds.as_numpy(tfds.load("storygen_fairy_tales", split="test", data_dir=data_dir)))
    return data_dir, test


def run_ingest(tmp_path, spec, **overrides):
    out = tmp_path / "out"
    out.mkdir()
    stats = ingest.ingest(IngestConfig(data=spec, **{**OPTIONS, **overrides}), str(out))
    records = [r for split in SPLITS if glob.glob(f"{out}/{split}-*") for r in iterate_split(str(out), split)]
    return stats, records


def test_builder_generates_the_builtin_corpus_offline(prepared):
    _, test = prepared
    expected = corpus.sample(200, seed=2)  # the default config: 200 test stories, seed 1 + 1
    assert sorted((t["prompt"].decode(), t["story"].decode(), t["lang"].decode(), [v.decode() for v in t["tags"]])
                  for t in test) == sorted((s["prompt"], s["story"], s["lang"], s["tags"]) for s in expected)
    log_probs = {s["story"]: s["log_prob"] for s in expected}
    assert all(t["log_prob"] == pytest.approx(log_probs[t["story"].decode()]) for t in test)


def test_a_prepared_dataset_ingests(prepared, tmp_path):
    data_dir, _ = prepared
    stats, records = run_ingest(tmp_path, "tfds:storygen_fairy_tales:train", tfds_data_dir=data_dir)
    assert stats["stories"] == 2000 and stats["quarantined"] == 0 and stats["examples"]["train"] == 2000
    expected = corpus.sample(2000, seed=1)
    assert sorted((r["prompt"], r["story"], r["lang"], r["tags"]) for r in records) == sorted(
        (normalize_text(s["prompt"]), normalize_text(s["story"]), s["lang"], s["tags"]) for s in expected)
    assert sorted(r["id"] for r in records) == sorted(f"tfds:storygen_fairy_tales:train#{i}" for i in range(2000))
    assert {r["source"] for r in records} == {"tfds:storygen_fairy_tales:train"}


def test_config_split_and_tfds_text_key(prepared, tmp_path):
    data_dir, _ = prepared
    # --text_key names a column of the user's files; --tfds_text_key the feature of the dataset.
    stats, records = run_ingest(tmp_path, "tfds:storygen_fairy_tales/small:test", tfds_data_dir=data_dir,
                                text_key="body", tfds_text_key="story")
    assert stats["stories"] == 200 and stats["quarantined"] == 0 and len(records) == 200


@pytest.mark.parametrize("name", ["storygen_fairy_tales", "no_such_dataset"])
def test_an_unprepared_dataset_says_how_to_prepare_it(tmp_path, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=(
            rf"^The tfds dataset '{name}' is not prepared in {empty}: ingest never downloads, so it must be prepared "
            rf"beforehand, e.g. with `tfds build {name} --data_dir={empty}` on a machine with internet")):
        run_ingest(tmp_path, f"tfds:{name}:train", tfds_data_dir=str(empty))
    assert not glob.glob(f"{empty}/*/*")  # nothing was fetched or prepared


def test_an_unknown_split_names_the_splits(prepared, tmp_path):
    data_dir, _ = prepared
    with pytest.raises(UserError, match=r"has no split 'validation': use one of test, train\.$"):
        run_ingest(tmp_path, "tfds:storygen_fairy_tales:validation", tfds_data_dir=data_dir)


def test_beam_ingests_a_tfds_split_as_in_process(prepared, tmp_path):
    data_dir, _ = prepared
    (tmp_path / "beam").mkdir()
    stats, records = run_ingest(tmp_path, "tfds:storygen_fairy_tales/small:test", tfds_data_dir=data_dir)
    beam_stats, beam_records = run_ingest(tmp_path / "beam", "tfds:storygen_fairy_tales/small:test",
                                          tfds_data_dir=data_dir, beam_pipeline_args="--runner=DirectRunner")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(beam_records, key=key) == sorted(records, key=key) and len(records) == 200
    timings = ("seconds", "stories_per_second")
    assert {k: v for k, v in beam_stats.items() if k not in timings} == {k: v for k, v in stats.items() if k not in timings}
