"""A Transformer decoder block computed one token at a time with plain TensorFlow ops.

storygen's own model (pre-layer-norm blocks), BART (post-layer-norm) and T5 (pre-norm with RMS
norms, a relative-position bias and a gated feed-forward) decode with `decoder_blocks_step`.
keras-hub's `TransformerDecoder` blocks are read once per generation into plain tensors
(`decoder_block_weights`): each block's query, key and value kernels fused into one matrix,
the query's scaled by 1/sqrt(head_dim) as keras's MultiHeadAttention scales it. The Keras
layers, their einsums and oneDNN's small-matrix kernels cost several times more per token,
which is what a decoding loop pays for.
"""

import math

import tensorflow as tf

from components.model.decoding import (DecoderCache, attend, blocks_read, cross_cache, dense, empty_cache,
                                       padding_bias, write_row, write_rows)


def dense_weights(layer, inputs: int):
    """A Dense or EinsumDense layer's kernel as an [inputs, outputs] matrix (LoRA factors merged,
    as the layer's `kernel` gives it), and its bias [outputs] (None without one)."""
    bias = tf.reshape(tf.convert_to_tensor(layer.bias), [-1]) if layer.bias is not None else None
    return tf.reshape(tf.convert_to_tensor(layer.kernel), [inputs, -1]), bias


def norm_weights(layer):
    return tf.convert_to_tensor(layer.gamma), tf.convert_to_tensor(layer.beta), layer.epsilon


def layer_norm(x, weights):
    """Layer normalisation over the last axis, as keras.layers.LayerNormalization computes it."""
    gamma, beta, epsilon = weights
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def rms_norm(x, weights):
    """RMS normalisation over the last axis: x / sqrt(mean(x^2) + epsilon) * multiplier, no
    centring and no bias (T5's multiplier is its scale; Gemma's is 1 + its scale)."""
    multiplier, epsilon = weights
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + epsilon) * multiplier


def decoder_block_weights(parts, d_model: int, ff_dim: int) -> dict:
    """One block's weights for `decoder_blocks_step` (`parts`: `internals.decoder_block_parts`)."""
    attention, cross = parts.self_attention, parts.cross_attention
    scale = 1.0 / math.sqrt(attention.key_dim)
    heads = attention.num_heads * attention.key_dim  # the attention outputs' width
    query, key, value = (dense_weights(layer, d_model) for layer in
                         (attention.query_dense, attention.key_dense, attention.value_dense))
    cross_query = dense_weights(cross.query_dense, d_model)
    return {
        "self_norm": norm_weights(parts.self_norm),
        "qkv": (tf.concat([query[0] * scale, key[0], value[0]], axis=1),
                tf.concat([query[1] * scale, key[1], value[1]], axis=0)),
        "self_output": dense_weights(attention.output_dense, heads),
        "cross_norm": norm_weights(parts.cross_norm),
        "cross_query": (cross_query[0] * scale, cross_query[1] * scale),
        "cross_key": dense_weights(cross.key_dense, d_model),
        "cross_value": dense_weights(cross.value_dense, d_model),
        "cross_output": dense_weights(cross.output_dense, heads),
        "feedforward_norm": norm_weights(parts.feedforward_norm),
        "intermediate": dense_weights(parts.intermediate, d_model),
        "activation": parts.intermediate.activation,
        "output": dense_weights(parts.output, ff_dim),
    }


def start_cache(blocks, encoder_states, encoder_mask, num_heads: int, cache_size: int) -> DecoderCache:
    """An empty self-attention cache with room for `cache_size` positions, and the
    cross-attention keys and values of the encoder states [B, S, d]."""
    batch = tf.shape(encoder_states)[0]
    head_dim = blocks[0]["cross_key"][0].shape[1] // num_heads

    def heads(x):
        return cross_cache(tf.reshape(x, [batch, tf.shape(x)[1], num_heads, head_dim]))

    cross_keys = [heads(dense(encoder_states, block["cross_key"])) for block in blocks]
    cross_values = [heads(dense(encoder_states, block["cross_value"])) for block in blocks]
    keys, values = ([empty_cache(batch, num_heads, head_dim, cache_size) for _ in blocks] for _ in range(2))
    return DecoderCache(keys, values, cross_keys, cross_values, padding_bias(encoder_mask))


def decoder_blocks_step(x, position, cache, blocks, num_heads: int, normalize_first: bool, norm=layer_norm,
                        self_bias=None):
    """Runs one position's input x [B, d] through the blocks, writing its keys and values at
    `position` of `cache`; returns the last block's output and the cache. The cache passed in
    must not be used again, only the one returned (`write_row` writes in place).

    normalize_first: pre-layer-norm blocks (storygen's, T5's) normalise each sublayer's input;
    post-layer-norm blocks (BART's) normalise the residual sum. norm(x, weights): the
    normalisation (T5's is an RMS norm). self_bias: added to the self-attention scores of keys
    0 .. position, [position + 1, heads] (T5's relative positions). A block whose "gated" is
    true computes activation(x W) * (x W_gate) from its "intermediate" kernels [W | W_gate]."""
    keys, values = [], []
    width = tf.nest.flatten(blocks[0]["self_output"][0])[0].shape[0]  # heads * head_dim (the kernel's rows)
    head_dim = width // num_heads
    # Once per step, not per layer: the cache rows this position writes, and the blocks that
    # attention reads. Reshapes take -1 for the batch, so no layer computes a shape.
    batch = tf.shape(x)[0]
    rows = write_rows(position, batch, num_heads)
    read = blocks_read(position, batch, num_heads, head_dim, position_bias=self_bias)
    for i, block in enumerate(blocks):

        def sublayer(x, name, compute):
            if normalize_first:
                return x + compute(norm(x, block[name]))
            return norm(x + compute(x), block[name])

        def self_attention(h):
            qkv = dense(h, block["qkv"])
            query, key, value = tf.split(tf.reshape(qkv, [-1, 3 * num_heads, 1, head_dim]), 3, axis=1)
            keys.append(write_row(cache.keys[i], rows, key))
            values.append(write_row(cache.values[i], rows, value))
            attended = attend(query, read.of(keys[i]), read.of(values[i]), read.bias)
            return dense(tf.reshape(attended, [-1, width]), block["self_output"])

        def cross_attention(h):
            query = tf.reshape(dense(h, block["cross_query"]), [-1, num_heads, 1, head_dim])
            attended = attend(query, cache.cross_keys[i], cache.cross_values[i], cache.cross_bias)
            return dense(tf.reshape(attended, [-1, width]), block["cross_output"])

        def feedforward(h):
            hidden = dense(h, block["intermediate"])
            if block.get("gated"):
                hidden, gate = tf.split(hidden, 2, axis=-1)
                return dense(block["activation"](hidden) * gate, block["output"])
            return dense(block["activation"](hidden), block["output"])

        x = sublayer(x, "self_norm", self_attention)
        x = sublayer(x, "cross_norm", cross_attention)
        x = sublayer(x, "feedforward_norm", feedforward)
    return x, cache._replace(keys=keys, values=values)
