"""storygen's layer normalisation and attention give what the stock Keras / keras-hub layers give."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from components import layers

B, T, S, D, HEADS = 3, 7, 5, 16, 2


def values_and_gradients(layer, *inputs, **kwargs):
    """The layer's output and the gradients of a fixed weighting of it with respect to its
    float inputs and its weights."""
    inputs = [tf.convert_to_tensor(x) for x in inputs]
    watched = [x for x in inputs if x.dtype.is_floating]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        output = layer(*inputs, **kwargs)
        weighting = tf.cast(tf.reshape(tf.range(tf.size(output)) % 7 - 3, output.shape), tf.float32)
        loss = tf.reduce_sum(tf.cast(output, tf.float32) * weighting)
    gradients = tape.gradient(loss, watched + [w.value for w in layer.trainable_weights])
    return [np.asarray(tf.cast(t, tf.float32)) for t in [output, *gradients]]


def assert_all_close(ours, theirs, **tolerance):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, **tolerance)


def test_normalize_has_zero_mean_and_unit_variance_and_keras_gradient():
    x = tf.random.stateless_normal([4, 9, D], seed=[1, 2]) * 3 + 1
    y = layers.normalize(x, 1e-5)
    np.testing.assert_allclose(tf.reduce_mean(y, -1), 0, atol=1e-5)
    np.testing.assert_allclose(tf.math.reduce_variance(y, -1), 1, atol=1e-4)
    weighting = tf.random.stateless_normal(x.shape, seed=[3, 4])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = tf.reduce_sum(layers.normalize(x, 1e-5) * weighting)
        keras_loss = tf.reduce_sum(keras.ops.layer_normalization(x, epsilon=1e-5) * weighting)
    np.testing.assert_allclose(tape.gradient(ours, x), tape.gradient(keras_loss, x), atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_norm_matches_keras_in_value_and_gradient(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        stock, ours = keras.layers.LayerNormalization(epsilon=1e-5), layers.LayerNorm(epsilon=1e-5)
        x = tf.random.stateless_normal([B, T, D], seed=[5, 6]) * 2 + 0.5
        stock.build(x.shape)
        ours.build(x.shape)
        stock.gamma.assign(tf.random.stateless_normal([D], seed=[7, 8]) + 1)
        stock.beta.assign(tf.random.stateless_normal([D], seed=[9, 10]))
        ours.set_weights(stock.get_weights())
        expected = values_and_gradients(stock, x)
        got = values_and_gradients(ours, x)
        assert got[0].dtype == expected[0].dtype
        tolerance = dict(atol=1e-5, rtol=1e-5) if policy == "float32" else dict(atol=0.05, rtol=0.02)
        assert_all_close(got, expected, **tolerance)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def attention_inputs(dtype="float32"):
    q, k, v = (tf.cast(tf.random.stateless_normal(shape, seed=[i, 0]), dtype)
               for i, shape in enumerate([[B, T, HEADS, 8], [B, S, HEADS, 8], [B, S, HEADS, 8]]))
    lengths = tf.constant([S, 2, 1])
    padding = tf.sequence_mask(lengths, S)[:, None, :]  # [B, 1, S]
    causal = tf.linalg.band_part(tf.ones([T, S], tf.bool), -1, 0)[None]  # [1, T, S]
    return q, k, v, padding, tf.logical_and(padding, causal)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal_and_padding"])
def test_attention_matches_keras_dot_product_attention(mask_kind):
    q, k, v, padding, both = attention_inputs()
    mask = {"none": None, "padding": padding, "causal_and_padding": both}[mask_kind]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, k, v])
        ours, weights = layers.attention(q, k, v, mask, scale=8 ** -0.5)
        stock = keras.ops.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                                scale=8 ** -0.5)
        weighting = tf.random.stateless_normal(ours.shape, seed=[1, 1])
        losses = tf.reduce_sum(ours * weighting), tf.reduce_sum(stock * weighting)
    np.testing.assert_allclose(ours, stock, atol=1e-5)
    for a, b in zip(tape.gradient(losses[0], [q, k, v]), tape.gradient(losses[1], [q, k, v])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(tf.reduce_sum(weights, -1), 1, atol=1e-6)
    if mask is not None:  # masked positions get no weight
        assert float(tf.reduce_max(tf.where(mask[:, None], 0.0, weights))) == 0.0


def test_attention_in_bfloat16_is_close_to_keras():
    q, k, v, _, both = attention_inputs("bfloat16")
    ours, weights = layers.attention(q, k, v, both, scale=8 ** -0.5)
    stock = keras.ops.dot_product_attention(q, k, v, mask=both[:, None], scale=8 ** -0.5)
    assert ours.dtype == tf.bfloat16 and weights.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(ours, tf.float32), tf.cast(stock, tf.float32), atol=0.03)


def copy_weights(source, target):
    """Stock and storygen layers of one config create their weights in the same order."""
    assert [w.shape for w in source.weights] == [w.shape for w in target.weights]
    target.set_weights(source.get_weights())


def test_decoder_block_matches_keras_hub_and_uses_storygen_kernels():
    config = dict(intermediate_dim=32, num_heads=HEADS, normalize_first=True)
    stock, ours = keras_hub.layers.TransformerDecoder(**config), layers.TransformerDecoder(**config)
    x = tf.random.stateless_normal([B, T, D], seed=[2, 3])
    context = tf.random.stateless_normal([B, S, D], seed=[4, 5])
    context_mask = tf.sequence_mask([S, 3, 1], S)
    stock(x, context, encoder_padding_mask=context_mask)
    ours(x, context, encoder_padding_mask=context_mask)
    copy_weights(stock, ours)
    sublayers = {type(layer) for layer in ours._flatten_layers(include_self=False)}
    assert {layers.LayerNorm, layers.CachedAttention} <= sublayers
    assert not {keras.layers.LayerNormalization, keras_hub.layers.CachedMultiHeadAttention} & sublayers
    assert_all_close(values_and_gradients(ours, x, context, encoder_padding_mask=context_mask),
                     values_and_gradients(stock, x, context, encoder_padding_mask=context_mask), atol=1e-5)


def test_encoder_block_matches_keras_hub_and_uses_storygen_kernels():
    config = dict(intermediate_dim=32, num_heads=HEADS, normalize_first=True)
    stock, ours = keras_hub.layers.TransformerEncoder(**config), layers.TransformerEncoder(**config)
    x = tf.random.stateless_normal([B, T, D], seed=[6, 7])
    mask = tf.sequence_mask([T, 4, 2], T)
    stock(x, padding_mask=mask)
    ours(x, padding_mask=mask)
    copy_weights(stock, ours)
    assert {layers.LayerNorm, layers.Attention} <= {type(layer) for layer in ours._flatten_layers(include_self=False)}
    assert_all_close(values_and_gradients(ours, x, padding_mask=mask),
                     values_and_gradients(stock, x, padding_mask=mask), atol=1e-5)


def test_attention_dropout_and_scores_follow_keras():
    layer = layers.Attention(num_heads=HEADS, key_dim=8, dropout=0.5)
    x = tf.random.stateless_normal([B, T, D], seed=[8, 9])
    output, scores = layer(x, x, return_attention_scores=True, training=False)
    stock = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=8, dropout=0.5)
    stock(x, x)
    copy_weights(layer, stock)
    stock_output, stock_scores = stock(x, x, return_attention_scores=True, training=False)
    np.testing.assert_allclose(output, stock_output, atol=1e-5)
    np.testing.assert_allclose(scores, stock_scores, atol=1e-6)
    dropped = layer(x, x, training=True)
    assert not np.allclose(dropped, output, atol=1e-3)  # dropout acts in training


def test_blocks_round_trip_their_config():
    block = layers.TransformerDecoder(intermediate_dim=32, num_heads=HEADS, normalize_first=True, name="d")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(block))
    assert type(clone) is layers.TransformerDecoder and clone.get_config() == block.get_config()


def test_configurations_outside_the_fast_paths_still_match_keras():
    """LayerNorm without a beta falls back to Keras; asked for a causal mask only, Keras hands
    storygen's attention the causal mask."""
    x = tf.random.stateless_normal([B, T, D], seed=[10, 11])
    stock, ours = keras.layers.LayerNormalization(center=False), layers.LayerNorm(center=False)
    stock.build(x.shape)
    ours.build(x.shape)
    stock.gamma.assign(tf.random.stateless_normal([D], seed=[12, 13]) + 1)
    copy_weights(stock, ours)
    np.testing.assert_allclose(ours(x), stock(x), atol=1e-5)
    attention = layers.Attention(num_heads=HEADS, key_dim=8)
    stock_attention = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=8)
    attention(x, x)
    stock_attention(x, x)
    copy_weights(attention, stock_attention)
    causal = attention(x, x, use_causal_mask=True)
    np.testing.assert_allclose(causal, stock_attention(x, x, use_causal_mask=True), atol=1e-5)
    assert not np.allclose(causal, attention(x, x), atol=1e-3)  # the causal mask did act
