"""The sampling filters of `components.model.decoding`: top-k and top-p keep what their
definitions keep, checked against a plain NumPy reading of them."""

import numpy as np
import pytest
import tensorflow as tf

from components.model import decoding

LOGITS = np.random.default_rng(0).normal(0.0, 2.0, [3, 50]).astype("float32")


def kept_by_definition(logits, top_k, top_p):
    """Row-wise: the k most likely ids (all, top_k 0); of those, the most likely until their
    probability (renormalised over the k) reaches top_p."""
    kept = []
    for row in logits:
        order = np.argsort(-row)[: top_k or len(row)]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        reach = np.searchsorted(np.cumsum(probs), top_p) + 1 if top_p < 1 else len(order)
        kept.append(set(order[:reach].tolist()))
    return kept


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5), (10, 0.6), (10, 0.999), (50, 0.3), (0, 1.0)])
def test_filters_keep_what_their_definitions_keep(top_k, top_p):
    filtered = decoding._filter(tf.constant(LOGITS), tf.constant(top_k), tf.constant(top_p)).numpy()
    kept = [set(np.flatnonzero(row > decoding.NEG_INF / 2).tolist()) for row in filtered]
    assert kept == kept_by_definition(LOGITS, top_k, top_p)
    np.testing.assert_array_equal(np.where(filtered > decoding.NEG_INF / 2, filtered, 0),
                                  np.where(filtered > decoding.NEG_INF / 2, LOGITS, 0))  # kept logits unchanged


def test_sampling_draws_only_kept_tokens_and_greedy_is_argmax():
    logits = tf.constant(LOGITS)
    offsets = tf.zeros([3], tf.int32)
    allowed = kept_by_definition(LOGITS / 1.5, 4, 0.8)  # the filters see the tempered logits
    for step in range(20):
        drawn = decoding.sample(logits, tf.constant(1.5), tf.constant(4), tf.constant(0.8),
                                tf.constant([7, step], tf.int64), offsets).numpy()
        assert all(token in row for token, row in zip(drawn, allowed))
    greedy = decoding.sample(logits, tf.constant(0.0), tf.constant(4), tf.constant(0.8), tf.constant([7, 0], tf.int64),
                             offsets)
    np.testing.assert_array_equal(greedy, LOGITS.argmax(axis=-1))
