"""Trains the story model with a custom loop under any tf.distribute strategy.

Why not Keras `fit`: under MultiWorkerMirroredStrategy it fails in Keras 3 (keras-team/keras#20585),
and its BackupAndRestore resumes only at epoch boundaries. This loop is the same for every
strategy, from one CPU to several hosts:

- the loss is the mean over the *global* batch's non-padding target tokens: each replica
  divides its token-loss sum by the all-reduced token count, so the summed gradients equal
  one process training on the whole batch;
- gradients are clipped by their global norm after summing across replicas;
- an epoch is `steps_per_epoch` batches of an endless, deterministically shuffled stream, so
  the optimizer's step count alone says where training is; a checkpoint (model, optimizer and
  its step) every `checkpoint_every_steps` steps lets a killed run resume mid-epoch: the stream
  is skipped to that step and no batch is trained twice or skipped;
- TensorBoard gets per-step loss, learning rate and gradient norm, per-epoch losses,
  perplexities, tokens per second, sample stories from fixed prompts, the run's
  hyperparameters, and a profiler trace on request. Only the chief writes logs.
"""

import dataclasses
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorboard.plugins.hparams import api as hparams_api

from components import transform
from components.common import OUTPUT_LOSS_LOOP, PAD_ID, UserError
from components.config import SCHEDULES, STRATEGIES, ModelConfig, TrainingConfig
from components.model import build_model, presets, save_model
from components.model.decoding import StoryGenerator
from components.progress import Progress

HISTORY_FILE = "history.json"
CHECKPOINT_DIR = "checkpoints"
SAMPLE_PROMPTS = ("从前有座山，山里有座庙，庙里住着一个小和尚，名叫阿福。",
                  "Once upon a time, in a faraway kingdom, there lived a poor tailor named Hans.")
SAMPLE_TOKENS = 96


def make_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """The tf.distribute strategy named by --distribution_strategy (multi-worker reads TF_CONFIG)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise UserError(f"No TPU found (--tpu='{tpu}'): {e}") from e
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"Unknown --distribution_strategy '{name}': use one of {', '.join(STRATEGIES)}.")


def is_chief(strategy_name: str) -> bool:
    """Whether this process writes logs and drives the rest of the pipeline: always, except
    under multi_worker_mirrored, where only TF_CONFIG's chief (or worker 0 when the cluster
    has no chief) does."""
    if strategy_name != "multi_worker_mirrored":
        return True
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


@keras.saving.register_keras_serializable(package="storygen")
class InverseSquareRootDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then decay as 1/sqrt(step) (the original Transformer schedule).

    >>> schedule = InverseSquareRootDecay(1e-3, warmup_steps=100)
    >>> [round(float(schedule(s)), 6) for s in (50, 100, 400)]
    [0.0005, 0.001, 0.0005]
    """

    def __init__(self, peak: float, warmup_steps: int):
        self.peak = peak
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        return self.peak * tf.minimum(step / warmup, tf.math.rsqrt(tf.maximum(step, warmup) / warmup))

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


# How often a run with a time budget re-estimates the step at which the budget ends it.
REPLAN_STEPS = 100
# Warm-up takes at most this share of a run's steps: a short run (a small corpus) must not spend
# itself warming up.
MAX_WARMUP_FRACTION = 0.1


@keras.saving.register_keras_serializable(package="storygen")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to 10% of the peak at the end of the run.

    The decay ends at `total_steps`, or at `decay_end`, a variable the training loop lowers when
    a time budget will end the run sooner, so that such a run still ends decayed.

    >>> schedule = WarmupCosineDecay(1e-3, warmup_steps=10, total_steps=110)
    >>> [round(float(schedule(s)), 6) for s in (5, 10, 60, 110)]
    [0.0005, 0.001, 0.00055, 0.0001]
    """

    ALPHA = 0.1

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay_end: tf.Variable | None = None):
        self.peak = peak
        self.warmup_steps = max(warmup_steps, 1)
        self.total_steps = max(total_steps, self.warmup_steps + 1)
        self.decay_end = decay_end

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        end = float(self.total_steps) if self.decay_end is None else tf.cast(self.decay_end, tf.float32)
        end = tf.maximum(end, self.warmup_steps + 1.0)
        decayed = tf.clip_by_value((step - self.warmup_steps) / (end - self.warmup_steps), 0.0, 1.0)
        cosine = self.ALPHA + (1.0 - self.ALPHA) * 0.5 * (1.0 + tf.cos(math.pi * decayed))
        return self.peak * tf.where(step < self.warmup_steps, step / self.warmup_steps, cosine)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str = "cosine",
                           decay_end: tf.Variable | None = None):
    """Linear warm-up from 0 to `peak` over `warmup_steps` (at most MAX_WARMUP_FRACTION of the
    run), then cosine decay to 10% of peak at the run's end (`WarmupCosineDecay`), or
    inverse-square-root decay."""
    warmup_steps = max(min(warmup_steps, int(total_steps * MAX_WARMUP_FRACTION)), 1)
    if kind == "inverse_sqrt":
        return InverseSquareRootDecay(peak, warmup_steps)
    if kind != "cosine":
        raise UserError(f"Unknown --lr_schedule '{kind}': use one of {', '.join(SCHEDULES)}.")
    return WarmupCosineDecay(peak, warmup_steps, total_steps, decay_end)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   schedule: str = "cosine", decay_end: tf.Variable | None = None) -> keras.optimizers.AdamW:
    """AdamW on the schedule; biases, norms and embeddings are not decayed (the usual practice).
    Gradient clipping is the training loop's job: Keras would clip each replica's part."""
    optimizer = keras.optimizers.AdamW(
        learning_rate_schedule(learning_rate, warmup_steps, total_steps, schedule, decay_end),
        weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embeddings"])
    return optimizer


# Target positions per chunk of `output_loss_sum`: 256 x an 8000-piece vocabulary of float32 logits
# is 8 MB. On this project's 2-core Xeon, training steps were fastest with 256 of 128, 256 and 512
# (fp32 and bf16); 1024 and 2048 were slower again in a test of the loss alone.
LOSS_CHUNK_ROWS = 256
# float32's smallest normal number: the floor of a target's probability in `output_loss_sum`.
SMALLEST_PROBABILITY = 1.1754944e-38


def smoothed_nll(nll, target_logits, logits, label_smoothing: float):
    """The label-smoothed cross-entropy from the plain one (`nll`, per position): the target
    distribution puts `label_smoothing` evenly on the vocabulary and the rest on the target, so
    the loss is (1 - s) * nll - s * mean log p, where mean log p = mean(logits) - logsumexp(logits)
    and logsumexp(logits) = target logit + nll.
    """
    log_sum_exp = target_logits + nll
    return (1.0 - label_smoothing) * nll - label_smoothing * (tf.reduce_mean(logits, axis=-1) - log_sum_exp)


def token_loss_sum(targets, logits, label_smoothing: float = 0.0, pad_id: int = PAD_ID):
    """Summed cross-entropy over the non-padding targets, and their count (float32).

    With label smoothing the target distribution puts `label_smoothing` evenly on the whole
    vocabulary and the rest on the true token.
    """
    logits = tf.cast(logits, tf.float32)
    mask = tf.cast(tf.not_equal(targets, pad_id), tf.float32)
    # The fused kernel makes the loss and its gradient in one pass over the [B, T, V] logits,
    # without keeping log-probabilities: this loss reads the largest tensor of the step.
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    if label_smoothing:
        nll = smoothed_nll(nll, tf.gather(logits, targets, batch_dims=2), logits, label_smoothing)
    return tf.reduce_sum(nll * mask), tf.reduce_sum(mask)


def output_loss_sum(targets, states, embeddings, label_smoothing: float = 0.0, chunk_rows: int = LOSS_CHUNK_ROWS,
                    pad_id: int = PAD_ID, logit_soft_cap: float | None = None):
    """`token_loss_sum(targets, states @ embeddings^T)` and its gradients, computed
    `chunk_rows` target positions at a time.

    The logits of a batch are the step's largest tensor (32 x 350 x 8000 floats is 358 MB):
    made whole, they go through memory several times for the softmax and its gradient. Here
    each chunk's logits stay in the cache: the chunk's losses and their gradient (softmax
    minus the targets) are made together and at once multiplied into the gradients of the
    states and of the embeddings; the backward pass only scales those by its upstream value.

    states: [B, T, d] (float32 or bfloat16); embeddings: [V, d], cast to the states' dtype.
    logit_soft_cap: the logits are soft_cap * tanh(states @ embeddings^T / soft_cap) (Gemma's).
    A target whose probability underflows float32 (its logit 87 or more below the largest)
    counts as `-log(SMALLEST_PROBABILITY)`, 87.3 nats, in the loss; its gradient is exact.
    """
    d_model = tf.shape(states)[-1]
    rows = tf.reshape(states, [-1, d_model])
    labels = tf.reshape(targets, [-1])
    mask = tf.cast(tf.not_equal(labels, pad_id), tf.float32)

    @tf.custom_gradient
    def loss_sum(rows, weights):
        vocab_size, count = tf.shape(weights)[0], tf.shape(rows)[0]
        chunks = (count + chunk_rows - 1) // chunk_rows
        # Padded to whole chunks (padding is masked out): every chunk has one shape, as XLA needs.
        extra = chunks * chunk_rows - count
        chunked_rows = tf.reshape(tf.pad(rows, [[0, extra], [0, 0]]), [chunks, chunk_rows, d_model])
        chunked_labels = tf.reshape(tf.pad(labels, [[0, extra]]), [chunks, chunk_rows])
        chunked_mask = tf.reshape(tf.pad(mask, [[0, extra]]), [chunks, chunk_rows])

        def chunk(i, total, row_gradients, weight_gradient):
            x, y, keep = chunked_rows[i], chunked_labels[i], chunked_mask[i]
            logits = tf.cast(tf.matmul(x, weights, transpose_b=True), tf.float32)
            if logit_soft_cap:
                squashed = tf.tanh(logits / logit_soft_cap)
                logits = logit_soft_cap * squashed
            # One softmax (oneDNN's kernel) instead of log_softmax and exp: 2.4x faster on a
            # 256 x 8000 chunk; the loss needs only the targets' log-probabilities.
            probs = tf.nn.softmax(logits)
            nll = -tf.math.log(tf.maximum(tf.gather(probs, y, batch_dims=1), SMALLEST_PROBABILITY))
            # The gradient of the (smoothed) loss is softmax minus the target distribution:
            # 1 - label_smoothing on the target, label_smoothing spread evenly over the vocabulary.
            # (TensorFlow's fused SparseSoftmaxCrossEntropyWithLogits kernel took 1.7x as long.)
            if label_smoothing:
                nll = smoothed_nll(nll, tf.gather(logits, y, batch_dims=1), logits, label_smoothing)
                probs -= label_smoothing / tf.cast(vocab_size, tf.float32)
            targets_at = tf.stack([tf.range(chunk_rows), y], axis=1)
            gradient = tf.tensor_scatter_nd_sub(probs, targets_at, tf.fill([chunk_rows], 1.0 - label_smoothing))
            if logit_soft_cap:
                gradient *= 1.0 - tf.square(squashed)  # d tanh(u) = 1 - tanh(u)^2
            gradient = tf.cast(gradient, rows.dtype)
            # Padding positions get no gradient: masking the chunk's states and its state
            # gradients ([rows, d]) costs less than masking the [rows, V] gradient.
            keep_rows = tf.cast(keep[:, None], rows.dtype)
            return (i + 1, total + tf.reduce_sum(nll * keep),
                    row_gradients.write(i, tf.matmul(gradient, weights) * keep_rows),
                    weight_gradient + tf.cast(tf.matmul(gradient, x * keep_rows, transpose_a=True), tf.float32))

        _, total, row_gradients, weight_gradient = tf.while_loop(
            lambda i, *_: i < chunks, chunk,
            (0, tf.constant(0.0), tf.TensorArray(rows.dtype, size=chunks, element_shape=[chunk_rows, None]),
             tf.zeros(tf.shape(weights), tf.float32)),
            name=OUTPUT_LOSS_LOOP)
        row_gradients = tf.reshape(row_gradients.stack(), [-1, d_model])[:count]

        def gradient(upstream):
            return tf.cast(upstream, rows.dtype) * row_gradients, tf.cast(upstream * weight_gradient, weights.dtype)

        return total, gradient

    return loss_sum(rows, tf.cast(tf.convert_to_tensor(embeddings), states.dtype)), tf.reduce_sum(mask)


def bf16_supported() -> bool:
    """Whether mixed bfloat16 pays off: a GPU/TPU, or a CPU with native bf16 instructions."""
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Trainer:
    """One training run: the strategy, model, optimizer, compiled steps and checkpoints.

    Example (see `train` for the pipeline's use):
    >>> trainer = Trainer(ModelConfig(), TrainingConfig(), total_steps=100)                # doctest: +SKIP
    >>> history = trainer.fit(train_batches, eval_batches, steps_per_epoch=50, epochs=2)  # doctest: +SKIP
    """

    def __init__(self, model_config: ModelConfig, training: TrainingConfig, *, total_steps: int,
                 strategy: tf.distribute.Strategy | None = None, chief: bool = True,
                 model: keras.Model | None = None):
        """training: the optimizer, schedule, clipping, label smoothing and precision (the loop's
        own settings are `fit`'s arguments); strategy: made by `make_strategy` (multi-worker: at
        program start, before other TensorFlow work); chief: whether this process writes logs
        (see `is_chief`); model: an already built model to go on training (KerasTuner's
        Hyperband hands a trial its parent's weights); by default a new one is built."""
        self.model_config = model_config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = chief
        self.label_smoothing = training.label_smoothing
        self.clip_norm = training.clip_norm
        self.mixed_precision = training.mixed_precision and bf16_supported()
        if training.mixed_precision and not self.mixed_precision:
            logging.info("--mixed_precision: no bf16 support on this machine; training in float32.")
        # The step the learning rate decays to: total_steps, or sooner when early stopping or fit's time budget
        # will end the run.
        self.decay_end = tf.Variable(float(total_steps), trainable=False)
        policy = keras.config.dtype_policy()
        try:
            keras.config.set_dtype_policy("mixed_bfloat16" if self.mixed_precision else "float32")
            with self.strategy.scope():
                self.model = model or build_model(model_config)
                self.optimizer = make_optimizer(training.learning_rate, training.warmup_steps, total_steps,
                                                training.weight_decay, training.lr_schedule, self.decay_end)
                self.optimizer.build(self.model.trainable_variables)
        finally:
            keras.config.set_dtype_policy(policy)
        # What gets saved and writes the sample stories: a float32 copy (bf16 is for training speed),
        # whose weights are always copied from the trained model's.
        self.float32_model = build_model(model_config, load_weights=False)
        # The epoch's running sums (loss, tokens, gradient norms, steps) as of the last checkpoint,
        # so that a run resumed mid-epoch reports the same epoch metrics as an uninterrupted one.
        self.epoch_sums = tf.Variable(tf.zeros([4], tf.float64), trainable=False)
        # The weights of the epoch with the lowest validation loss, which training ends with;
        # checkpointed, so a resumed run still has them.
        self.best_weights = [tf.Variable(v, trainable=False) for v in self.model.variables]
        self.checkpoint = tf.train.Checkpoint(model=list(self.model.variables), optimizer=list(self.optimizer.variables),
                                              epoch_sums=self.epoch_sums, best_weights=self.best_weights)
        # XLA compiles each replica's step; the input iterator stays outside it.
        self._replica_step = tf.function(self._replica_train_step, jit_compile=True) if training.jit_compile \
            else self._replica_train_step
        self.train_step = tf.function(self._distributed_train_step)
        # Evaluation batches come in many lengths: one trace for all of them.
        self._eval_step = tf.function(self._distributed_eval_step, reduce_retracing=True)

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # ------------------------------------------------------------------ compiled steps

    def _distributed_train_step(self, iterator):
        """`train_step(iterator)`, compiled: one optimizer step on the iterator's next global
        batch; returns (loss sum, token count, gradient norm)."""
        loss_sum, tokens, norm = self.strategy.run(self._replica_step, (next(iterator),))
        reduce = self.strategy.reduce
        return (reduce(tf.distribute.ReduceOp.SUM, loss_sum, None), reduce(tf.distribute.ReduceOp.SUM, tokens, None),
                reduce(tf.distribute.ReduceOp.MEAN, norm, None))

    def _replica_train_step(self, batch):
        (encoder_ids, decoder_ids), targets = batch
        context = tf.distribute.get_replica_context()
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            states = self.model.final_states(encoder_ids, decoder_ids, training=True)
            loss_sum, tokens = output_loss_sum(targets, states, self.model.output_embeddings, self.label_smoothing,
                                               pad_id=self.model.special.pad, logit_soft_cap=self.model.logit_soft_cap)
            global_tokens = context.all_reduce(tf.distribute.ReduceOp.SUM, tokens)
            loss = loss_sum / tf.maximum(global_tokens, 1.0)
        gradients = tape.gradient(loss, variables)
        # The optimizer sums the replicas' gradients; their global norm needs that sum first.
        summed = gradients if context.num_replicas_in_sync == 1 else context.all_reduce(
            tf.distribute.ReduceOp.SUM, gradients)
        norm = tf.linalg.global_norm(summed)
        if self.clip_norm:
            gradients, _ = tf.clip_by_global_norm(gradients, self.clip_norm, use_norm=norm)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return loss_sum, tokens, norm

    def _distributed_eval_step(self, batch):
        def replica_step(batch):
            (encoder_ids, decoder_ids), targets = batch
            return token_loss_sum(targets, self.model((encoder_ids, decoder_ids), training=False),
                                  pad_id=self.model.special.pad)

        loss_sum, tokens = self.strategy.run(replica_step, (batch,))
        return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, None),
                self.strategy.reduce(tf.distribute.ReduceOp.SUM, tokens, None))

    # ------------------------------------------------------------------ the loop

    def evaluate(self, eval_data: tf.data.Dataset) -> float:
        """Mean cross-entropy per non-padding target token over the whole dataset."""
        loss_sum = tokens = 0.0
        for batch in self.strategy.experimental_distribute_dataset(_shard_by_data(eval_data)):
            batch_loss, batch_tokens = self._eval_step(batch)
            loss_sum, tokens = loss_sum + float(batch_loss), tokens + float(batch_tokens)
        return loss_sum / max(tokens, 1.0)

    def fit(self, train_data: tf.data.Dataset, eval_data: tf.data.Dataset, *, steps_per_epoch: int,
            epochs: int, total_steps: int | None = None, output_dir: str | None = None,
            checkpoint_every_steps: int = 100, early_stopping_patience: int = 0, time_budget: float | None = None,
            tokenizer=None, callbacks=(), profile_steps=None) -> dict:
        """Trains to `total_steps` (default: epochs x steps_per_epoch), evaluating at each epoch's end.

        train_data: ((encoder_ids, decoder_ids), targets) batches, shuffled deterministically
        (the same seed gives the same stream, so a resumed run can skip to its step): the
        endless stream of `transform.training_batches`, or one pass, which is repeated.
        Returns the history: per-epoch lists of loss, val_loss, perplexity, val_perplexity,
        tokens_per_second, learning_rate and gradient_norm, how it ended, and `best_epoch` (from
        1): the model ends with the weights of the epoch with the lowest validation loss.
        A time budget ends the run early, and the learning rate then decays to where the budget
        will end it (`_plan_decay`); so does early stopping, once an epoch fails to improve
        (`_early_stopping_decay_end`).
        Keras `callbacks` get on_train_begin/on_epoch_begin/on_epoch_end/on_train_end (KerasTuner
        trials use them); one setting `model.stop_training` ends training after that epoch.

        With `output_dir`, checkpoints go to its checkpoints/ folder and a rerun resumes from
        the newest one; history.json is rewritten each epoch; the chief logs to its logs/ folder.
        """
        total_steps = total_steps or epochs * steps_per_epoch
        manager, history = self._resume(output_dir, steps_per_epoch) if output_dir else (None, {})
        history_path = output_dir and os.path.join(output_dir, HISTORY_FILE)
        writers = _Writers(os.path.join(output_dir, "logs") if output_dir and self.chief else None, tokenizer,
                           self.float32_model)
        callbacks = keras.callbacks.CallbackList(list(callbacks), model=self.model)
        self.model.stop_training = False
        callbacks.on_train_begin()
        stream = train_data.repeat().skip(self.step)
        iterator = iter(self.strategy.experimental_distribute_dataset(_shard_by_data(stream)))
        start_time, stopped, last_plan = time.time(), "completed", None
        # Every 10 s: the step, the epoch, its mean loss, tokens per second and the time left.
        progress = Progress("trainer", "step", total_steps, done=self.step,
                            deadline=start_time + time_budget if time_budget else None)
        epochs_in_total, session_tokens = math.ceil(total_steps / steps_per_epoch), 0.0
        # Where the decay ends unless the time budget ends the run sooner (a resumed run's history counts).
        planned_end = self._plan_early_stopping_decay(history.get("val_loss", []), early_stopping_patience,
                                                      steps_per_epoch, total_steps)
        while self.step < total_steps:
            epoch = self.step // steps_per_epoch
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            callbacks.on_epoch_begin(epoch)
            if self.step == epoch * steps_per_epoch:
                self.epoch_sums.assign(tf.zeros([4], tf.float64))
            loss_sum, tokens, norm_sum, steps = self.epoch_sums.numpy().tolist()
            epoch_start, epoch_tokens = time.time(), 0.0
            while self.step < epoch_end:
                step = self.step
                if time_budget and step % REPLAN_STEPS == 0:
                    last_plan = self._plan_decay(step, planned_end, time_budget, start_time, last_plan)
                if profile_steps and step == profile_steps[0] and writers.train_dir:
                    tf.profiler.experimental.start(writers.train_dir)
                batch_loss, batch_tokens, norm = self.train_step(iterator)
                if profile_steps and step == profile_steps[1] and writers.train_dir:
                    tf.profiler.experimental.stop()
                batch_loss, batch_tokens, norm = float(batch_loss), float(batch_tokens), float(norm)
                loss_sum, tokens, norm_sum, steps = loss_sum + batch_loss, tokens + batch_tokens, norm_sum + norm, steps + 1
                epoch_tokens += batch_tokens
                session_tokens += batch_tokens
                progress.update(step + 1, lambda: f" (epoch {epoch + 1}/{epochs_in_total}), loss "
                                f"{loss_sum / max(tokens, 1.0):.4f}, {session_tokens / progress.elapsed():.0f} tokens/s")
                writers.step_scalars(step + 1, loss=batch_loss / max(batch_tokens, 1.0),
                                     learning_rate=self._learning_rate(), gradient_norm=norm)
                if manager and (step + 1) % checkpoint_every_steps == 0:
                    self.epoch_sums.assign([loss_sum, tokens, norm_sum, steps])
                    manager.save(checkpoint_number=step + 1)
                    print(f"[trainer] checkpoint at step {step + 1}", flush=True)
                if time_budget and time.time() - start_time > time_budget:
                    stopped = "time_budget"
                    break
            logs = self._epoch_logs(loss_sum / max(tokens, 1.0), self.evaluate(eval_data), norm_sum / max(steps, 1),
                                    epoch_tokens / max(time.time() - epoch_start, 1e-9))
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            if logs["val_loss"] <= min(history["val_loss"]):
                for best, variable in zip(self.best_weights, self.model.variables):
                    best.assign(variable)
            planned_end = self._plan_early_stopping_decay(history["val_loss"], early_stopping_patience,
                                                          steps_per_epoch, total_steps)
            self._copy_to_float32_model()
            writers.epoch_summaries(epoch, logs)
            print(f"[trainer] epoch {epoch + 1}: step {self.step}, loss {logs['loss']:.4f}, val_loss "
                  f"{logs['val_loss']:.4f}, {logs['tokens_per_second']:.0f} tokens/s", flush=True)
            callbacks.on_epoch_end(epoch, dict(logs))
            if manager:
                _write_json(history_path, history)
                self.epoch_sums.assign([loss_sum, tokens, norm_sum, steps])
                manager.save(checkpoint_number=self.step)
            if (stopped == "completed" and self.step < total_steps
                    and _no_improvement(history["val_loss"], early_stopping_patience)):
                stopped = "early_stopping"
            if self.model.stop_training and stopped == "completed":
                stopped = "callback"
            if stopped != "completed":
                break
        callbacks.on_train_end()
        if stopped != "completed":
            print(f"[trainer] stopped at step {self.step}: {stopped.replace('_', ' ')}", flush=True)
        best_epoch = int(np.argmin(history["val_loss"])) + 1 if history.get("val_loss") else None
        if best_epoch and best_epoch < len(history["val_loss"]):
            for variable, best in zip(self.model.variables, self.best_weights):
                variable.assign(best)
            print(f"[trainer] kept the weights of epoch {best_epoch} (val_loss {history['val_loss'][best_epoch - 1]:.4f}"
                  f", the lowest; the last epoch's was {history['val_loss'][-1]:.4f})", flush=True)
        self._copy_to_float32_model()
        return dict(history, stopped=stopped, steps=self.step, best_epoch=best_epoch)

    def _plan_decay(self, step: int, planned_end: int, time_budget: float, start_time: float, last_plan):
        """Where the time budget will end the run, from the rate of the last REPLAN_STEPS steps
        (the first interval, with its tracing, only starts the clock): the learning rate decays to
        that step. A run that fits its budget keeps planned_end (its last step, or early
        stopping's), and stays deterministic."""
        now = time.time()
        if last_plan is not None and now > last_plan:
            rate = REPLAN_STEPS / (now - last_plan)
            left = max(time_budget - (now - start_time), 0.0)
            self.decay_end.assign(min(float(planned_end), step + left * rate))
        return now

    def _plan_early_stopping_decay(self, val_losses, patience: int, steps_per_epoch: int, total_steps: int) -> int:
        """Brings the end of the decay forward to where early stopping will end the run
        (`_early_stopping_decay_end`), if it will, and returns where the run ends unless a time
        budget ends it sooner. Otherwise the decay keeps its end: the whole run's, which a fit
        of fewer steps (a run killed and resumed later) must not move."""
        stop = _early_stopping_decay_end(val_losses, patience, steps_per_epoch)
        if stop is None:
            return total_steps
        self.decay_end.assign(min(float(self.decay_end.numpy()), stop))
        return min(total_steps, stop)

    def _epoch_logs(self, loss: float, val_loss: float, gradient_norm: float, tokens_per_second: float) -> dict:
        """An epoch's history entry (what the Keras callbacks get as `logs`)."""
        return {"loss": loss, "val_loss": val_loss, "tokens_per_second": tokens_per_second,
                "learning_rate": self._learning_rate(), "gradient_norm": gradient_norm,
                "perplexity": math.exp(min(loss, 50.0)), "val_perplexity": math.exp(min(val_loss, 50.0))}

    def _resume(self, output_dir: str, steps_per_epoch: int):
        """The checkpoint manager of `output_dir`, restored from its newest checkpoint if there
        is one, and the history of the epochs that checkpoint has finished (a crash may have
        cut the last)."""
        manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(output_dir, CHECKPOINT_DIR), max_to_keep=2)
        if manager.latest_checkpoint:
            self.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            epoch, batch = divmod(self.step, steps_per_epoch)
            print(f"[trainer] resumed from {manager.latest_checkpoint} at step {self.step} "
                  f"(epoch {epoch + 1}, batch {batch} of {steps_per_epoch})", flush=True)
        history = {}
        history_path = os.path.join(output_dir, HISTORY_FILE)
        if os.path.exists(history_path):
            with open(history_path, encoding="utf-8") as f:
                history = {key: values for key, values in json.load(f).items() if isinstance(values, list)}
        done_epochs = self.step // steps_per_epoch
        return manager, {key: values[:done_epochs] for key, values in history.items()}

    def _learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def _copy_to_float32_model(self):
        for target, source in zip(self.float32_model.variables, self.model.variables):
            target.assign(tf.cast(source, target.dtype))


class _Writers:
    """TensorBoard writers of the chief: train/ and validation/ scalars, samples/ text."""

    def __init__(self, logdir, tokenizer, model):
        self.train_dir = os.path.join(logdir, "train") if logdir else None
        if not logdir:
            return
        self.train = tf.summary.create_file_writer(self.train_dir)
        self.validation = tf.summary.create_file_writer(os.path.join(logdir, "validation"))
        self.samples = tf.summary.create_file_writer(os.path.join(logdir, "samples")) if tokenizer else None
        # One generator for the whole run: its decoding graph is traced once.
        self.generator = tokenizer and StoryGenerator(model, tokenizer, temperature=0.0, top_k=0, top_p=1.0,
                                                      max_new_tokens_limit=SAMPLE_TOKENS)

    def step_scalars(self, step, **values):
        if self.train_dir:
            with self.train.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(f"batch_{name}", value)

    def epoch_summaries(self, epoch, logs):
        if not self.train_dir:
            return
        with self.train.as_default(step=epoch):
            for name in ("loss", "perplexity", "learning_rate", "tokens_per_second", "gradient_norm"):
                tf.summary.scalar(f"epoch_{name}", logs[name])
        with self.validation.as_default(step=epoch):
            tf.summary.scalar("epoch_loss", logs["val_loss"])
            tf.summary.scalar("epoch_perplexity", logs["val_perplexity"])
        if self.samples:
            out = self.generator.generate(tf.constant(SAMPLE_PROMPTS), tf.constant(SAMPLE_TOKENS), tf.constant(0.0),
                                          tf.constant(0), tf.constant(1.0), tf.constant(0, tf.int64))
            with self.samples.as_default(step=epoch):
                for lang, prompt, story in zip(("zh", "en"), SAMPLE_PROMPTS, out["story"].numpy()):
                    tf.summary.text(f"samples/{lang}", f"**{prompt}** {story.decode('utf-8', errors='replace')}")
        for writer in (self.train, self.validation, self.samples):
            if writer:
                writer.flush()


def _no_improvement(val_losses, patience: int) -> bool:
    """Early stopping: the last `patience` epochs did not beat the best before them."""
    return bool(patience) and len(val_losses) > patience and min(val_losses[-patience:]) >= min(val_losses[:-patience])


def _early_stopping_decay_end(val_losses, patience: int, steps_per_epoch: int) -> int | None:
    """The step the learning rate decays to under early stopping: from the first epoch that does
    not beat the best before it, the step where early stopping would end the run (`patience`
    epochs after that best), so that a run it stops ends annealed. A later improvement goes on
    at the lowered rate: the end only ever moves closer. None while every epoch has improved,
    and without early stopping.

    >>> _early_stopping_decay_end([3.0, 2.0, 2.1, 1.9], patience=2, steps_per_epoch=10)
    40
    """
    end, best = None, None  # best: the epoch (from 1) with the lowest loss so far
    for epoch, loss in enumerate(val_losses, start=1):
        if best is None or loss < val_losses[best - 1]:
            best = epoch
        elif patience:
            stop = (best + patience) * steps_per_epoch
            end = stop if end is None else min(end, stop)
    return end


def _shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Workers split every global batch between them (not the input files), so a cluster trains
    on exactly the batches one process would."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _write_json(path: str, value):
    """Written whole or not at all: a crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=float)
    os.replace(path + ".tmp", path)


def log_hparams(logdir: str, hyperparameters: dict):
    """The run's hyperparameters for TensorBoard's HParams dashboard, with its loss metrics."""
    with tf.summary.create_file_writer(logdir).as_default():
        hparams_api.hparams_config(
            hparams=[hparams_api.HParam(name) for name in hyperparameters],
            metrics=[hparams_api.Metric("epoch_loss", group="train"), hparams_api.Metric("epoch_loss", group="validation")])
        hparams_api.hparams(hyperparameters)


def datasets(examples_dir: str, tokenizer, model_config: ModelConfig, batch_size: int, seed: int):
    """The endless shuffled training stream, one pass over the eval split, and the steps of an epoch."""
    limits = dict(max_prompt_tokens=model_config.max_prompt_tokens, max_story_tokens=model_config.max_story_tokens)
    train_data = transform.training_batches(examples_dir, "train", tokenizer, batch_size=batch_size, shuffle=True,
                                            seed=seed, **limits)
    eval_data = transform.training_batches(examples_dir, "eval", tokenizer, batch_size=batch_size, shuffle=False,
                                           **limits)
    return train_data, eval_data, transform.batches_per_epoch(examples_dir, "train", batch_size)


def train(examples_dir: str, tokenizer, output_dir: str, model_config: ModelConfig, training: TrainingConfig, *,
          strategy: tf.distribute.Strategy | None = None) -> dict:
    """The pipeline's trainer step: trains on the ingested examples (resuming from `output_dir`'s
    checkpoints when a crashed attempt left some), saves `model.keras` and `history.json`, and
    returns the final metrics.

    strategy: the strategy that `training.distribution_strategy` names, when the caller made it
    at program start (multi-worker needs that). The caller seeds TensorFlow
    (keras.utils.set_random_seed) first: seeding clears eager resources, the tokenizer's among them.
    """
    strategy = strategy or make_strategy(training.distribution_strategy, training.tpu)
    train_data, eval_data, steps_per_epoch = datasets(examples_dir, tokenizer, model_config, training.batch_size,
                                                      training.seed)
    total_steps = training.steps or training.epochs * steps_per_epoch
    trainer = Trainer(model_config, training, total_steps=total_steps, strategy=strategy,
                      chief=is_chief(training.distribution_strategy))
    if trainer.chief:
        hparams = {key: value for key, value in dataclasses.asdict(model_config).items() if value is not None}
        if model_config.init_from:
            hparams.update(presets.preset_shape(trainer.model))  # the preset's shape, not the flags'
        log_hparams(os.path.join(output_dir, "logs"), {
            **hparams, "steps": total_steps, "mixed_precision": trainer.mixed_precision,
            **{key: getattr(training, key) for key in ("epochs", "learning_rate", "warmup_steps", "weight_decay",
                                                      "lr_schedule", "label_smoothing", "clip_norm",
                                                      "distribution_strategy")}})
    history = trainer.fit(train_data, eval_data, steps_per_epoch=steps_per_epoch, epochs=training.epochs,
                          total_steps=total_steps, output_dir=output_dir,
                          checkpoint_every_steps=training.checkpoint_every_steps,
                          early_stopping_patience=training.early_stopping_patience,
                          time_budget=training.time_budget or None, tokenizer=tokenizer,
                          profile_steps=training.profile_steps)
    save_model(trainer.float32_model, output_dir)
    _write_json(os.path.join(output_dir, HISTORY_FILE), history)
    # The saved model is the best epoch's: its numbers.
    best = history["best_epoch"] - 1
    metrics = {key: values[best] for key, values in history.items() if isinstance(values, list) and values}
    return dict(metrics, epochs=len(history.get("loss", [])), best_epoch=history["best_epoch"],
                steps=history["steps"], stopped=history["stopped"],
                replicas=trainer.strategy.num_replicas_in_sync, mixed_precision=trainer.mixed_precision)


def describe(metrics: dict) -> str:
    """The pipeline's one-line summary of the trainer step."""
    return (f"{metrics['steps']} steps, loss {metrics['loss']:.3f}, val_loss {metrics['val_loss']:.3f} "
            f"(val perplexity {metrics['val_perplexity']:.1f}), {metrics['tokens_per_second']:.0f} tokens/s"
            + ("" if metrics["stopped"] == "completed" else f", stopped: {metrics['stopped']}"))
