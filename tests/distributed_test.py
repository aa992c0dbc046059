"""Training across processes: two MultiWorkerMirroredStrategy workers on loopback, and a run
killed with SIGKILL mid-epoch that the same command resumes. Both train the tiny configuration
for two epochs on the tiny pipeline's ingest and tokenizer (copied into their own pipeline
roots, where the cache finds them) and compare with the same two epochs trained uninterrupted
in one process (`two_epoch_run`)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from components.model import load_model

from conftest import REPO, TINY_FLAGS, TWO_EPOCHS
from serving_fixtures import free_ports

# Each test trains the tiny configuration in new processes and needs the tiny pipeline run.
pytestmark = pytest.mark.slow


def pipeline_root_with_inputs(tiny_pipeline, root):
    """A pipeline root holding copies of the tiny run's ingest and tokenizer steps."""
    run = os.path.join(root, "runs", "inputs")
    for step in ("ingest", "tokenizer"):
        shutil.copytree(tiny_pipeline.step_dir("first", step), os.path.join(run, step))
    return os.path.join(root, "runs")


def pipeline_command(root, *extra):
    """tiny.flags for two epochs, as `two_epoch_run` trains them."""
    return [sys.executable, "-m", "pipeline.run", f"--flagfile={TINY_FLAGS}", "--epochs=2",
            f"--pipeline_root={root}/runs", f"--serving_model_dir={root}/saved_models", *extra]


def env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **extra)


def trainer_manifest(runs):
    [path] = [os.path.join(runs, run, "trainer", "manifest.json") for run in os.listdir(runs)
              if os.path.exists(os.path.join(runs, run, "trainer", "manifest.json"))]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def history(manifest):
    with open(os.path.join(manifest["outputs"]["path"], "history.json"), encoding="utf-8") as f:
        return json.load(f)


def weights(trainer_dir):
    from components import trainer

    return load_model(trainer_dir).get_weights()


def test_two_workers_train_together_like_one_process(tiny_pipeline, two_epoch_run, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        root = tmp_path / f"worker{index}"
        pipeline_root_with_inputs(tiny_pipeline, root)
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            pipeline_command(root, "--distribution_strategy=multi_worker_mirrored", "--force_push"), cwd=REPO,
            env=env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=480)[0])
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    manifests = [trainer_manifest(str(tmp_path / f"worker{i}" / "runs")) for i in range(2)]
    chief, worker = (manifest["metrics"] for manifest in manifests)

    # Each worker saw half of every global batch: equal losses on both mean the all-reduce ran.
    assert chief["replicas"] == worker["replicas"] == 2
    assert worker["loss"] == chief["loss"] and worker["val_loss"] == chief["val_loss"]
    # The same global batches as one process: the same training, up to summation order.
    single = tiny_pipeline.manifest(TWO_EPOCHS, "trainer")
    assert chief["steps"] == single["metrics"]["steps"]
    assert history(manifests[0])["val_loss"] == pytest.approx(history(single)["val_loss"], rel=0.01)
    # Only the chief evaluated, exported and pushed (pushed by --force_push: two epochs are not blessed).
    assert "trained as a worker" in outputs[1] and "[pusher] pushed version 1" in outputs[0]
    assert not os.path.exists(tmp_path / "worker1" / "saved_models")


def test_a_killed_run_resumes_mid_epoch_and_ends_as_if_never_killed(tiny_pipeline, two_epoch_run, tmp_path):
    runs = pipeline_root_with_inputs(tiny_pipeline, tmp_path)
    # Only training is compared: the run stops after the trainer step.
    command = pipeline_command(tmp_path, "--checkpoint_every_steps=20", "--stop_after=trainer")
    first = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        for line in first.stdout:
            if line.startswith("[trainer] checkpoint at step 80"):
                break
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=480)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # Checkpoints at multiples of 20 and at the end of epoch 1 (step 61): the kill came between
    # step 80 and 100, inside epoch 2.
    [resumed] = re.findall(r"resumed from \S+ckpt-80 at step 80 \(epoch 2, batch (\d+) of \d+\)", second.stdout)
    assert int(resumed) > 0

    manifest = trainer_manifest(runs)
    single = tiny_pipeline.manifest(TWO_EPOCHS, "trainer")
    assert manifest["metrics"]["steps"] == single["metrics"]["steps"]
    resumed, uninterrupted = history(manifest), history(single)
    # No batch trained twice or skipped: every epoch's losses and the final weights are the same.
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-6)
    for resumed_weights, reference in zip(weights(manifest["outputs"]["path"]), weights(single["outputs"]["path"])):
        np.testing.assert_allclose(resumed_weights, reference, atol=1e-6)
