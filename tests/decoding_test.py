"""Sampling in `components.model.decoding`: top-k and top-p keep what their definitions keep
(checked against a plain NumPy reading of them), and drawing among the top-k candidates alone
gives the very token that filtering the whole vocabulary gives, with the same noise. The output
projection in blocks gives the whole matrix's logits."""

import numpy as np
import pytest
import tensorflow as tf

from components.model import decoding

LOGITS = np.random.default_rng(0).normal(0.0, 2.0, [3, 50]).astype("float32")
OFFSETS = tf.constant([0, 17, 33])  # each row's noise rotation


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


def draw(top_k, top_p, seed, temperature=1.5):
    return decoding.sample(tf.constant(LOGITS), tf.constant(temperature), tf.constant(top_k), tf.constant(top_p),
                           tf.constant([7, seed], tf.int64), OFFSETS).numpy()


def draw_over_the_whole_vocabulary(top_k, top_p, seed, temperature=1.5):
    """The Gumbel-max draw spelled out: every id of the vocabulary, the filtered ones at -inf,
    with sample()'s noise (one stateless vector per seed, rotated per row)."""
    scaled = LOGITS / temperature
    allowed = kept_by_definition(scaled, top_k, top_p)
    uniform = tf.random.stateless_uniform([LOGITS.shape[1]], seed=[7, seed], minval=1e-20, maxval=1.0).numpy()
    ids = (np.arange(LOGITS.shape[1])[None, :] + OFFSETS.numpy()[:, None]) % LOGITS.shape[1]
    noisy = scaled - np.log(-np.log(uniform[ids]))
    return np.array([max(row, key=lambda j: noisy[i, j]) for i, row in enumerate(allowed)])


@pytest.mark.parametrize("top_p", [0.5, 0.999])
def test_top_p_filter_keeps_the_nucleus(top_p):
    filtered = decoding._top_p_filter(tf.constant(LOGITS), tf.constant(top_p)).numpy()
    kept = [set(np.flatnonzero(row > decoding.NEG_INF / 2).tolist()) for row in filtered]
    assert kept == kept_by_definition(LOGITS, 0, top_p)
    np.testing.assert_array_equal(filtered[filtered > decoding.NEG_INF / 2], LOGITS[filtered > decoding.NEG_INF / 2])


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5), (10, 0.6), (10, 0.999), (50, 0.3), (0, 1.0)])
def test_a_draw_is_the_gumbel_max_of_the_filtered_vocabulary(top_k, top_p):
    draws = np.stack([draw(top_k, top_p, seed) for seed in range(30)])
    assert (draws == np.stack([draw_over_the_whole_vocabulary(top_k, top_p, seed) for seed in range(30)])).all()
    assert all(len(set(column)) > 1 for column in draws.T)  # the noise varies with the seed


def test_greedy_is_the_argmax_whatever_the_filters():
    np.testing.assert_array_equal(draw(4, 0.8, seed=0, temperature=0.0), LOGITS.argmax(axis=-1))


@pytest.mark.parametrize("rows, vocab, blocks", [(1, 65536, 2), (7, 65536, 2), (8, 65536, 16), (64, 65552, 16),
                                                 (8, 65544, 1), (64, 8000, 1)])
def test_the_projection_in_blocks_gives_the_whole_matrixs_logits(rows, vocab, blocks):
    """Traced as `generate` traces it (the row count a tensor): for a vocabulary of 65536 and
    more that 16 divides, the head is in column halves below 8 rows and in 16 blocks from 8
    rows on, and the logits are x @ head whichever layout."""
    head = tf.constant(np.random.default_rng(1).normal(size=[8, vocab]).astype("float32"))
    x = tf.constant(np.random.default_rng(2).normal(size=[rows, 8]).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8])])
    def project(x):
        laid_out = decoding.head_for_batch(head, tf.shape(x)[0])
        blocks = tf.shape(laid_out)[0] if laid_out.shape.rank == 3 else 1
        return blocks, decoding.project(x, laid_out)

    used_blocks, logits = project(x)
    assert int(used_blocks) == blocks
    np.testing.assert_allclose(logits.numpy(), x.numpy() @ head.numpy(), rtol=1e-5, atol=1e-4)
