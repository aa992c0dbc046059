"""Decoding speed: the exported SavedModel against peers, side by side in one process.

    python -m benchmarks.decoding [--quick]

Peers, all greedy on random weights of the same size (4+4 layers, d_model 256, 4 heads,
feed-forward 1024, vocab 8000), decoding `--new_tokens` tokens after a short prompt:
- storygen: the exported `generate` signature (a tf.while_loop over a key/value cache written
  in place, plain TensorFlow ops per token, no XLA), loaded back with tf.saved_model.load as
  TF Serving would (measured as fast as the same generator called in process);
- recompute: the same Keras model, a tf.function that re-runs the decoder over the whole
  prefix at every step (no cache);
- keras-hub: `BartSeq2SeqLM.generate()` (its cached sampler, XLA-compiled as keras-hub does
  by default on the TensorFlow backend), built without presets.
Each is warmed up once, then timed `--repeats` times alternating with the others; the table
gives median tokens per second, the spread (min-max) and storygen's ratio to each peer.
"""

import io
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

flags.DEFINE_bool("quick", False, "Fewer tokens and repeats, for a smoke run.")
flags.DEFINE_integer("new_tokens", 256, "Tokens to decode per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed runs per peer and batch size.")
flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to measure.")
FLAGS = flags.FLAGS

VOCAB, D_MODEL, LAYERS, HEADS, FF = 8000, 256, 4, 4, 1024
PROMPT_TOKENS = 8


def make_tokenizer_proto(vocab_size):
    """A SentencePiece model of the wanted size, trained on synthetic words (the benchmark
    times decoding, not text quality)."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    sentences = (" ".join(rng.choice(words) for _ in range(30)) for _ in range(30000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
                                   byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    return model.getvalue()


def storygen_peer(new_tokens):
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from components import exporter
    from components.common import BOS_ID
    from components.model import StoryTransformer
    from components.tokenizer import make_tokenizer

    keras.utils.set_random_seed(0)
    model = StoryTransformer(vocab_size=VOCAB, max_prompt_tokens=64, max_story_tokens=new_tokens + 1,
                             d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, ff_dim=FF)
    model((tf.ones([1, 2], tf.int32), tf.ones([1, 2], tf.int32)))
    proto = make_tokenizer_proto(VOCAB)
    path = exporter.export(model, make_tokenizer(proto), tempfile.mkdtemp(), temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens_limit=new_tokens)
    generate = tf.saved_model.load(path).signatures["generate"]
    prompt = "abc defg hij klmno pq"

    def run_storygen(batch):
        out = generate(prompt=tf.constant([prompt] * batch), max_new_tokens=tf.constant(new_tokens),
                       temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                       seed=tf.constant(0, tf.int64))
        return int(tf.reduce_sum(out["num_tokens"]))

    @tf.function(reduce_retracing=True)
    def recompute(encoder_ids):
        batch = tf.shape(encoder_ids)[0]
        states, mask = model.encode(encoder_ids)
        tokens = tf.concat([tf.fill([batch, 1], BOS_ID), tf.zeros([batch, new_tokens], tf.int32)], axis=1)

        def step(t, tokens):
            logits = model.decode(tokens[:, : t + 1], states, mask)[:, -1, :]
            next_token = tf.argmax(logits, axis=-1, output_type=tf.int32)
            update = tf.stack([tf.range(batch), tf.fill([batch], t + 1)], axis=1)
            return t + 1, tf.tensor_scatter_nd_update(tokens, update, next_token)

        return tf.while_loop(lambda t, _: t < new_tokens, step, (tf.constant(0), tokens))[1]

    def run_recompute(batch):
        recompute(tf.fill([batch, PROMPT_TOKENS], 5))
        return batch * new_tokens

    return run_storygen, run_recompute


def keras_hub_peer(new_tokens):
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=HEADS,
                                             hidden_dim=D_MODEL, intermediate_dim=FF,
                                             max_sequence_length=new_tokens + PROMPT_TOKENS + 2)
    lm = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")

    def run(batch):
        decoder_ids = np.zeros((batch, new_tokens + 1), "int32")
        decoder_ids[:, 0] = 2
        inputs = {"encoder_token_ids": np.full((batch, PROMPT_TOKENS), 5, "int32"),
                  "encoder_padding_mask": np.ones((batch, PROMPT_TOKENS), bool),
                  "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_ids != 0}
        lm.generate(inputs, stop_token_ids=None)
        return batch * new_tokens

    return run


def measure(peers, batch, repeats):
    """Median and spread of tokens/s per peer; peers alternate within each repeat."""
    for run in peers.values():
        run(batch)  # warm-up: tracing and compilation are not timed
    rates = {name: [] for name in peers}
    for _ in range(repeats):
        for name, run in peers.items():
            start = time.perf_counter()
            tokens = run(batch)
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: (statistics.median(r), min(r), max(r)) for name, r in rates.items()}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow's export chatter is not the result
    new_tokens = 32 if FLAGS.quick else FLAGS.new_tokens
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    run_storygen, run_recompute = storygen_peer(new_tokens)
    peers = {"storygen": run_storygen, "recompute": run_recompute, "keras-hub": keras_hub_peer(new_tokens)}
    print(f"decoding {new_tokens} new tokens, greedy, {LAYERS}+{LAYERS} layers, d_model {D_MODEL}, vocab {VOCAB}")
    print(f"{'batch':>5}  {'peer':<10} {'tokens/s':>9}  {'spread':>15}  {'storygen / peer':>15}")
    for batch in map(int, FLAGS.batch_sizes):
        results = measure(peers, batch, repeats)
        ours = results["storygen"][0]
        for name, (median, low, high) in results.items():
            ratio = "" if name == "storygen" else f"{ours / median:.2f}x"
            print(f"{batch:>5}  {name:<10} {median:>9.0f}  {low:>7.0f}-{high:<7.0f}  {ratio:>15}")


if __name__ == "__main__":
    app.run(main)
