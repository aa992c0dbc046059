"""Exports the trained model as a SavedModel that writes stories by itself.

Tokenisation, the decoding loop (a tf.while_loop) and detokenisation are all in the graph,
so TF Serving, or any process with only tensorflow and tensorflow_text, turns a prompt
string into a story string. The graph holds only TensorFlow core ops and tf-text's
SentencePiece ops: no XLA, no Python.

Sampling is batch-invariant: at step t a row's Gumbel noise comes from one stateless stream
seeded by (seed, t), rotated by a hash of the row's prompt, so a prompt's story for a given
seed does not depend on what else is in the batch or at which row, while different prompts
draw different noise.
"""

import os

import tensorflow as tf

from components.common import BOS_ID, EOS_ID, PAD_ID
from components.transform import encode_prompts

SAVED_MODEL_DIR = "saved_model"


class StoryGenerator(tf.Module):
    """The exported module: signatures `serving_default` and `generate`."""

    def __init__(self, model, tokenizer, *, temperature: float, top_k: int, top_p: float):
        super().__init__(name="story_generator")
        self.model = model
        # An attribute, so the tokenizer's resource is tracked and saved with the graph.
        self.tokenizer = tokenizer
        self.max_prompt_tokens = model.max_prompt_tokens
        self.max_new_tokens = model.max_story_tokens
        # Saved with the model so that clients can read the limit: `loaded.max_new_tokens_limit`.
        self.max_new_tokens_limit = tf.Variable(self.max_new_tokens, trainable=False, dtype=tf.int32)
        self.default_sampling = (float(temperature), int(top_k), float(top_p))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt")])
    def serving_default(self, prompt):
        temperature, top_k, top_p = self.default_sampling
        out = self.generate(prompt, tf.constant(self.max_new_tokens), tf.constant(temperature),
                            tf.constant(top_k), tf.constant(top_p), tf.constant(0, tf.int64))
        return {"story": out["story"], "num_tokens": out["num_tokens"]}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompt"),
        tf.TensorSpec([], tf.int32, name="max_new_tokens"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"),
        tf.TensorSpec([], tf.int64, name="seed"),
    ])
    def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        """Samples a story per prompt: temperature 0 is greedy, top_k 0 and top_p 1 disable those filters."""
        checks = [
            tf.debugging.assert_positive(tf.size(prompt), message="prompt must hold at least one string"),
            tf.debugging.assert_greater_equal(temperature, 0.0, message="temperature must be >= 0"),
            tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0"),
            tf.debugging.assert_greater(top_p, 0.0, message="top_p must be in (0, 1]"),
            tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
            tf.debugging.assert_positive(max_new_tokens, message="max_new_tokens must be >= 1"),
            tf.debugging.assert_less_equal(max_new_tokens, self.max_new_tokens,
                                           message=f"max_new_tokens must be <= {self.max_new_tokens}"),
        ]
        with tf.control_dependencies(checks):
            encoder_ids = encode_prompts(self.tokenizer, prompt, self.max_prompt_tokens).to_tensor(PAD_ID)
        states, mask = self.model.encode(encoder_ids)
        batch = tf.shape(prompt)[0]
        rows = tf.range(batch)
        noise_offsets = tf.cast(tf.strings.to_hash_bucket_fast(prompt, self.model.vocab_size), tf.int32)

        def step(t, tokens, done, log_prob):
            logits = self.model.decode(tokens[:, : t + 1], states, mask)[:, -1, :]
            next_token = sample(logits, temperature, top_k, top_p, tf.stack([seed, tf.cast(t, tf.int64)]),
                                noise_offsets)
            next_token = tf.where(done, PAD_ID, next_token)
            token_log_prob = tf.gather(tf.nn.log_softmax(logits), next_token, batch_dims=1)
            log_prob += tf.where(done, 0.0, token_log_prob)
            tokens = tf.tensor_scatter_nd_update(tokens, tf.stack([rows, tf.fill([batch], t + 1)], axis=1), next_token)
            return t + 1, tokens, done | tf.equal(next_token, EOS_ID), log_prob

        tokens = tf.concat([tf.fill([batch, 1], BOS_ID), tf.zeros([batch, max_new_tokens], tf.int32)], axis=1)
        _, tokens, _, log_prob = tf.while_loop(
            lambda t, tokens, done, log_prob: (t < max_new_tokens) & ~tf.reduce_all(done),
            step, (tf.constant(0), tokens, tf.zeros([batch], tf.bool), tf.zeros([batch])))
        token_ids = tokens[:, 1:]
        # Story tokens are those before the first EOS (or PAD, once every row has ended).
        ended = tf.equal(token_ids, EOS_ID) | tf.equal(token_ids, PAD_ID)
        num_tokens = tf.reduce_sum(tf.cast(tf.equal(tf.cumsum(tf.cast(ended, tf.int32), axis=1), 0), tf.int32), axis=1)
        story = self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(token_ids, lengths=num_tokens))
        return {"story": story, "num_tokens": num_tokens, "log_prob": log_prob, "token_ids": token_ids}


def sample(logits, temperature, top_k, top_p, seed, noise_offsets):
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else a Gumbel-max draw
    from the tempered, top-k and top-p filtered distribution, with row i's noise rotated by
    noise_offsets[i]."""
    vocab = tf.shape(logits)[-1]
    scaled = logits / tf.maximum(temperature, 1e-6)
    # Top-k: drop logits below the k-th largest (k = 0 keeps all).
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    kth = tf.math.top_k(scaled, k=k).values[:, -1:]
    scaled = tf.where(scaled < kth, -1e9, scaled)
    # Top-p: keep the most likely tokens until their probability reaches top_p.
    sorted_logits = tf.sort(scaled, direction="DESCENDING")
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    cutoff = tf.reduce_min(tf.where(cumulative < top_p, sorted_logits, 1e9), axis=-1, keepdims=True)
    scaled = tf.where(scaled < cutoff, -1e9, scaled)
    # One noise vector per (seed, step), rotated per row: the draw never depends on the batch.
    uniform = tf.random.stateless_uniform([vocab], seed=seed, minval=1e-20, maxval=1.0)
    uniform = tf.gather(uniform, (tf.range(vocab)[None, :] + noise_offsets[:, None]) % vocab)
    gumbel = -tf.math.log(-tf.math.log(uniform))
    sampled = tf.argmax(scaled + gumbel, axis=-1, output_type=tf.int32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.where(temperature > 0.0, sampled, greedy)


def export(model, tokenizer, output_dir: str, *, temperature: float, top_k: int, top_p: float) -> str:
    """Saves the generator to `<output_dir>/saved_model` and returns that path."""
    generator = StoryGenerator(model, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p)
    path = os.path.join(output_dir, SAVED_MODEL_DIR)
    tf.saved_model.save(generator, path, signatures={
        "serving_default": generator.serving_default,
        "generate": generator.generate,
    })
    return path
