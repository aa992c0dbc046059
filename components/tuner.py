"""KerasTuner search over the model's size and its training hyperparameters (or, when
fine-tuning a pretrained preset, over the learning rate, warm-up and LoRA rank).

`tune` is the pipeline's tuner step: it writes best_hparams.json, which the trainer then uses
instead of its flags. Every trial trains with the project's own loop (`trainer.Trainer`), not
Keras `fit`: `StoryHyperModel.fit` hands it KerasTuner's callbacks (the trainer calls their
on_epoch_end with val_loss, which is what KerasTuner's checkpointing and Hyperband need).

The search always runs in child processes (`python -m components.tuner SPEC.json`): KerasTuner
clears the Keras session before each trial and each trial reseeds TensorFlow, and both free the
caller's tf-text tokenizer. With `workers=N` they are a KerasTuner cluster on this machine: a
chief that runs the oracle and N workers that run trials, talking gRPC over loopback. On
separate hosts the same code takes its role from KerasTuner's environment variables
(KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT; see the README).

    output_dir/
      best_hparams.json   the best trial's values of SEARCH_SPACE's keys
      search/             spec.json (tune's arguments), one <process>.log per process, and
                          KerasTuner's project: storygen/oracle.json, trial_<id>/trial.json, ...
      logs/               TensorBoard: one run per trial (logs/<trial_id>) with its hyperparameters
                          for the HParams dashboard, and its loss, val_loss, val_bits_per_char per epoch
"""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import keras
import keras_tuner
import tensorflow as tf
from keras_tuner.engine.trial import Trial, TrialStatus
from tensorboard.plugins.hparams import api as hparams_api

from components import cli, tokenizer, trainer, transform
from components.common import UserError, format_duration
from components.config import (TUNED_MODEL_FIELDS, TUNED_TRAINING_FIELDS, TUNERS, ModelConfig, TrainingConfig,
                               TunerConfig)
from components.model import build_model

# Every range searched, in one place. {"values": [...]} is a choice; otherwise an Int range
# when both bounds are ints, else a Float range (KerasTuner's keyword arguments either way).
SEARCH_SPACE = {
    "d_model": {"values": [64, 128, 256]},
    "num_layers": {"min_value": 1, "max_value": 4},
    "num_heads": {"values": [2, 4, 8]},  # each must divide every d_model
    "ff_dim": {"values": [256, 512, 1024]},
    "dropout": {"values": [0.0, 0.1, 0.2, 0.3]},
    "learning_rate": {"min_value": 3e-4, "max_value": 5e-3, "sampling": "log"},
    "warmup_steps": {"values": [0, 50, 100, 200]},
    "label_smoothing": {"values": [0.0, 0.05, 0.1]},
}
# With --init_from the preset fixes the shape: the search is over how to fine-tune it.
FINE_TUNING_SPACE = {
    "learning_rate": {"min_value": 1e-5, "max_value": 1e-3, "sampling": "log"},
    "warmup_steps": {"values": [0, 50, 100, 200]},
    "lora_rank": {"values": [0, 4, 8, 16]},
}

BEST_HPARAMS_FILE = "best_hparams.json"
SEARCH_DIR = "search"
LOGS_DIR = "logs"
SPEC_FILE = "spec.json"
PROJECT = "storygen"
# Hyperband's halving rate. KerasTuner's default, 3, would make the default 2-epoch trials
# plain random search; 2 lets Hyperband stop half of the 1-epoch trials.
HYPERBAND_FACTOR = 2
# A search whose processes have not all finished this long after the time budget is stuck.
SEARCH_TIMEOUT_S = 24 * 3600
ENV_TUNER_ID, ENV_ORACLE_IP, ENV_ORACLE_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tune(examples_dir: str, tokenizer_dir: str, output_dir: str, config: TunerConfig, model: ModelConfig,
         training: TrainingConfig, *, space: dict | None = None) -> dict:
    """The pipeline's tuner step: searches `space` (default SEARCH_SPACE, or FINE_TUNING_SPACE
    when `model.init_from` names a preset) with the `config.tuner`
    algorithm, writes best_hparams.json and returns the manifest's metrics.

    model, training: what a trial trains with, less the searched fields (TUNED_MODEL_FIELDS,
    TUNED_TRAINING_FIELDS). max_trials bounds bayesian and random search; Hyperband's trials
    follow from max_epochs_per_trial. tune_workers: 0 runs the trials in one child process; N
    runs a KerasTuner chief and N workers on this machine. When KERASTUNER_* variables are
    set, this process is one member of a cluster on several hosts instead: a worker's call
    returns when the search ends, with no best values (`is_cluster_worker`).
    """
    tuner, workers = config.tuner, config.tune_workers
    if tuner not in TUNERS:
        raise UserError(f"Unknown --tuner '{tuner}': use one of {', '.join(TUNERS)}.")
    if tuner == "bayesian" and importlib.util.find_spec("scipy") is None:
        raise UserError("--tuner=bayesian needs scipy: install it (pip install 'keras-tuner[bayesian]') or use "
                        "--tuner=hyperband or --tuner=random.")
    space = space or (FINE_TUNING_SPACE if model.init_from else SEARCH_SPACE)
    check_space(space)
    role = cluster_role()
    if role and workers:
        raise UserError(f"{ENV_TUNER_ID} puts this process in a tuning cluster; leave --tune_workers at 0 "
                        "(each host runs its own member).")
    if role and tuner == "hyperband":
        raise UserError("--tuner=hyperband continues trials from their parents' checkpoints, which another host "
                        "cannot read: tune on several hosts with --tuner=bayesian or --tuner=random.")
    search_dir = os.path.join(output_dir, SEARCH_DIR)
    # A fresh search each time: KerasTuner would otherwise resume the trials it finds.
    for folder in (search_dir, os.path.join(output_dir, LOGS_DIR)):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(search_dir)
    spec = dict(examples_dir=os.path.abspath(examples_dir), tokenizer_dir=os.path.abspath(tokenizer_dir),
                output_dir=os.path.abspath(output_dir), tuner=dataclasses.asdict(config),
                model=dataclasses.asdict(model), training=dataclasses.asdict(training), space=space)
    spec_path = os.path.join(search_dir, SPEC_FILE)
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)

    if role:
        members = {role: dict(os.environ)}
    elif workers:
        address = {ENV_ORACLE_IP: "127.0.0.1", ENV_ORACLE_PORT: str(_free_port())}
        members = {name: dict(os.environ, **address, **{ENV_TUNER_ID: name})
                   for name in ["chief"] + [f"tuner{i}" for i in range(workers)]}
    else:
        members = {"tuner": {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}}
    _run_members(spec_path, members, search_dir, timeout=SEARCH_TIMEOUT_S + config.tune_time_budget)

    summary = {"tuner": tuner, "workers": workers, **({"role": role} if role else {})}
    if is_cluster_worker():
        return summary
    results = dict(summary, **_results(search_dir, space))
    _write_hparams_config(os.path.join(output_dir, LOGS_DIR), space)
    with open(os.path.join(output_dir, BEST_HPARAMS_FILE), "w", encoding="utf-8") as f:
        json.dump(results["best_hparams"], f, indent=2)
    return results


def describe(metrics: dict) -> str:
    """The pipeline's one-line summary of `tune`'s metrics."""
    if "best_hparams" not in metrics:
        return f"searched as the tuning cluster's {metrics['role']}; the chief has the results"
    return (f"{metrics['completed_trials']} of {len(metrics['trials'])} trials completed, best val_loss "
            f"{metrics['best_val_loss']:.3f}: {metrics['best_hparams']}")


def with_best(values: dict, model: ModelConfig, training: TrainingConfig) -> tuple[ModelConfig, TrainingConfig]:
    """The model and training configs with `values` (a trial's, or the best) of the searched fields."""
    return (dataclasses.replace(model, **{key: values[key] for key in TUNED_MODEL_FIELDS if key in values}),
            dataclasses.replace(training, **{key: values[key] for key in TUNED_TRAINING_FIELDS if key in values}))


def cluster_role() -> str | None:
    """This process's KerasTuner id when the environment makes it a member of a tuning cluster."""
    return os.environ.get(ENV_TUNER_ID) if ENV_ORACLE_IP in os.environ else None


def is_cluster_worker() -> bool:
    """Whether this process is a tuning cluster's worker: it runs trials, but the chief (the
    oracle) alone has the results and goes on to train."""
    role = cluster_role()
    return bool(role) and "chief" not in role  # KerasTuner's own test for the chief


def check_space(space: dict):
    """A search space must cover exactly SEARCH_SPACE's or FINE_TUNING_SPACE's keys, and every
    head count must divide every model width (keras-hub splits d_model evenly between the heads)."""
    if set(space) == set(FINE_TUNING_SPACE):
        return
    if set(space) != set(SEARCH_SPACE):
        raise UserError(f"A search space needs exactly the keys {', '.join(SEARCH_SPACE)} (or, fine-tuning a preset, "
                        f"{', '.join(FINE_TUNING_SPACE)}); got {', '.join(space)}.")
    widths, heads = space["d_model"].get("values"), space["num_heads"].get("values")
    if not widths or not heads or any(width % h for width in widths for h in heads):
        raise UserError(f"Search space: d_model and num_heads must be lists of choices, each num_heads dividing "
                        f"each d_model; got {space['d_model']} and {space['num_heads']}.")


# ---------------------------------------------------------------------- in a search process

def declare(hp, space: dict) -> dict:
    """Registers `space` with KerasTuner's HyperParameters `hp`; returns the trial's values."""
    values = {}
    for name, options in space.items():
        if "values" in options:
            values[name] = hp.Choice(name, **options)
        elif isinstance(options["min_value"], int) and isinstance(options["max_value"], int):
            values[name] = hp.Int(name, **options)
        else:
            values[name] = hp.Float(name, **options)
    return values


class TimeBudgetOracle:
    """Oracle mixin: once `time_budget` seconds have passed, no new trial starts (the first
    always does). It lives in the oracle so that a chief stops all of its workers, and says
    as each trial starts which one it is and about when the search will end."""

    def __init__(self, *args, time_budget: float = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_budget = time_budget
        self.start = time.time()

    def populate_space(self, trial_id):
        if self.time_budget and self.trials and time.time() - self.start > self.time_budget:
            print(f"[tuner] time budget of {self.time_budget:g}s spent: no new trials.", flush=True)
            return {"status": TrialStatus.STOPPED, "values": None}
        response = super().populate_space(trial_id)
        if response["status"] == TrialStatus.RUNNING:
            self._report_start(len(self.trials) + 1)
        return response

    def _report_start(self, number: int):
        """`[tuner] trial k of n`, with the time left from the pace of the trials so far and the budget."""
        elapsed = time.time() - self.start
        left = [max(self.time_budget - elapsed, 0.0)] if self.time_budget else []
        if self.max_trials and number > 1:
            left.append(elapsed / (number - 1) * (self.max_trials - number + 1))
        print(f"[tuner] trial {number}" + (f" of {self.max_trials}" if self.max_trials else "")
              + (f", about {format_duration(min(left))} left" if left else ""), flush=True)


class HyperbandOracle(TimeBudgetOracle, keras_tuner.oracles.HyperbandOracle):
    pass


class BayesianOracle(TimeBudgetOracle, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


class RandomOracle(TimeBudgetOracle, keras_tuner.oracles.RandomSearchOracle):
    pass


class StoryTuner(keras_tuner.Tuner):
    """keras_tuner.Tuner plus what keras_tuner.Hyperband adds to it (whose constructor makes
    its own oracle, without the time budget): a trial that continues an earlier one trains
    from that one's best weights, for the epochs its bracket gives it."""

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        if "tuner/epochs" in values:
            kwargs.update(epochs=values["tuner/epochs"], initial_epoch=values["tuner/initial_epoch"])
        print(f"[tuner] {self.tuner_id} runs trial {trial.trial_id}: {values}", flush=True)
        return super().run_trial(trial, *args, trial_id=trial.trial_id, **kwargs)

    def _build_hypermodel(self, hp):
        model = super()._build_hypermodel(hp)
        if "tuner/trial_id" in hp.values:
            model.load_weights(self._get_checkpoint_fname(hp.values["tuner/trial_id"]))
        return model


class StoryHyperModel(keras_tuner.HyperModel):
    """A StoryTransformer of a trial's size, trained by `trainer.Trainer` with its training values.

    spec: `tune`'s arguments (as in spec.json).
    """

    def __init__(self, spec: dict):
        super().__init__(name=PROJECT)
        self.spec = spec
        self.tuner = TunerConfig(**spec["tuner"])
        self.model_config = ModelConfig(**spec["model"])
        self.training = TrainingConfig(**spec["training"])
        self.data_counts = None  # (batches per epoch, eval tokens, eval characters), counted once

    def trial_configs(self, hp) -> tuple[ModelConfig, TrainingConfig]:
        """The model and training configs with a trial's values of the searched fields."""
        return with_best(declare(hp, self.spec["space"]), self.model_config, self.training)

    def build(self, hp):
        model_config, _ = self.trial_configs(hp)
        # The same initial weights for the same values, whichever process runs the trial and when.
        keras.utils.set_random_seed(self.training.seed)
        return build_model(model_config)

    def fit(self, hp, model, *, epochs, callbacks, trial_id, initial_epoch=0):
        """Trains epochs - initial_epoch epochs (Hyperband continues a trial from initial_epoch,
        with a fresh optimizer and warm-up) and returns the best epoch's validation loss and
        bits per character. `callbacks` are KerasTuner's (one saves the best epoch's weights);
        the trial's TensorBoard run joins them."""
        spec = self.spec
        model_config, training = self.trial_configs(hp)
        # Made per trial: KerasTuner cleared the session, which frees an earlier tokenizer.
        tok = tokenizer.load_tokenizer(spec["tokenizer_dir"])
        try:
            train_data, eval_data, batches_per_epoch = trainer.datasets(spec["examples_dir"], tok, model_config,
                                                                        training.batch_size, training.seed)
        except UserError as e:
            # Bad data is not a bad trial: KerasTuner ends the search on a FatalError only.
            raise keras_tuner.errors.FatalError(str(e)) from e
        if self.data_counts is None:
            self.data_counts = (self.tuner.tune_steps_per_epoch or batches_per_epoch,
                                *_token_and_char_counts(eval_data, tok))
        steps_per_epoch, eval_tokens, eval_chars = self.data_counts
        to_bits_per_char = eval_tokens / (max(eval_chars, 1) * math.log(2))  # times a loss in nats per token
        log = TrialLog(os.path.join(spec["output_dir"], LOGS_DIR, trial_id), hp.values, trial_id, initial_epoch,
                       to_bits_per_char)
        epochs -= initial_epoch
        run = trainer.Trainer(model_config, training, total_steps=epochs * steps_per_epoch, model=model)
        history = run.fit(train_data, eval_data, steps_per_epoch=steps_per_epoch, epochs=epochs,
                          callbacks=[*callbacks, log])
        val_loss = min(history["val_loss"])
        return {"val_loss": val_loss, "val_bits_per_char": val_loss * to_bits_per_char}


class TrialLog(keras.callbacks.Callback):
    """A trial's TensorBoard run: its hyperparameters, for the HParams dashboard, and per epoch
    loss, val_loss and val_bits_per_char. (Keras's TensorBoard callback, which KerasTuner would
    give the hyperparameters to, reads a compiled model's optimizer; the trainer compiles none.)"""

    def __init__(self, logdir: str, hparams: dict, trial_id: str, initial_epoch: int, to_bits_per_char: float):
        super().__init__()
        self.writer = tf.summary.create_file_writer(logdir)
        self.hparams, self.trial_id = hparams, trial_id
        self.initial_epoch, self.to_bits_per_char = initial_epoch, to_bits_per_char

    def on_train_begin(self, logs=None):
        with self.writer.as_default():
            hparams_api.hparams(self.hparams, trial_id=self.trial_id)

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default(step=self.initial_epoch + epoch):
            tf.summary.scalar("loss", logs["loss"])
            tf.summary.scalar("val_loss", logs["val_loss"])
            tf.summary.scalar("val_bits_per_char", logs["val_loss"] * self.to_bits_per_char)
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.close()


def _search(spec: dict):
    """Runs this process's part of the search: all of it, or the chief's or a worker's (as
    KerasTuner reads KERASTUNER_* from the environment)."""
    hypermodel = StoryHyperModel(spec)
    config = hypermodel.tuner
    oracles = {"hyperband": (HyperbandOracle, dict(max_epochs=config.max_epochs_per_trial, factor=HYPERBAND_FACTOR)),
               # KerasTuner's default, 3 random trials per dimension, would spend a small budget on random trials.
               "bayesian": (BayesianOracle, dict(max_trials=config.max_trials, num_initial_points=min(
                   3 * len(spec["space"]), max(2, config.max_trials // 2)))),
               "random": (RandomOracle, dict(max_trials=config.max_trials))}
    oracle_class, options = oracles[config.tuner]
    # KerasTuner takes seed 0 for "no seed".
    oracle = oracle_class(objective=keras_tuner.Objective("val_loss", direction="min"),
                          seed=hypermodel.training.seed or 1, time_budget=config.tune_time_budget, **options)
    search = StoryTuner(oracle=oracle, hypermodel=hypermodel,
                        directory=os.path.join(spec["output_dir"], SEARCH_DIR), project_name=PROJECT)
    search.search(epochs=config.max_epochs_per_trial)


def _token_and_char_counts(eval_data, tok) -> tuple[int, int]:
    """Scored target tokens in the eval batches and the characters they spell (EOS spells none),
    which turn a loss in nats per token into bits per character."""
    tokens = chars = 0
    for _, targets in eval_data:
        mask = tf.not_equal(targets, tok.special.pad)
        tokens += int(tf.math.count_nonzero(mask))
        texts = tok.detokenize(transform.spelled(targets, tok.special)).numpy()
        chars += sum(len(text.decode("utf-8")) for text in texts)
    return tokens, chars


# ---------------------------------------------------------------------- the calling process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_members(spec_path: str, members: dict, search_dir: str, timeout: float):
    """Runs one search process per member ({name: environment}) and waits for the search to end.

    It ends when every trial runner has exited 0 (in a cluster: every worker; the chief, which
    saves its state after each trial, is then stopped), or when the chief has (a worker still
    waiting to connect then has nothing to do). A process that fails stops them all and raises
    UserError with its last lines; so does `timeout`. Lines the processes print that start
    with "[" (the trainer's and tuner's progress) are relayed, prefixed with the member's name.
    """
    processes, logs, relayed = {}, {}, {}
    try:
        for name, env in members.items():
            logs[name], relayed[name] = os.path.join(search_dir, f"{name}.log"), 0
            env = dict(env, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
                filter(None, [REPO, env.get("PYTHONPATH")])))
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen([sys.executable, "-m", "components.tuner", spec_path], cwd=REPO,
                                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        runners = [name for name in processes if name != "chief"] or list(processes)
        deadline = time.time() + timeout
        while True:
            _relay(logs, relayed, prefix=len(processes) > 1)
            for name, process in processes.items():
                if process.poll() not in (None, 0):
                    tail = _tail(logs[name])
                    # A UserError's sentence (the CLI prints it last) says it all; otherwise show the traceback.
                    _, mark, sentence = (tail.splitlines()[-1] if tail else "").partition(cli.ERROR_MARK)
                    reason = f": {sentence}" if mark else f"; the last lines of {logs[name]}:\n{tail}"
                    raise UserError(f"Tuning process {name} failed (exit status {process.returncode}){reason}")
            chief = processes.get("chief")
            if all(processes[name].poll() == 0 for name in runners) or (chief and chief.poll() == 0):
                return
            if time.time() > deadline:
                raise UserError(f"Tuning did not finish within {timeout:.0f}s; see the logs in {search_dir}.")
            time.sleep(0.5)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _relay(logs, relayed, prefix=len(processes) > 1)


def _relay(logs: dict, relayed: dict, prefix: bool):
    """Prints the progress lines the processes have logged since the last call."""
    for name, path in logs.items():
        with open(path, "rb") as f:
            f.seek(relayed[name])
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        relayed[name] += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            if line.startswith("["):
                print(f"[{name}] {line}" if prefix else line, flush=True)


def _tail(path: str, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "\n".join(line.rstrip() for line in f.readlines()[-lines:])


def _results(search_dir: str, space: dict) -> dict:
    """The trials as the oracle saved them, and the best one's values of the space's keys."""
    project_dir = os.path.join(search_dir, PROJECT)
    trials = []
    for name in sorted(os.listdir(project_dir)):
        path = os.path.join(project_dir, name, "trial.json")
        if name.startswith("trial_") and os.path.exists(path):
            trial = Trial.load(path)
            completed = trial.status == "COMPLETED"
            trials.append({"trial_id": trial.trial_id, "hyperparameters": trial.hyperparameters.values,
                           "val_loss": trial.score if completed else None,
                           "val_bits_per_char": trial.metrics.get_best_value("val_bits_per_char") if completed
                           else None,
                           "status": trial.status, **({} if completed else {"message": trial.message})})
    completed = [t for t in trials if t["status"] == "COMPLETED"]
    if not completed:
        reason = next((t["message"].strip().splitlines()[-1] for t in trials if t.get("message")), "none ran")
        raise UserError(f"No tuning trial completed ({reason}); see the logs in {search_dir}.")
    best = min(completed, key=lambda t: t["val_loss"])
    return {"best_hparams": {key: best["hyperparameters"][key] for key in space}, "best_val_loss": best["val_loss"],
            "best_trial_id": best["trial_id"], "trials": trials, "completed_trials": len(completed)}


def _write_hparams_config(logdir: str, space: dict):
    """The experiment's hyperparameter domains and metrics for TensorBoard's HParams dashboard
    (each trial's run carries its values: `TrialLog`)."""
    def domain(options):
        if "values" in options:
            return hparams_api.Discrete(options["values"])
        if isinstance(options["min_value"], int) and isinstance(options["max_value"], int):
            return hparams_api.IntInterval(options["min_value"], options["max_value"])
        return hparams_api.RealInterval(float(options["min_value"]), float(options["max_value"]))

    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(
            hparams=[hparams_api.HParam(name, domain(options)) for name, options in space.items()],
            metrics=[hparams_api.Metric(name) for name in ("val_loss", "val_bits_per_char", "loss")])


def main(args: list[str]):
    """`python -m components.tuner SPEC.json`: one search process (see `tune`)."""
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        _search(spec)
    except keras_tuner.errors.FatalError as e:
        raise UserError(str(e)) from e


if __name__ == "__main__":
    cli.run(main, max_args=1, usage="SPEC.json")
