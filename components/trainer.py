"""Trains the story model with Keras `fit` under a tf.distribute strategy.

AdamW with a linear warm-up then cosine decay, gradient clipping, a checkpoint per epoch,
BackupAndRestore so that a rerun of the same command resumes an interrupted run at its
last finished epoch, and TensorBoard logs: losses and perplexities, learning rate, tokens
per second and gradient norm, the run's hyperparameters (HParams dashboard), sample stories
from fixed Chinese and English prompts every epoch, and a profiler trace on request.
"""

import json
import math
import os
import time

import keras
import tensorflow as tf

from tensorboard.plugins.hparams import api as hparams_api

from components.common import PAD_ID, UserError
from components.exporter import StoryGenerator
from components.model import StoryTransformer

MODEL_FILE = "model.keras"
STRATEGIES = ("default", "one_device", "mirrored")
SAMPLE_PROMPTS = ("从前有座山，山里有座庙，庙里住着一个小和尚，名叫阿福。",
                  "Once upon a time, in a faraway kingdom, there lived a poor tailor named Hans.")
SAMPLE_TOKENS = 96


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by --distribution_strategy."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise UserError(f"Unknown --distribution_strategy '{name}': use one of {', '.join(STRATEGIES)}.")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 10% of peak."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 1))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps - warmup_steps, 1), alpha=0.1)


def masked_loss():
    """Token cross-entropy that ignores padding, averaged over real target tokens."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID)


class EpochStats(keras.callbacks.Callback):
    """Adds to each epoch's logs: perplexities, tokens per second (non-padding target tokens),
    the learning rate, and the global gradient norm on a fixed training batch."""

    def __init__(self, tokens_per_epoch: int, probe_batch):
        super().__init__()
        self.tokens_per_epoch = tokens_per_epoch
        self.probe_batch = probe_batch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs["tokens_per_second"] = self.tokens_per_epoch / max(time.time() - self._start, 1e-9)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        for key in ("loss", "val_loss"):
            if key in logs:
                logs[key.replace("loss", "perplexity")] = math.exp(min(float(logs[key]), 50.0))
        inputs, targets = self.probe_batch
        with tf.GradientTape() as tape:
            loss = masked_loss()(targets, self.model(inputs, training=False))
        logs["gradient_norm"] = float(tf.linalg.global_norm(tape.gradient(loss, self.model.trainable_variables)))


class SampleStories(keras.callbacks.Callback):
    """Writes greedy continuations of fixed prompts to TensorBoard as text, every epoch."""

    def __init__(self, tokenizer, logdir: str):
        super().__init__()
        self.tokenizer = tokenizer
        self.writer = tf.summary.create_file_writer(logdir)

    def on_train_begin(self, logs=None):
        # One generator for the whole run: its decoding graph is traced once.
        self.generator = StoryGenerator(self.model, self.tokenizer, temperature=0.0, top_k=0, top_p=1.0,
                                        max_new_tokens_limit=SAMPLE_TOKENS)

    def on_epoch_end(self, epoch, logs=None):
        out = self.generator.generate(tf.constant(SAMPLE_PROMPTS), tf.constant(SAMPLE_TOKENS), tf.constant(0.0),
                                 tf.constant(0), tf.constant(1.0), tf.constant(0, tf.int64))
        with self.writer.as_default(step=epoch), tf.summary.record_if(True):
            for lang, prompt, story in zip(("zh", "en"), SAMPLE_PROMPTS, out["story"].numpy()):
                tf.summary.text(f"samples/{lang}", f"**{prompt}** {story.decode('utf-8', errors='replace')}")
        self.writer.flush()


def log_hparams(logdir: str, hyperparameters: dict):
    """The run's hyperparameters for TensorBoard's HParams dashboard, with its loss metrics."""
    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(
            hparams=[hparams_api.HParam(name) for name in hyperparameters],
            metrics=[hparams_api.Metric("epoch_loss", group="train"), hparams_api.Metric("epoch_loss", group="validation")])
        hparams_api.hparams(hyperparameters)


def train(train_data: tf.data.Dataset, eval_data: tf.data.Dataset, output_dir: str, *, model_config: dict,
          epochs: int, steps_per_epoch: int, tokens_per_epoch: int, validation_steps: int, learning_rate: float,
          warmup_steps: int, weight_decay: float, strategy_name: str, tokenizer, profile_steps=None,
          verbose: int = 2) -> dict:
    """Fits the model, saves `model.keras` and returns the final training and validation metrics.

    The caller seeds TensorFlow (keras.utils.set_random_seed) before it builds the datasets:
    seeding clears eager resources, the tokenizer's among them.
    """
    strategy = make_strategy(strategy_name)
    with strategy.scope():
        model = StoryTransformer(**model_config)
        model((tf.zeros([1, 1], tf.int32), tf.zeros([1, 1], tf.int32)))  # BackupAndRestore needs a built model
        optimizer = keras.optimizers.AdamW(
            learning_rate_schedule(learning_rate, warmup_steps, epochs * steps_per_epoch),
            weight_decay=weight_decay, clipnorm=1.0)
        # Biases, norms and embeddings are not decayed (the usual AdamW practice).
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embeddings"])
        model.compile(optimizer=optimizer, loss=masked_loss())
    logdir = os.path.join(output_dir, "logs")
    log_hparams(logdir, {**model_config, "epochs": epochs, "learning_rate": learning_rate, "warmup_steps": warmup_steps,
                         "weight_decay": weight_decay, "distribution_strategy": strategy_name})
    callbacks = [
        EpochStats(tokens_per_epoch, next(iter(train_data))),
        SampleStories(tokenizer, os.path.join(logdir, "samples")),
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(output_dir, "checkpoints", "epoch-{epoch:03d}.weights.h5"),
                                        save_weights_only=True),
        # Per epoch: with an integer update_freq, Keras 3.15 records only when the batch count
        # divides it, and drops the epoch summaries (ours included) otherwise.
        keras.callbacks.TensorBoard(logdir, update_freq="epoch", profile_batch=profile_steps or 0),
    ]
    # An epoch is `steps_per_epoch` batches of an endless shuffled stream: the progress bar
    # knows its length, and every epoch trains on the same number of batches.
    history = model.fit(train_data.repeat(), validation_data=eval_data, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        validation_steps=validation_steps, callbacks=callbacks, verbose=verbose)
    model.save(os.path.join(output_dir, MODEL_FILE))
    last = {key: float(values[-1]) for key, values in history.history.items()}
    last["val_perplexity"] = math.exp(min(last["val_loss"], 50.0))
    with open(os.path.join(output_dir, "history.json"), "w") as f:
        json.dump(history.history, f, indent=2, default=float)
    return last


def load_model(trainer_dir: str) -> StoryTransformer:
    return keras.saving.load_model(os.path.join(trainer_dir, MODEL_FILE))
