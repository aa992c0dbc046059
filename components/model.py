"""The story model: a Transformer encoder-decoder built from keras-hub layers.

The prompt is encoded once; the decoder writes the story token by token, attending to the
prompt through cross-attention. Output logits reuse the decoder's token embedding matrix
(tied weights), which saves parameters and helps small models.

`prefill` and `decode_step` are the same decoder with a key/value cache, for generation.
`prefill` runs the Keras blocks over a prefix; `decode_step`, which a decoding loop runs once
per token, computes one position with plain TensorFlow ops on the blocks' weights (the Keras
layers, their einsums and oneDNN's small-matrix kernels cost several times more per token).
keras-hub's own cache writes with `ops.slice_update`, which the TensorFlow backend lowers to
the XLA op XlaDynamicUpdateSlice that stock TF Serving cannot run; here the cache is a
position-major buffer written in place with the core op InplaceUpdate. Both read the
blocks' sublayers (private attributes of keras-hub 0.32, pinned in setup.cfg); tests check
cached decoding against recomputing the prefix.

The blocks are keras-hub's with faster layer normalisation and attention kernels inside
(`components.layers`).
"""

import math
from typing import NamedTuple

import keras
import keras_hub
import tensorflow as tf

from components import layers
from components.common import NEG_INF, PAD_ID


@keras.saving.register_keras_serializable(package="storygen")
class StoryTransformer(keras.Model):
    """Prompt ids [B, S] and decoder ids [B, T] -> next-token logits [B, T, vocab_size].

    Pre-layer-norm blocks (`normalize_first=True`) with a final layer norm on each side:
    they train stably at the learning rates small CPU runs need.

    Example:
    >>> model = StoryTransformer(vocab_size=100, max_prompt_tokens=16, max_story_tokens=32,
    ...                          d_model=32, num_layers=1, num_heads=2, ff_dim=64)
    >>> model((keras.ops.ones((2, 5), "int32"), keras.ops.ones((2, 7), "int32"))).shape
    TensorShape([2, 7, 100])
    """

    def __init__(self, vocab_size, max_prompt_tokens, max_story_tokens, d_model, num_layers,
                 num_heads, ff_dim, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_story_tokens = max_story_tokens
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ff_dim = ff_dim
        self.dropout = dropout
        self.encoder_embedding = keras_hub.layers.TokenAndPositionEmbedding(
            vocab_size, max_prompt_tokens, d_model, name="encoder_embedding")
        self.decoder_embedding = keras_hub.layers.TokenAndPositionEmbedding(
            vocab_size, max_story_tokens, d_model, tie_weights=True, name="decoder_embedding")
        self.encoder_blocks = [
            layers.TransformerEncoder(ff_dim, num_heads, dropout=dropout, normalize_first=True, name=f"encoder_{i}")
            for i in range(num_layers)]
        self.decoder_blocks = [
            layers.TransformerDecoder(ff_dim, num_heads, dropout=dropout, normalize_first=True, name=f"decoder_{i}")
            for i in range(num_layers)]
        self.encoder_norm = layers.LayerNorm(epsilon=1e-5, name="encoder_norm")
        self.decoder_norm = layers.LayerNorm(epsilon=1e-5, name="decoder_norm")

    def encode(self, encoder_ids, training=False):
        """Encoder states [B, S, d_model] and the prompt's padding mask [B, S]."""
        mask = keras.ops.not_equal(encoder_ids, PAD_ID)
        x = self.encoder_embedding(encoder_ids)
        for block in self.encoder_blocks:
            x = block(x, padding_mask=mask, training=training)
        return self.encoder_norm(x), mask

    def decode(self, decoder_ids, encoder_states, encoder_mask, training=False):
        """Logits [B, T, vocab_size]; the causal mask hides later positions (and so the padding
        after a story, which only ever follows it)."""
        states = self.decoder_states(decoder_ids, encoder_states, encoder_mask, training=training)
        return self.decoder_embedding.token_embedding(states, reverse=True)

    def decoder_states(self, decoder_ids, encoder_states, encoder_mask, training=False):
        """The final decoder states [B, T, d_model]: the logits are these times the transposed
        `output_embeddings`. Training computes its loss from them in chunks
        (`trainer.output_loss_sum`) rather than making all the logits at once."""
        x = self.decoder_embedding(decoder_ids)
        for block in self.decoder_blocks:
            x = block(x, encoder_states, encoder_padding_mask=encoder_mask, training=training)
        return self.decoder_norm(x)

    @property
    def output_embeddings(self):
        """The output projection [vocab_size, d_model]: the decoder's token embedding (tied)."""
        return self.decoder_embedding.token_embedding.embeddings

    def logits(self, x):
        """Next-token logits from the last decoder block's output (tied to the token embedding)."""
        return self.decoder_embedding.token_embedding(self.decoder_norm(x), reverse=True)

    def prefill(self, decoder_ids, encoder_states, encoder_mask, cache_size):
        """Decodes a whole prefix [B, T] (T <= cache_size) with the Keras blocks: its logits
        [B, T, V] and the DecoderCache that `decode_step` continues from, with room for
        `cache_size` positions."""
        x = self.decoder_embedding(decoder_ids)
        keys, values, cross_keys, cross_values = [], [], [], []
        free = [[0, cache_size - tf.shape(decoder_ids)[1]], [0, 0], [0, 0], [0, 0]]
        for block in self.decoder_blocks:
            attention = block._self_attention_layer
            h = block._self_attention_layer_norm(x)
            # Padding allocates each cache buffer afresh, as decode_step's in-place writes need.
            keys.append(tf.pad(_position_major(attention._key_dense(h)), free))
            values.append(tf.pad(_position_major(attention._value_dense(h)), free))
            cross = block._cross_attention_layer
            cross_keys.append(_position_major(cross._key_dense(encoder_states)))
            cross_values.append(_position_major(cross._value_dense(encoder_states)))
            x = block(x, encoder_states, encoder_padding_mask=encoder_mask, training=False)
        cross_bias = tf.where(tf.transpose(encoder_mask)[:, :, None], 0.0, NEG_INF)
        return self.logits(x), DecoderCache(keys, values, cross_keys, cross_values, cross_bias)

    def decoding_weights(self):
        """The decoder's weights laid out for `decode_step`, read once per generation: each
        block's query/key/value kernels fused into one matrix (the query's scaled by
        1/sqrt(head_dim)), attention kernels flattened to plain matrices."""
        blocks = []
        for block in self.decoder_blocks:
            attention, cross = block._self_attention_layer, block._cross_attention_layer
            scale = 1.0 / math.sqrt(attention._key_dim)
            heads = attention._num_heads * attention._key_dim  # the attention outputs' width
            query, key, value = (_dense_weights(layer, self.d_model) for layer in
                                 (attention._query_dense, attention._key_dense, attention._value_dense))
            cross_query = _dense_weights(cross._query_dense, self.d_model)
            blocks.append({
                "self_norm": _norm_weights(block._self_attention_layer_norm),
                "qkv": (tf.concat([query[0] * scale, key[0], value[0]], axis=1),
                        tf.concat([query[1] * scale, key[1], value[1]], axis=0)),
                "self_output": _dense_weights(attention._output_dense, heads),
                "cross_norm": _norm_weights(block._cross_attention_layer_norm),
                "cross_query": (cross_query[0] * scale, cross_query[1] * scale),
                "cross_output": _dense_weights(cross._output_dense, heads),
                "feedforward_norm": _norm_weights(block._feedforward_layer_norm),
                "intermediate": _dense_weights(block._feedforward_intermediate_dense, self.d_model),
                "activation": block._feedforward_intermediate_dense.activation,
                "output": _dense_weights(block._feedforward_output_dense, self.ff_dim),
            })
        embedding = self.decoder_embedding
        return {"blocks": blocks, "norm": _norm_weights(self.decoder_norm),
                "tokens": tf.convert_to_tensor(embedding.token_embedding.embeddings),
                "positions": tf.convert_to_tensor(embedding.position_embedding.position_embeddings)}

    def decode_step(self, token_ids, position, cache, weights):
        """Feeds one token per row (token_ids [B], all at window position `position`) and
        returns its logits [B, V] and the cache with this position's keys and values.

        The same decoder as `decode`, written with plain TensorFlow ops on `weights`
        (`decoding_weights()`): the Keras layers cost several times more per token, which is
        what a decoding loop pays for. The keys and values are written into the cache in
        place (see `_write`): the cache passed in must not be used again, only the one returned.
        """
        num_heads, head_dim = self.num_heads, self.d_model // self.num_heads  # as keras-hub's blocks split
        x = tf.gather(weights["tokens"], token_ids) + weights["positions"][position]  # [B, d_model]
        keys, values = [], []
        for i, block in enumerate(weights["blocks"]):
            qkv = _dense(_layer_norm(x, block["self_norm"]), block["qkv"])
            query, key, value = tf.split(tf.reshape(qkv, [1, -1, 3 * num_heads, head_dim]), 3, axis=2)
            keys.append(_write(cache.keys[i], position, key))
            values.append(_write(cache.values[i], position, value))
            # Rows after `position` hold no keys of this window yet: attend to the rows up to it.
            attended = _attend(query[0], keys[i][: position + 1], values[i][: position + 1])
            x += _dense(tf.reshape(attended, [-1, num_heads * head_dim]), block["self_output"])
            query = _dense(_layer_norm(x, block["cross_norm"]), block["cross_query"])
            attended = _attend(tf.reshape(query, tf.shape(cache.cross_keys[i])[1:]), cache.cross_keys[i],
                               cache.cross_values[i], cache.cross_bias)
            x += _dense(tf.reshape(attended, [-1, num_heads * head_dim]), block["cross_output"])
            hidden = block["activation"](_dense(_layer_norm(x, block["feedforward_norm"]), block["intermediate"]))
            x += _dense(hidden, block["output"])
        logits = tf.matmul(_layer_norm(x, weights["norm"]), weights["tokens"], transpose_b=True)
        return logits, cache._replace(keys=keys, values=values)

    def call(self, inputs, training=False):
        encoder_ids, decoder_ids = inputs
        states, mask = self.encode(encoder_ids, training=training)
        return self.decode(decoder_ids, states, mask, training=training)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "max_prompt_tokens": self.max_prompt_tokens,
                "max_story_tokens": self.max_story_tokens, "d_model": self.d_model, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "ff_dim": self.ff_dim, "dropout": self.dropout}


class DecoderCache(NamedTuple):
    """What decoding a prefix leaves for the next tokens, position-major so that one
    position's row can be written in place: per block the self-attention keys and values
    [window, B, heads, head_dim] (rows past the decoded ones are free), the cross-attention
    keys and values [S, B, heads, head_dim], and the prompt's padding as an additive
    attention bias [S, B, 1]."""

    keys: list
    values: list
    cross_keys: list
    cross_values: list
    cross_bias: tf.Tensor


def _position_major(x):
    """[B, T, heads, head_dim] -> [T, B, heads, head_dim]."""
    return tf.transpose(x, [1, 0, 2, 3])


def _write(cache, position, row):
    """Writes row [1, B, heads, head_dim] at `position` of cache [window, B, heads, head_dim].

    InplaceUpdate is a core op that writes into its input's buffer without copying it
    (concatenating, or tensor_scatter_nd_update, copies the whole cache at every token). So
    the buffer must have one owner: `prefill` allocates each cache, and each is passed to
    one decode_step only.
    """
    return tf.raw_ops.InplaceUpdate(x=cache, i=tf.reshape(position, [1]), v=row)


def _attend(query, keys, values, bias=None):
    """One query per row and head [B, heads, head_dim] (already scaled) attends to keys and
    values [T, B, heads, head_dim]; returns [B, heads, head_dim]. Products and sums rather
    than batch matmuls: the position-major layout is not a batch matmul's, and for one query
    per row they cost less than oneDNN's batch-matmul and softmax kernels, whose per-call
    overhead dominates at small batches."""
    scores = tf.reduce_sum(keys * query, axis=-1)  # [T, B, heads]
    if bias is not None:
        scores += bias
    weights = tf.exp(scores - tf.reduce_max(scores, axis=0))
    weights /= tf.reduce_sum(weights, axis=0)
    return tf.reduce_sum(weights[..., None] * values, axis=0)


def _dense_weights(layer, inputs):
    """A Dense or EinsumDense layer's kernel as an [inputs, outputs] matrix, and its bias [outputs]."""
    return (tf.reshape(tf.convert_to_tensor(layer.kernel), [inputs, -1]),
            tf.reshape(tf.convert_to_tensor(layer.bias), [-1]))


def _dense(x, weights):
    kernel, bias = weights
    return tf.nn.bias_add(tf.matmul(x, kernel), bias)


def _norm_weights(layer):
    return tf.convert_to_tensor(layer.gamma), tf.convert_to_tensor(layer.beta), layer.epsilon


def _layer_norm(x, weights):
    """Layer normalisation over the last axis, as keras.layers.LayerNormalization computes it."""
    gamma, beta, epsilon = weights
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta
