"""Trains the story model with Keras `fit` under a tf.distribute strategy.

AdamW with a linear warm-up then cosine decay, gradient clipping, a checkpoint per epoch,
BackupAndRestore so that a rerun of the same command resumes an interrupted run at its
last finished epoch, and TensorBoard logs.
"""

import json
import math
import os
import time

import keras
import tensorflow as tf

from components.common import PAD_ID, UserError
from components.model import StoryTransformer

MODEL_FILE = "model.keras"
STRATEGIES = ("default", "one_device", "mirrored")


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


class ThroughputLogger(keras.callbacks.Callback):
    """Adds tokens per second (non-padding target tokens) and the learning rate to the logs."""

    def __init__(self, tokens_per_epoch: int):
        super().__init__()
        self.tokens_per_epoch = tokens_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["tokens_per_second"] = self.tokens_per_epoch / max(time.time() - self._start, 1e-9)
            optimizer = self.model.optimizer
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def train(train_data: tf.data.Dataset, eval_data: tf.data.Dataset, output_dir: str, *, model_config: dict,
          epochs: int, steps_per_epoch: int, tokens_per_epoch: int, validation_steps: int, learning_rate: float,
          warmup_steps: int,
          weight_decay: float, strategy_name: str, verbose: int = 2) -> dict:
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
    callbacks = [
        ThroughputLogger(tokens_per_epoch),
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(output_dir, "checkpoints", "epoch-{epoch:03d}.weights.h5"),
                                        save_weights_only=True),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "logs"), update_freq="epoch"),
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
