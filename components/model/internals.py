"""The one place that reads private attributes of keras-hub layers.

keras-hub's `TransformerDecoder` keeps its sublayers in private attributes and has no public
accessor; cached decoding with plain TensorFlow ops needs their weights. Every such read is
here, so a keras-hub upgrade that renames them breaks this module alone, and
`tests/model_internals_test.py` fails loudly, naming the missing attribute. (Keras's own
`MultiHeadAttention` exposes its projections publicly: `query_dense`, `key_dense`, ...)

>>> import keras_hub
>>> block = keras_hub.layers.TransformerDecoder(intermediate_dim=8, num_heads=2)
>>> _ = block(keras.ops.ones((1, 3, 4)), keras.ops.ones((1, 2, 4)))
>>> decoder_block_parts(block).intermediate.units
8
"""

from typing import NamedTuple

import keras

# keras_hub.layers.TransformerDecoder's private attributes this module reads (version 0.32).
DECODER_BLOCK_ATTRIBUTES = {
    "self_attention": "_self_attention_layer",
    "self_norm": "_self_attention_layer_norm",
    "cross_attention": "_cross_attention_layer",
    "cross_norm": "_cross_attention_layer_norm",
    "feedforward_norm": "_feedforward_layer_norm",
    "intermediate": "_feedforward_intermediate_dense",
    "output": "_feedforward_output_dense",
}


class DecoderBlockParts(NamedTuple):
    """A keras-hub TransformerDecoder's sublayers: two keras MultiHeadAttention layers, three
    LayerNormalization layers and the feed-forward's two Dense layers."""

    self_attention: keras.layers.MultiHeadAttention
    self_norm: keras.layers.Layer
    cross_attention: keras.layers.MultiHeadAttention
    cross_norm: keras.layers.Layer
    feedforward_norm: keras.layers.Layer
    intermediate: keras.layers.Dense
    output: keras.layers.Dense


def decoder_block_parts(block) -> DecoderBlockParts:
    """The sublayers of a built keras_hub.layers.TransformerDecoder (with cross-attention)."""
    missing = [name for name in DECODER_BLOCK_ATTRIBUTES.values() if getattr(block, name, None) is None]
    if missing:
        raise AttributeError(f"keras-hub's TransformerDecoder no longer has {', '.join(missing)}: update "
                             "components/model/internals.py for this keras-hub version.")
    return DecoderBlockParts(**{part: getattr(block, name) for part, name in DECODER_BLOCK_ATTRIBUTES.items()})


def preset_config(handle: str) -> dict:
    """A keras-hub preset's config.json (downloaded for a hub handle, read for a directory):
    keras-hub has no public reader of a preset's config that does not build the model."""
    from keras_hub.src.utils.preset_utils import load_json

    return load_json(handle)

