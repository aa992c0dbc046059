"""The tuner step: KerasTuner searches whose trials run the project's training loop, in child
processes, alone or as a chief and workers; best values, trial records and TensorBoard HParams."""

import glob
import importlib.util
import json
import math
import os
import re
import shutil
import time

import pytest
import sentencepiece as spm
import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2

from components import tokenizer, tuner
from components.common import UserError
from components.config import ModelConfig, TrainingConfig, TunerConfig

TRAINING = TrainingConfig(batch_size=8, seed=1, mixed_precision=False)
# A space that trains in seconds: every trial is a one-layer model a few dozen wide.
TINY_SPACE = {
    "d_model": {"values": [16, 32]},
    "num_layers": {"values": [1]},
    "num_heads": {"values": [2]},
    "ff_dim": {"values": [32, 64]},
    "dropout": {"values": [0.0, 0.1]},
    "learning_rate": {"min_value": 1e-3, "max_value": 1e-2, "sampling": "log"},
    "warmup_steps": {"values": [0, 2]},
    "label_smoothing": {"values": [0.0, 0.1]},
}


@pytest.fixture(scope="module")
def inputs(small_examples, spm_proto, tmp_path_factory):
    """(examples dir, tokenizer dir, model config) as the pipeline passes them."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    (tokenizer_dir / tokenizer.MODEL_FILE).write_bytes(spm_proto)
    model_config = ModelConfig(vocab_size=spm.SentencePieceProcessor(model_proto=spm_proto).get_piece_size(),
                               max_prompt_tokens=16, max_story_tokens=64)
    return small_examples, str(tokenizer_dir), model_config


def run_tune(inputs, output_dir, space=TINY_SPACE, **options):
    """A search of `space` with a tiny default config; `options` override TunerConfig's fields."""
    examples, tokenizer_dir, model_config = inputs
    config = TunerConfig(**dict(dict(tuner="random", max_trials=3, max_epochs_per_trial=1, tune_steps_per_epoch=3),
                                **options))
    return tuner.tune(examples, tokenizer_dir, str(output_dir), config, model_config, TRAINING, space=space)


@pytest.fixture(scope="module")
def random_search(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("random")
    return out, run_tune(inputs, out)


def in_space(name, value, space=TINY_SPACE):
    options = space[name]
    if "values" in options:
        return value in options["values"]
    return options["min_value"] <= value <= options["max_value"]


@pytest.mark.slow
def test_best_hparams_are_the_best_trials(random_search, inputs):
    out, metrics = random_search
    trials = metrics["trials"]
    assert sorted(t["trial_id"] for t in trials) == ["0", "1", "2"]
    log = (out / tuner.SEARCH_DIR / "tuner.log").read_text()
    starts = re.findall(r"^\[tuner\] trial (\d) of 3(, about \d+ s left)?$", log, re.MULTILINE)
    assert [(number, bool(eta)) for number, eta in starts] == [("1", False), ("2", True), ("3", True)]
    assert metrics["completed_trials"] == 3 and all(t["status"] == "COMPLETED" for t in trials)
    assert metrics["tuner"] == "random" and metrics["workers"] == 0
    best = min(trials, key=lambda t: t["val_loss"])
    assert metrics["best_val_loss"] == best["val_loss"] and 0 < best["val_loss"] < math.log(inputs[2].vocab_size)
    written = json.loads((out / tuner.BEST_HPARAMS_FILE).read_text())
    assert written == metrics["best_hparams"] == {key: best["hyperparameters"][key] for key in TINY_SPACE}
    assert all(in_space(name, value) for name, value in written.items())
    assert isinstance(written["d_model"], int) and isinstance(written["learning_rate"], float)
    # Bits per character scale the loss by one factor of the eval split (tokens per character / ln 2).
    factors = {round(t["val_bits_per_char"] / t["val_loss"], 9) for t in trials}
    assert len(factors) == 1 and 0.1 < factors.pop() < 10
    # Different trials tried different values.
    assert len({json.dumps(t["hyperparameters"], sort_keys=True) for t in trials}) == 3


def read_events(folder):
    """{tag: [(step, value)]} of a run's scalars, and its hparams plugin payloads."""
    scalars, hparams = {}, []
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data
                if plugin.plugin_name == "hparams":
                    hparams.append(plugin_data_pb2.HParamsPluginData.FromString(plugin.content))
                elif value.HasField("tensor"):
                    scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars, hparams


@pytest.mark.slow
def test_tensorboard_has_every_trials_hparams_and_score(random_search):
    out, metrics = random_search
    logs = out / tuner.LOGS_DIR
    _, experiment = read_events(str(logs))
    assert [{h.name for h in data.experiment.hparam_infos} for data in experiment] == [set(TINY_SPACE)]
    assert {m.name.tag for m in experiment[0].experiment.metric_infos} == {"val_loss", "val_bits_per_char", "loss"}
    assert sorted(d.name for d in logs.iterdir() if d.is_dir()) == ["0", "1", "2"]
    for trial in metrics["trials"]:
        scalars, hparams = read_events(str(logs / trial["trial_id"]))
        sessions = [data.session_start_info for data in hparams if data.HasField("session_start_info")]
        assert len(sessions) == 1
        assert sessions[0].group_name == trial["trial_id"]
        logged = {name: value.number_value for name, value in sessions[0].hparams.items()}
        assert logged == pytest.approx(trial["hyperparameters"])
        assert [step for step, _ in scalars["val_loss"]] == [0]
        assert scalars["val_loss"][0][1] == pytest.approx(trial["val_loss"], rel=1e-6)
        assert scalars["val_bits_per_char"][0][1] == pytest.approx(trial["val_bits_per_char"], rel=1e-6)


@pytest.mark.slow
def test_hyperband_continues_the_better_trial_from_its_weights(inputs, tmp_path):
    metrics = run_tune(inputs, tmp_path, tuner="hyperband", max_epochs_per_trial=2, tune_steps_per_epoch=2)
    trials = {t["trial_id"]: t for t in metrics["trials"]}
    # max_epochs 2, factor 2: two 1-epoch trials, the better one continued to epoch 2, two 2-epoch trials.
    assert len(trials) == 5 and all(t["status"] == "COMPLETED" for t in trials.values())
    continued = [t for t in trials.values() if "tuner/trial_id" in t["hyperparameters"]]
    assert len(continued) == 1
    child = continued[0]["hyperparameters"]
    parent_id = child["tuner/trial_id"]
    first_round = [t for t in trials.values() if t["hyperparameters"]["tuner/bracket"] == 1
                   and t["hyperparameters"]["tuner/round"] == 0]
    assert parent_id == min(first_round, key=lambda t: t["val_loss"])["trial_id"]
    assert (child["tuner/initial_epoch"], child["tuner/epochs"]) == (1, 2)
    assert {k: child[k] for k in TINY_SPACE} == {k: trials[parent_id]["hyperparameters"][k] for k in TINY_SPACE}
    # It went on from its parent's weights: one more epoch beats the parent's loss.
    assert continued[0]["val_loss"] < trials[parent_id]["val_loss"]
    assert metrics["best_val_loss"] == min(t["val_loss"] for t in trials.values())


HAVE_SCIPY = importlib.util.find_spec("scipy") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SCIPY, reason="KerasTuner's Bayesian oracle needs scipy")
def test_bayesian_search_proposes_after_its_random_start(inputs, tmp_path):
    # 3 trials: 2 random initial points, then one from the Gaussian process.
    metrics = run_tune(inputs, tmp_path, tuner="bayesian")
    assert metrics["completed_trials"] == 3
    assert metrics["best_val_loss"] == min(t["val_loss"] for t in metrics["trials"])
    assert all(in_space(name, value) for name, value in metrics["best_hparams"].items())


@pytest.mark.skipif(HAVE_SCIPY, reason="scipy is installed")
def test_bayesian_search_without_scipy_says_what_to_install(inputs, tmp_path):
    with pytest.raises(UserError, match=r"--tuner=bayesian needs scipy: .*keras-tuner\[bayesian\]"):
        run_tune(inputs, tmp_path, tuner="bayesian")


def logged_trials(search_dir, member):
    """Trial ids that a search process's log says it ran."""
    with open(os.path.join(search_dir, f"{member}.log"), encoding="utf-8") as f:
        return [line.split()[4].rstrip(":") for line in f if line.startswith(f"[tuner] {member} runs trial ")]


@pytest.mark.slow
def test_distributed_search_runs_every_trial_once(inputs, random_search, tmp_path):
    metrics = run_tune(inputs, tmp_path, max_trials=4, tune_workers=2)
    assert metrics["workers"] == 2 and metrics["completed_trials"] == 4
    ids = [t["trial_id"] for t in metrics["trials"]]
    assert sorted(ids) == ["0", "1", "2", "3"] and all(t["status"] == "COMPLETED" for t in metrics["trials"])
    search_dir = str(tmp_path / tuner.SEARCH_DIR)
    ran = {member: logged_trials(search_dir, member) for member in ("tuner0", "tuner1")}
    assert sorted(ran["tuner0"] + ran["tuner1"]) == ids  # each trial ran once, by one worker
    assert ran["tuner0"] and ran["tuner1"]
    assert logged_trials(search_dir, "chief") == []  # the chief only runs the oracle
    # The seeded oracle proposes the same values in the same order as the one-process search,
    # and a trial's result depends only on its values.
    _, local = random_search
    for trial, alone in zip(sorted(metrics["trials"], key=lambda t: t["trial_id"]), local["trials"]):
        assert trial["hyperparameters"] == pytest.approx(alone["hyperparameters"])
        assert trial["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-4)
    assert json.loads((tmp_path / tuner.BEST_HPARAMS_FILE).read_text()) == metrics["best_hparams"]


def running_processes_with(text):
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                if text.encode() in f.read():
                    pids.append(cmdline.split("/")[2])
        except OSError:
            pass  # it ended meanwhile
    return pids


@pytest.mark.slow
def test_a_crashing_worker_ends_the_search_with_its_error(inputs, tmp_path):
    # Workers read the data in their first trial; without an eval split they fail there.
    examples = tmp_path / "examples"
    examples.mkdir()
    for path in glob.glob(os.path.join(inputs[0], "train-*.tfrecord")):
        shutil.copy(path, examples)
    start = time.time()
    with pytest.raises(UserError, match=r"Tuning process tuner[01] failed \(exit status 1\): No eval examples in "):
        run_tune((str(examples), *inputs[1:]), tmp_path / "out", tune_workers=2)
    assert time.time() - start < 90
    # The chief, which would have waited for the failed trial for ever, and the other worker are gone.
    assert running_processes_with(str(tmp_path / "out" / tuner.SEARCH_DIR / tuner.SPEC_FILE)) == []


@pytest.mark.slow
def test_time_budget_stops_starting_trials(inputs, tmp_path):
    metrics = run_tune(inputs, tmp_path, max_trials=5, tune_time_budget=1)
    # The first trial always runs; it outlasts the budget, so no second one starts.
    assert [t["trial_id"] for t in metrics["trials"]] == ["0"] and metrics["completed_trials"] == 1
    log = (tmp_path / tuner.SEARCH_DIR / "tuner.log").read_text()
    assert "time budget of 1s spent: no new trials" in log
    assert re.search(r"^\[tuner\] trial 1 of 5, about [01] s left$", log, re.MULTILINE), log


def test_bad_arguments_are_user_errors(inputs, tmp_path):
    with pytest.raises(UserError, match="num_heads dividing each d_model"):
        run_tune(inputs, tmp_path, space=dict(TINY_SPACE, num_heads={"values": [3]}))
    with pytest.raises(UserError, match="exactly the keys"):
        run_tune(inputs, tmp_path, space={"d_model": {"values": [16]}})
    with pytest.raises(UserError, match="Unknown --tuner 'grid'"):
        run_tune(inputs, tmp_path, tuner="grid")
