"""Shared fixtures: a small corpus on disk, a SentencePiece model, a random tiny model, and
one tiny pipeline run (two runs, in fact: the second pushes version 2) shared by every
end-to-end test; and how the suite runs on two workers (pytest-xdist, `-n 2` in setup.cfg)."""

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile

import pytest

from components.cli import EXIT_NOT_PUSHED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = os.path.join(REPO, "pipeline", "configs", "tiny.flags")
DEFAULT_FLAGS = os.path.join(REPO, "pipeline", "configs", "default.flags")

# A few hand-written stories in both languages for unit tests (the e2e tests use the built-in corpus).
STORIES = [
    {"title": "山中小庙", "tags": ["fairy_tale"], "story": "从前有座山，山里有座庙。庙里有个老和尚，每天给小和尚讲故事。有一天，小和尚问：“师父，故事讲完了吗？”老和尚笑着说：“山还在，故事就讲不完。”"},
    {"title": "狐狸和葡萄", "tags": ["fable"], "story": "一只狐狸走进了葡萄园。它看见架子上挂着一串串紫色的葡萄。狐狸跳了好几次，都够不着。最后它说：“这些葡萄一定是酸的。”说完，它就走开了。"},
    {"title": "The Tailor", "tags": ["fairy_tale"], "story": "Once upon a time there was a poor tailor. He lived in a small house at the edge of the forest. One morning a fox knocked at his door and asked for a coat. The tailor sewed all day and all night. In the end the fox paid him with a golden button, and the tailor was never poor again."},
    {"title": "The Dragon", "tags": ["fairy_tale", "dragons"], "story": "Long ago a dragon slept under the old castle. Nobody in the village dared to wake him. A little girl walked into the cave with a lantern. She sang a song so gentle that the dragon smiled in his sleep. From that day on, the dragon guarded the village."},
]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Groups for `--dist loadgroup`: each group runs in one worker. The tests of the tiny pipeline
    run (a session fixture of about two minutes) form one, so it is built once; every other
    module is a group, so its module fixtures are built once."""
    for item in items:
        group = "tiny_pipeline" if "tiny_pipeline" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item):
    """A test marked `alone` runs, fixtures included, while the other workers run no test; every
    other test runs beside the others'."""
    if not hasattr(item.config, "workerinput"):  # one process
        return (yield)
    gate_path, lock_path = _lock_files(item.config)
    # `alone` would wait for ever behind workers that start a test as soon as one ends: it first
    # takes the gate, which each test passes on its way in.
    with open(gate_path, "a") as gate, open(lock_path, "a") as lock:
        if item.get_closest_marker("alone"):
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        return (yield)  # closing the files releases the locks


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):
        for path in _lock_files(session.config):
            with contextlib.suppress(FileNotFoundError):  # the other worker's
                os.remove(path)


def _lock_files(config):
    """The gate and the lock that the workers of this run share."""
    prefix = os.path.join(tempfile.gettempdir(), f"storygen-tests-{config.workerinput['testrunuid']}")
    return f"{prefix}.gate", f"{prefix}.lock"


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def run_cli(*args, cwd=REPO, timeout=600, env=None):
    """Runs `python -m ARGS` and returns the CompletedProcess (text mode); `env` adds variables."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory):
    """An ingest output folder (train/eval/test) made from many copies of STORIES."""
    from components import ingest
    from components.config import IngestConfig

    root = tmp_path_factory.mktemp("small")
    # Vary each copy so that the hash split spreads them over all three splits.
    records = [dict(s, story=s["story"] + f" ({i})") for i in range(40) for s in STORIES]
    source = write_jsonl(root / "stories.jsonl", records)
    out = root / "examples"
    out.mkdir()
    ingest.ingest(IngestConfig(data=source, seed=1, eval_fraction=0.2, test_fraction=0.2, max_bad_fraction=0.0), str(out))
    return str(out)


@pytest.fixture(scope="session")
def spm_proto(small_examples, tmp_path_factory):
    from components import tokenizer
    from components.config import TokenizerConfig

    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.train_tokenizer(small_examples, str(out), TokenizerConfig(vocab_size=700, seed=1))
    return tokenizer.load_proto(str(out))


@pytest.fixture(scope="session")
def tiny_model(spm_proto):
    """A randomly initialised, built StoryTransformer matching spm_proto's vocabulary."""
    import keras
    import sentencepiece as spm

    from components.model import StoryTransformer

    keras.utils.set_random_seed(7)
    vocab_size = spm.SentencePieceProcessor(model_proto=spm_proto).get_piece_size()
    model = StoryTransformer(vocab_size=vocab_size, max_prompt_tokens=16, max_story_tokens=24, d_model=32,
                             num_layers=2, num_heads=2, ff_dim=64)
    model((keras.ops.ones((1, 3), "int32"), keras.ops.ones((1, 3), "int32")))
    return model


class TinyPipeline:
    """Two tiny pipeline runs into one pipeline root and serving dir (see `tiny_pipeline`)."""

    def __init__(self, root):
        self.pipeline_root = os.path.join(root, "runs")
        self.serving_model_dir = os.path.join(root, "saved_models")
        self.model_base_path = os.path.join(self.serving_model_dir, "storygen")
        self.results = {}

    def run(self, run_id, *extra, exit_code=0):
        result = run_cli("pipeline.run", f"--flagfile={TINY_FLAGS}", f"--pipeline_root={self.pipeline_root}",
                         f"--serving_model_dir={self.serving_model_dir}", f"--run_id={run_id}", *extra)
        self.results[run_id] = result
        assert result.returncode == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def step_dir(self, run_id, step):
        return os.path.join(self.pipeline_root, run_id, step)

    def manifest(self, run_id, step):
        with open(os.path.join(self.step_dir(run_id, step), "manifest.json"), encoding="utf-8") as f:
            return json.load(f)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny configuration run twice: `first` trains and pushes version 1; `second` reuses
    the cached steps and pushes version 2."""
    pipeline = TinyPipeline(str(tmp_path_factory.mktemp("tiny")))
    pipeline.run("first")
    pipeline.run("second")
    return pipeline


TWO_EPOCHS = "two_epochs"


@pytest.fixture(scope="session")
def two_epoch_run(tiny_pipeline):
    """The tiny configuration trained for two epochs instead of ten, as run TWO_EPOCHS of the
    tiny pipeline (its ingest and tokenizer reused): the one-process reference of the
    distributed tests, and a later model worse than version 2, which --max_bpc_regression=0
    keeps from being pushed (exit status 3). Returns the run's CompletedProcess."""
    return tiny_pipeline.run(TWO_EPOCHS, "--epochs=2", "--max_bpc_regression=0.0", exit_code=EXIT_NOT_PUSHED)
