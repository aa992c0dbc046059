"""keras-hub's Transformer blocks with faster layer normalisation and attention for training.

The blocks are keras-hub's: their weights, masks, residuals and call() are unchanged. Only two
computations inside them are replaced, each with the same math in fewer passes over memory:

- Layer normalisation. Keras builds it from moments and element-wise ops, and autodiff then
  runs a dozen more for the gradient; `normalize` has a hand-written gradient (three
  reductions and a few products).
- Attention. Keras scales the [B, heads, T, S] scores, masks them with a select (whose
  gradient is another select) and reaches the batch matmuls through einsum; `attention`
  scales the queries instead (S / head_dim times fewer elements), adds the mask as a bias and
  calls the batch matmuls directly.

The README's Performance section gives what they save per training step. keras-hub builds
the blocks' sublayers itself, so `TransformerEncoder` and `TransformerDecoder` give those
sublayers these classes after building them; the tests check them against the stock layers
in value and gradient.
"""

import keras
import keras_hub
import tensorflow as tf

from components.common import NEG_INF


@tf.custom_gradient
def normalize(x, epsilon):
    """(x - mean) / sqrt(variance + epsilon) over the last axis, with a hand-written gradient.

    >>> normalize(tf.constant([[1.0, 2.0, 3.0]]), 0.0).numpy().round(3)
    array([[-1.225,  0.   ,  1.225]], dtype=float32)
    """
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    inverse_std = tf.math.rsqrt(variance + epsilon)
    normalized = (x - mean) * inverse_std

    def gradient(upstream):
        # d/dx of the normalized x: remove the upstream's mean and its component along x.
        along = tf.reduce_mean(upstream * normalized, axis=-1, keepdims=True)
        centred = upstream - tf.reduce_mean(upstream, axis=-1, keepdims=True)
        return inverse_std * (centred - normalized * along), None

    return normalized, gradient


@keras.saving.register_keras_serializable(package="storygen")
class LayerNorm(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` computed with `normalize` (for the last axis with
    center and scale, the defaults; otherwise as Keras computes it).

    In float32 whatever the input's dtype, as Keras does; output in the layer's compute dtype.

    >>> norm = LayerNorm(epsilon=1e-5)
    >>> norm(tf.constant([[1.0, 2.0, 3.0]])).numpy().round(3)
    array([[-1.225,  0.   ,  1.225]], dtype=float32)
    """

    def call(self, inputs):
        if self.rms_scaling or not (self.center and self.scale) or self.axis not in ([-1], [len(inputs.shape) - 1]):
            return super().call(inputs)  # configurations keras-hub's blocks do not use
        outputs = normalize(tf.cast(inputs, tf.float32), self.epsilon)
        outputs = outputs * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(outputs, self.compute_dtype)


def attention(query, key, value, mask, scale, dropout=None):
    """softmax(scale * query . key + mask bias) . value, and the attention weights.

    query [B, T, heads, head_dim], key and value [B, S, heads, head_dim]; mask [B, T, S] or
    [B, 1, S] bool, True where a query may attend (None: everywhere). The scores and softmax
    are float32, as in Keras; `dropout` (a Keras Dropout layer, called) acts on the weights.
    Returns [B, T, heads, head_dim] and the weights [B, heads, T, S].

    >>> x = tf.random.normal([2, 5, 4, 8])
    >>> out, weights = attention(x, x, x, mask=None, scale=8 ** -0.5)
    >>> out.shape, weights.shape
    (TensorShape([2, 5, 4, 8]), TensorShape([2, 4, 5, 5]))
    """
    heads_major = [0, 2, 1, 3]
    query = tf.transpose(query * tf.cast(scale, query.dtype), heads_major)
    scores = tf.cast(tf.matmul(query, tf.transpose(key, heads_major), transpose_b=True), tf.float32)
    if mask is not None:
        scores += tf.where(tf.cast(mask, tf.bool)[:, None], 0.0, NEG_INF)
    weights = tf.cast(tf.nn.softmax(scores), value.dtype)
    if dropout is not None:
        weights = dropout(weights)
    return tf.transpose(tf.matmul(weights, tf.transpose(value, heads_major)), heads_major), weights


class _Attention:
    """Mixin for Keras's multi-head attention layers: their `_compute_attention` (the documented
    place to change how attention is computed) done by `attention`."""

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False):
        # Keras passes `use_causal_mask` only to its own `_compute_attention`; for an override
        # it builds the causal mask into `attention_mask`.
        output, weights = attention(query, key, value, attention_mask, self._inverse_sqrt_key_dim,
                                    dropout=lambda w: self._dropout_layer(w, training=training))
        return output, (weights if return_attention_scores else None)


class Attention(_Attention, keras.layers.MultiHeadAttention):
    """keras.layers.MultiHeadAttention computed with `attention` (in TransformerEncoder)."""


class CachedAttention(_Attention, keras_hub.layers.CachedMultiHeadAttention):
    """keras_hub.layers.CachedMultiHeadAttention computed with `attention` (in TransformerDecoder)."""


_FASTER = {keras.layers.LayerNormalization: LayerNorm, keras.layers.MultiHeadAttention: Attention,
           keras_hub.layers.CachedMultiHeadAttention: CachedAttention}


def _use_faster_sublayers(block):
    """Gives the sublayers keras-hub built the classes above: the same state, other kernels."""
    for layer in block._flatten_layers(include_self=False):
        layer.__class__ = _FASTER.get(type(layer), type(layer))


@keras.saving.register_keras_serializable(package="storygen")
class TransformerEncoder(keras_hub.layers.TransformerEncoder):
    """keras_hub.layers.TransformerEncoder with `LayerNorm` and `Attention` inside.

    >>> block = TransformerEncoder(intermediate_dim=16, num_heads=2, normalize_first=True)
    >>> block(tf.zeros([2, 5, 8])).shape
    TensorShape([2, 5, 8])
    """

    def build(self, inputs_shape):
        super().build(inputs_shape)
        _use_faster_sublayers(self)


@keras.saving.register_keras_serializable(package="storygen")
class TransformerDecoder(keras_hub.layers.TransformerDecoder):
    """keras_hub.layers.TransformerDecoder with `LayerNorm` and `CachedAttention` inside.

    >>> block = TransformerDecoder(intermediate_dim=16, num_heads=2, normalize_first=True)
    >>> block(tf.zeros([2, 5, 8]), tf.zeros([2, 3, 8])).shape
    TensorShape([2, 5, 8])
    """

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        _use_faster_sublayers(self)
