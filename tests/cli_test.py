"""The step configs, the flags made from them, and the one CLI convention: light imports,
one-sentence errors with documented exit codes, no TensorFlow start-up noise."""

import dataclasses
import os
import re
import subprocess
import sys
import time

import pytest
from absl import flags

from components import config
from components.cli import EXIT_USAGE, EXIT_USER_ERROR
from components.config import IngestConfig, ModelConfig, PipelineConfig, TrainingConfig, cache_key
from conftest import DEFAULT_FLAGS, REPO, run_cli

HEAVY = ("tensorflow", "keras", "keras_tuner", "keras_hub")


@pytest.mark.parametrize("module", ["pipeline.run", "pipeline.generate", "components.config", "components.cli"])
def test_entry_points_import_no_tensorflow(module):
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_importing_the_steps_leaves_tensorflows_runtime_unstarted():
    """MultiWorkerMirroredStrategy must configure TensorFlow's runtime before it starts, and the
    pipeline imports its steps first: a tensor made at import (it happened) fails every
    multi-worker run. (The runtime's handle is private; this test is its only reader.)"""
    code = ("import components.exporter, components.trainer, components.evaluator, components.tuner, "
            "components.pusher, components.model, components.tokenizer, components.ingest; "
            "from tensorflow.python.eager import context; print(context.context()._context_handle is None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("option", ["--help", "--helpshort"])
def test_help_lists_every_pipeline_flag_by_step_quickly(option):
    start = time.time()
    result = run_cli("pipeline.run", option)
    seconds = time.time() - start
    assert all(f"--{name}:" in result.stdout or f"--[no]{name}:" in result.stdout for name in config.flag_fields())
    assert seconds < 2.5, f"{option} took {seconds:.1f}s: something imports TensorFlow"
    # One group per step, in the pipeline's order, each holding its own flags.
    groups = re.findall(r"^(\w+):$", result.stdout, re.MULTILINE)
    assert groups == ["flags", "run", "ingest", "tokenizer", "model", "training", "tuner", "evaluation", "export",
                      "push"]
    ingest = result.stdout.split("\ningest:\n")[1].split("\n\n")[0]
    assert "--data:" in ingest and "--text_separator:" in ingest and "--epochs:" not in ingest
    assert "--verbosity" not in result.stdout  # absl's own flags are --helpfull's"


def test_flags_are_the_config_fields_with_their_defaults():
    from pipeline import flags as storygen_flags

    values = flags.FlagValues()
    storygen_flags.define_pipeline_flags(values)
    values(["prog"])
    assert storygen_flags.pipeline_config(values) == PipelineConfig()
    assert set(values) == set(config.flag_fields())  # one flag per field name, shared names included
    values(["prog", "--seed=3", "--builtin_langs=en", "--nocache", "--tuner=random", "--text_key=body"])
    parsed = storygen_flags.pipeline_config(values)
    assert (parsed.training.seed, parsed.ingest.builtin_langs, parsed.run.cache) == (3, ("en",), False)
    assert (parsed.tuner.tuner, parsed.ingest.text_key) == ("random", "body")
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--profile_steps=1,2,3"])
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--eval_fraction=0.7"])


def test_the_default_flagfile_is_running_with_no_flags():
    """pipeline/configs/default.flags says it is the defaults written out: a default changed
    in components/config.py and not there (or there and not in the config) fails here."""
    from pipeline import flags as storygen_flags

    values = flags.FlagValues()
    storygen_flags.define_pipeline_flags(values)
    values(["prog", f"--flagfile={DEFAULT_FLAGS}"])
    assert storygen_flags.pipeline_config(values) == PipelineConfig()


def test_shared_flags_feed_every_step_and_lists_become_tuples():
    parsed = PipelineConfig.from_values({"seed": 7, "batch_size": 8, "builtin_langs": ["en"], "profile_steps": ["3", "5"],
                                         "vocab_size": 1000})
    assert parsed.ingest.seed == parsed.tokenizer.seed == parsed.training.seed == 7
    assert parsed.training.batch_size == parsed.evaluation.batch_size == 8
    assert parsed.ingest.builtin_langs == ("en",) and parsed.training.profile_steps == (3, 5)
    assert parsed.tokenizer.vocab_size == parsed.model.vocab_size == 1000
    hash(parsed)  # frozen and hashable, lists included


def test_cache_key_leaves_out_what_does_not_change_the_output():
    assert cache_key(IngestConfig(num_parallel_reads=4)) == cache_key(IngestConfig())
    assert cache_key(IngestConfig(seed=1)) != cache_key(IngestConfig())
    assert cache_key(TrainingConfig(checkpoint_every_steps=7, tpu="x")) == cache_key(TrainingConfig())
    assert "checkpoint_every_steps" not in cache_key(TrainingConfig())


def test_the_tuner_searches_exactly_the_tuned_fields():
    from components import tuner

    assert set(tuner.SEARCH_SPACE) | set(tuner.FINE_TUNING_SPACE) == (set(config.TUNED_MODEL_FIELDS)
                                                                       | set(config.TUNED_TRAINING_FIELDS))
    fine_tuned, _ = tuner.with_best({"learning_rate": 1e-4, "warmup_steps": 0, "lora_rank": 8}, ModelConfig(),
                                    TrainingConfig())
    assert fine_tuned == dataclasses.replace(ModelConfig(), lora_rank=8)
    model, training = tuner.with_best({"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64, "dropout": 0.2,
                                       "learning_rate": 1e-3, "warmup_steps": 5, "label_smoothing": 0.1},
                                      ModelConfig(), TrainingConfig())
    assert (model.d_model, model.num_layers, model.num_heads, model.ff_dim, model.dropout) == (32, 1, 2, 64, 0.2)
    defaults = ModelConfig()
    assert dataclasses.replace(model, d_model=defaults.d_model, num_layers=defaults.num_layers,
                               num_heads=defaults.num_heads, ff_dim=defaults.ff_dim, dropout=defaults.dropout) == defaults
    assert training.learning_rate == 1e-3 and training.label_smoothing == 0.1
    assert training.epochs == TrainingConfig().epochs


@pytest.mark.parametrize("args, status, message", [
    (["--epochs=x"], EXIT_USAGE, "error: flag --epochs=x: invalid literal"),
    (["--nosuchflag"], EXIT_USAGE, "error: Unknown command line flag 'nosuchflag'"),
    (["stray"], EXIT_USAGE, "error: unexpected arguments stray"),
    (["--tune", "--distribution_strategy=multi_worker_mirrored"], EXIT_USER_ERROR, "error: --tune runs on one host"),
    (["--examples_dir={tmp}", "--stop_after=ingest"], EXIT_USER_ERROR,
     "error: --stop_after=ingest names a step this run leaves out (--examples_dir takes an earlier ingest)"),
    (["--stop_after=tuner"], EXIT_USER_ERROR, "error: --stop_after=tuner names a step this run leaves out (it runs "
                                              "with --tune)"),
])
def test_errors_are_one_sentence_with_their_exit_status(args, status, message, tmp_path):
    result = run_cli("pipeline.run", *(arg.format(tmp=tmp_path) for arg in args))
    assert result.returncode == status
    assert result.stderr.startswith("python -m pipeline.run: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


RETRACING = '''
import tensorflow as tf
from components import cli

def main(args):
    double = tf.function(lambda x: 2 * x)
    for length in range(1, 8):  # a trace per shape: TensorFlow warns after the fifth
        double(tf.zeros([length]))

cli.run(main)
'''


def test_retracing_warnings_are_silenced_unless_asked_for(tmp_path):
    (tmp_path / "retrace.py").write_text(RETRACING)
    command = [sys.executable, str(tmp_path / "retrace.py")]
    env = dict(os.environ, PYTHONPATH=REPO)
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    verbose = subprocess.run(command + ["--verbosity=0"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr
    assert "retracing" not in quiet.stderr and "tf.function retracing" in verbose.stderr


def test_tensorflow_start_up_lines_are_silenced_unless_asked_for(tmp_path):
    """pipeline.run imports TensorFlow before ingest finds no input: its stderr is the one
    error line, while --verbosity lets TensorFlow's own start-up lines through."""
    args = ("pipeline.run", "--data=/nonexistent/stories.jsonl", f"--pipeline_root={tmp_path}")
    quiet = run_cli(*args)
    assert quiet.returncode == EXIT_USER_ERROR
    assert quiet.stderr.splitlines() == ["python -m pipeline.run: error: No input found at '/nonexistent/stories.jsonl': "
                                         "give --data a file, directory or glob, builtin:fairy_tales or tfds:NAME."]
    verbose = run_cli(*args, "--verbosity=0", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert verbose.returncode == EXIT_USER_ERROR and len(verbose.stderr.splitlines()) > 1
