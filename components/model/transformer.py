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
buffer in blocks of positions (`decoding.to_blocks`) written in place with the core op
InplaceUpdate. Both read the
blocks' sublayers through `internals` (private attributes of keras-hub 0.32, pinned in
setup.cfg); tests check cached decoding against recomputing the prefix.

The blocks are keras-hub's with faster layer normalisation and attention kernels inside
(`components.layers`).
"""

import keras
import keras_hub
import tensorflow as tf

from components import layers
from components.common import PAD_ID, STORYGEN_IDS
from components.model import internals
from components.model.blocks import decoder_block_weights, decoder_blocks_step, layer_norm, norm_weights
from components.model.decoding import DecoderCache, cross_cache, padding_bias, project, to_blocks


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

    special = STORYGEN_IDS  # the ids it frames prompts and stories with
    logit_soft_cap = None  # its logits are not squashed (Gemma's are: `trainer.output_loss_sum`)

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

    def final_states(self, encoder_ids, decoder_ids, training=False):
        """The final decoder states [B, T, d_model]: the logits are these times the transposed
        `output_embeddings`. Training computes its loss from them in chunks
        (`trainer.output_loss_sum`) rather than making all the logits at once."""
        encoder_states, encoder_mask = self.encode(encoder_ids, training=training)
        return self.decoder_states(decoder_ids, encoder_states, encoder_mask, training=training)

    def decoder_states(self, decoder_ids, encoder_states, encoder_mask, training=False):
        """The final decoder states [B, T, d_model] of already encoded prompts."""
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

    def prefill(self, decoder_ids, encoder_states, encoder_mask, cache_size, weights=None):
        """Decodes a whole prefix [B, T] (T <= cache_size) with the Keras blocks at once: its
        logits [B, T, V] and the DecoderCache that `decode_step` continues from, with room for
        `cache_size` positions. (`weights` is the decoding interface's; the blocks' own are used.)"""
        x = self.decoder_embedding(decoder_ids)
        keys, values, cross_keys, cross_values = [], [], [], []
        for block in self.decoder_blocks:
            parts = internals.decoder_block_parts(block)
            h = parts.self_norm(x)
            # to_blocks allocates each cache buffer afresh, as decode_step's in-place writes need.
            keys.append(to_blocks(parts.self_attention.key_dense(h), cache_size))
            values.append(to_blocks(parts.self_attention.value_dense(h), cache_size))
            cross_keys.append(cross_cache(parts.cross_attention.key_dense(encoder_states)))
            cross_values.append(cross_cache(parts.cross_attention.value_dense(encoder_states)))
            x = block(x, encoder_states, encoder_padding_mask=encoder_mask, training=False)
        return self.logits(x), DecoderCache(keys, values, cross_keys, cross_values, padding_bias(encoder_mask))

    def decoding_weights(self):
        """The decoder's weights laid out for `decode_step`, read once per generation: each
        block's query/key/value kernels fused into one matrix (the query's scaled by
        1/sqrt(head_dim)), attention kernels flattened to plain matrices, and the output
        projection as [d_model, V] (see `decoding`'s module doc)."""
        blocks = [decoder_block_weights(internals.decoder_block_parts(block), self.d_model, self.ff_dim)
                  for block in self.decoder_blocks]
        embedding = self.decoder_embedding
        tokens = tf.convert_to_tensor(embedding.token_embedding.embeddings)
        return {"blocks": blocks, "norm": norm_weights(self.decoder_norm), "tokens": tokens,
                "head": tf.transpose(tokens),
                "positions": tf.convert_to_tensor(embedding.position_embedding.position_embeddings)}

    def decode_step(self, token_ids, position, cache, weights):
        """Feeds one token per row (token_ids [B], all at window position `position`) and
        returns its logits [B, V] and the cache with this position's keys and values.

        The same decoder as `decode`, written with plain TensorFlow ops on `weights`
        (`decoding_weights()`): the Keras layers cost several times more per token, which is
        what a decoding loop pays for. The keys and values are written into the cache in
        place (see `decoding.write_row`): the cache passed in must not be used again, only the one returned.
        """
        x = tf.gather(weights["tokens"], token_ids) + weights["positions"][position]  # [B, d_model]
        x, cache = decoder_blocks_step(x, position, cache, weights["blocks"], self.num_heads, normalize_first=True)
        logits = project(layer_norm(x, weights["norm"]), weights["head"])
        return logits, cache

    def call(self, inputs, training=False):
        encoder_ids, decoder_ids = inputs
        states, mask = self.encode(encoder_ids, training=training)
        return self.decode(decoder_ids, states, mask, training=training)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "max_prompt_tokens": self.max_prompt_tokens,
                "max_story_tokens": self.max_story_tokens, "d_model": self.d_model, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "ff_dim": self.ff_dim, "dropout": self.dropout}
