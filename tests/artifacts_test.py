import dataclasses
import json
import os

import pytest

from components.config import flag_field
from pipeline.artifacts import PipelineRun, fingerprint


@dataclasses.dataclass(frozen=True)
class MakeConfig:
    """A step config: `n` changes the output, `threads` does not (left out of the cache key)."""

    n: int = 1
    threads: int = flag_field(1, "Threads.", cached=False)


@dataclasses.dataclass(frozen=True)
class OtherConfig:
    size: int = 8


def write(out, name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
    return {"chars": len(text)}


def test_step_writes_manifest_and_renames_into_place(tmp_path, capsys):
    source = tmp_path / "data.txt"
    source.write_text("stories")
    run = PipelineRun(str(tmp_path / "runs"), "r1")
    manifest = run.step("make", lambda out: write(out, "a.txt", "hello"), inputs={"data": str(source)},
                        parameters=MakeConfig(), describe=lambda m: f"{m['chars']} chars")
    folder = tmp_path / "runs" / "r1" / "make"
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["outputs"] == {"path": str(folder), "files": ["a.txt"], "fingerprint": fingerprint(str(folder))}
    assert manifest["inputs"]["data"] == {"path": str(source), "fingerprint": manifest["inputs"]["data"]["fingerprint"]}
    assert manifest["parameters"] == {"MakeConfig": {"n": 1}} and manifest["metrics"] == {"chars": 5}
    assert manifest["library_versions"]["tensorflow"].startswith("2.")
    assert manifest["wall_time_seconds"] >= 0 and manifest["reused_from"] is None
    assert not (tmp_path / "runs" / "r1" / ".make.partial").exists()
    assert "[make] 5 chars" in capsys.readouterr().out


def test_a_step_that_fails_leaves_nothing_for_a_later_run(tmp_path, capsys):
    def fail(out):
        write(out, "half.txt", "half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        PipelineRun(str(tmp_path), "r1").step("make", fail, inputs={}, parameters=MakeConfig(), describe=str)
    assert os.listdir(tmp_path / "r1") == []
    PipelineRun(str(tmp_path), "r2").step("make", lambda out: write(out, "a.txt", "whole"), inputs={},
                                          parameters=MakeConfig(), describe=str)
    assert "resuming" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "r2" / "make")) == ["a.txt", "manifest.json"]


def test_an_interrupted_step_is_resumed_by_the_next_run_with_the_same_cache_key(tmp_path, capsys):
    def interrupted(out):
        write(out, "checkpoint.txt", "step 80")
        raise KeyboardInterrupt  # as Ctrl-C; a kill -9 leaves the same folder

    with pytest.raises(KeyboardInterrupt):
        PipelineRun(str(tmp_path), "r1").step("make", interrupted, inputs={}, parameters=MakeConfig(), describe=str)
    PipelineRun(str(tmp_path), "r2").step("make", lambda out: {"files": sorted(os.listdir(out))}, inputs={},
                                          parameters=MakeConfig(n=2), describe=str)
    assert "resuming" not in capsys.readouterr().out  # other parameters: nothing to resume
    manifest = PipelineRun(str(tmp_path), "r3").step("make", lambda out: {"files": sorted(os.listdir(out))},
                                                     inputs={}, parameters=MakeConfig(), describe=str)
    assert "[make] resuming what run r1 left when it was stopped" in capsys.readouterr().out
    assert manifest["metrics"] == {"files": [".cache_key", "checkpoint.txt"]}
    assert not (tmp_path / "r1" / ".make.partial").exists()


def test_cache_reuses_equal_steps_only(tmp_path):
    calls = []

    def make(out):
        calls.append(out)
        return write(out, "a.txt", "x")

    step = dict(inputs={}, describe=str)
    PipelineRun(str(tmp_path), "r1").step("make", make, parameters=MakeConfig(), **step)
    reused = PipelineRun(str(tmp_path), "r2").step("make", make, parameters=MakeConfig(threads=4), **step)
    assert len(calls) == 1
    assert reused["reused_from"] == str(tmp_path / "r1" / "make") and reused["run_id"] == "r2"
    assert (tmp_path / "r2" / "make" / "a.txt").read_text() == "x"
    PipelineRun(str(tmp_path), "r3").step("make", make, parameters=MakeConfig(n=2), **step)
    PipelineRun(str(tmp_path), "r4", use_cache=False).step("make", make, parameters=MakeConfig(), **step)
    PipelineRun(str(tmp_path), "r5").step("make", make, parameters=MakeConfig(), cacheable=False, **step)
    # Two configs of one step (the trainer's model and training): both are in the key.
    PipelineRun(str(tmp_path), "r6").step("make", make, parameters=(MakeConfig(), OtherConfig()), **step)
    assert len(calls) == 5


def test_changed_input_invalidates_the_cache(tmp_path):
    source = tmp_path / "data.txt"
    source.write_text("one")
    calls = []
    step = dict(inputs={"data": str(source)}, parameters=MakeConfig(), describe=str)
    make = lambda out: calls.append(1) or {}
    PipelineRun(str(tmp_path / "runs"), "r1").step("make", make, **step)
    source.write_text("two")
    PipelineRun(str(tmp_path / "runs"), "r2").step("make", make, **step)
    assert len(calls) == 2


def test_fingerprint_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    first = fingerprint(str(tmp_path / "a"))
    (tmp_path / "a" / "x").write_text("2")
    second = fingerprint(str(tmp_path / "a"))
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    assert len({first, second, fingerprint(str(tmp_path / "a"))}) == 3


def test_the_same_bytes_under_another_kind_of_name_are_another_input(tmp_path, capsys):
    """`--data='corpus/*'` over stories.jsonl, then over the same bytes renamed stories.txt."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "stories.jsonl").write_text('{"story": "A fox ran. It hid."}\n')
    step = dict(inputs={"data": str(tmp_path / "corpus" / "*")}, parameters=MakeConfig(), describe=str)
    PipelineRun(str(tmp_path / "runs"), "r1").step("make", lambda out: {}, **step)
    (tmp_path / "corpus" / "stories.jsonl").rename(tmp_path / "corpus" / "stories.txt")
    PipelineRun(str(tmp_path / "runs"), "r2").step("make", lambda out: {}, **step)
    assert "reused" not in capsys.readouterr().out
