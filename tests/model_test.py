import keras
import numpy as np
import pytest
import tensorflow as tf

from components.model import StoryTransformer, decoding

CONFIG = dict(vocab_size=50, max_prompt_tokens=8, max_story_tokens=12, d_model=16, num_layers=2, num_heads=2,
              ff_dim=32, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    return StoryTransformer(**CONFIG)


def ids(*rows):
    return np.array(rows, dtype="int32")


def test_shapes_and_uses_keras_hub_layers(model):
    logits = model((ids([2, 5, 6, 0], [2, 7, 0, 0]), ids([2, 9, 10], [2, 11, 0])))
    assert tuple(logits.shape) == (2, 3, 50)
    names = {type(layer).__name__ for layer in model._flatten_layers()}
    assert {"TokenAndPositionEmbedding", "TransformerEncoder", "TransformerDecoder"} <= names


def test_decoder_is_causal(model):
    base = model((ids([2, 5, 6]), ids([2, 9, 10, 11]))).numpy()
    changed = model((ids([2, 5, 6]), ids([2, 9, 10, 30]))).numpy()
    np.testing.assert_allclose(base[:, :3], changed[:, :3], atol=1e-5)
    assert not np.allclose(base[:, 3], changed[:, 3])


def test_prompt_padding_is_ignored(model):
    unpadded = model((ids([2, 5, 6]), ids([2, 9, 10]))).numpy()
    padded = model((ids([2, 5, 6, 0, 0]), ids([2, 9, 10]))).numpy()
    np.testing.assert_allclose(unpadded, padded, atol=1e-5)
    # ... and the prompt does matter.
    other = model((ids([2, 7, 8]), ids([2, 9, 10]))).numpy()
    assert not np.allclose(unpadded, other, atol=1e-3)


def test_encode_decode_equal_call(model):
    states, mask = model.encode(ids([2, 5, 6, 0]))
    assert tuple(states.shape) == (1, 4, 16) and mask.numpy().tolist() == [[True, True, True, False]]
    np.testing.assert_allclose(model.decode(ids([2, 9]), states, mask), model((ids([2, 5, 6, 0]), ids([2, 9]))),
                               atol=1e-6)


def test_output_is_tied_to_the_decoder_embedding(model):
    """The logits are the final decoder states times the transposed token embedding, and the
    output projection has no weights of its own (an untied one would add a [d_model, vocab]
    matrix, and its logits would not be these)."""
    encoder_ids, decoder_ids = ids([2, 5, 6, 0], [2, 7, 0, 0]), ids([2, 9, 10], [2, 11, 0])
    states, mask = model.encode(encoder_ids)
    hidden = keras.ops.convert_to_numpy(model.decoder_states(decoder_ids, states, mask))
    embeddings = keras.ops.convert_to_numpy(model.output_embeddings)
    assert embeddings.shape == (CONFIG["vocab_size"], CONFIG["d_model"])
    np.testing.assert_allclose(model((encoder_ids, decoder_ids)), hidden @ embeddings.T, rtol=1e-5, atol=1e-5)
    # The projection is the table the decoder looks its input tokens up in ...
    np.testing.assert_array_equal(model.decoder_embedding.token_embedding(ids([3, 41]))[0], embeddings[[3, 41]])
    # ... and the only weights with a vocabulary axis are the two input embeddings: no output
    # kernel, no output bias.
    vocab_weights = sorted(w.path.split("/", 1)[1] for w in model.weights if CONFIG["vocab_size"] in w.shape)
    assert vocab_weights == ["decoder_embedding/token_embedding/embeddings",
                             "encoder_embedding/token_embedding/embeddings"]
    assert len(model.trainable_weights) == len({id(w) for w in model.trainable_weights})


def test_config_and_save_round_trip(model, tmp_path):
    assert {k: model.get_config()[k] for k in CONFIG} == CONFIG
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = (ids([2, 5, 6]), ids([2, 9, 10]))
    np.testing.assert_allclose(model(x), restored(x), atol=1e-6)


@pytest.mark.parametrize("block, halves", [(32, False), (4, False), (32, True)])
def test_cached_decoding_equals_recomputing_the_prefix(model, monkeypatch, block, halves):
    """With the default cache block (one block holds the window) and with blocks of 4
    positions, so that the steps cross from block to block; and with the steps' kernels in
    column halves (`decoding.in_column_halves`)."""
    monkeypatch.setattr(decoding, "CACHE_BLOCK", block)
    encoder_ids = ids([2, 5, 6, 0], [2, 7, 8, 9])
    decoder_ids = ids([2, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    full = model((encoder_ids, decoder_ids)).numpy()
    states, mask = model.encode(encoder_ids)
    logits, cache = model.prefill(decoder_ids[:, :2], states, mask, cache_size=12)
    np.testing.assert_allclose(logits, full[:, :2], atol=1e-4)
    # Blocks of positions [blocks * B * heads * block, head_dim]; the prompt's [1, B, heads, S, head_dim].
    blocks = -(-12 // block)
    assert [tuple(k.shape) for k in cache.keys + cache.values] == [(blocks * 2 * 2 * block, 8)] * 4
    assert [tuple(k.shape) for k in cache.cross_keys + cache.cross_values] == [(1, 2, 2, 4, 8)] * 4
    weights = decoding.in_column_halves(model.decoding_weights()) if halves else model.decoding_weights()
    for t in range(2, 11):
        step_logits, cache = model.decode_step(decoder_ids[:, t], t, cache, weights)
        np.testing.assert_allclose(step_logits, full[:, t], atol=1e-4)


@pytest.mark.parametrize("block", [32, 4])
def test_decode_step_reads_no_row_after_its_position(model, monkeypatch, block):
    """Rows after the position may hold anything (here: keys of a longer prefix)."""
    monkeypatch.setattr(decoding, "CACHE_BLOCK", block)
    encoder_ids = ids([2, 5, 6, 0])
    states, mask = model.encode(encoder_ids)
    _, cache = model.prefill(ids([2, 9, 10, 11, 12, 13, 14, 15]), states, mask, cache_size=12)
    _, fresh = model.prefill(ids([2, 9]), states, mask, cache_size=12)
    # Rows 0-1 equal a prefill of [2, 9] (the decoder is causal); the rest are another prefix's.
    stale = fresh._replace(keys=cache.keys, values=cache.values)
    weights = model.decoding_weights()
    expected, _ = model.decode_step(ids(20), 2, fresh, weights)
    got, _ = model.decode_step(ids(20), 2, stale, weights)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("op_type", ["Shape", "Pack"])
def test_decode_step_computes_shapes_once_per_step_not_per_layer(op_type):
    """A deeper decoder adds only its layers' own work to a token: the batch's shape and the
    attended rows (Pack: a slice's bounds, a reshape's shape) are computed once per step."""

    def count(num_layers):
        keras.utils.set_random_seed(1)
        deeper = StoryTransformer(**{**CONFIG, "num_layers": num_layers})
        deeper((ids([2, 5, 6, 0]), ids([2])))  # builds its layers
        states, mask = deeper.encode(ids([2, 5, 6, 0]))
        weights = deeper.decoding_weights()
        _, cache = deeper.prefill(ids([2]), states, mask, cache_size=12, weights=weights)
        step = tf.function(deeper.decode_step).get_concrete_function(
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), cache, weights)
        return sum(op.type == op_type for op in step.graph.get_operations())

    assert count(3) == count(1)
