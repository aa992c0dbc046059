"""The story model: a Transformer encoder-decoder built from keras-hub layers.

The prompt is encoded once; the decoder writes the story token by token, attending to the
prompt through cross-attention. Output logits reuse the decoder's token embedding matrix
(tied weights), which saves parameters and helps small models.

`prefill` and `decode_step` are the same decoder with a key/value cache, for generation.
keras-hub's own cache writes with `ops.slice_update`, which the TensorFlow backend lowers to
the XLA op XlaDynamicUpdateSlice that stock TF Serving cannot run; here the cache grows by
concatenation instead and is passed to the keras-hub blocks as a ready cache. That reads the
blocks' attention sublayers (private attributes of keras-hub 0.32, pinned in setup.cfg);
a test checks cached decoding against recomputing the prefix.
"""

import keras
import keras_hub

from components.common import PAD_ID


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
            keras_hub.layers.TransformerEncoder(ff_dim, num_heads, dropout=dropout, normalize_first=True,
                                                name=f"encoder_{i}")
            for i in range(num_layers)]
        self.decoder_blocks = [
            keras_hub.layers.TransformerDecoder(ff_dim, num_heads, dropout=dropout, normalize_first=True,
                                                name=f"decoder_{i}")
            for i in range(num_layers)]
        self.encoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="encoder_norm")
        self.decoder_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="decoder_norm")

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
        x = self.decoder_embedding(decoder_ids)
        for block in self.decoder_blocks:
            x = block(x, encoder_states, encoder_padding_mask=encoder_mask, training=training)
        return self.logits(x)

    def logits(self, x):
        """Next-token logits from the last decoder block's output (tied to the token embedding)."""
        return self.decoder_embedding.token_embedding(self.decoder_norm(x), reverse=True)

    def prefill(self, decoder_ids, encoder_states, encoder_mask):
        """Decodes a whole prefix [B, T]: logits [B, T, V], and per block the self-attention
        cache [B, 2, T, heads, head_dim] and the cross-attention cache [B, 2, S, heads, head_dim]."""
        x = self.decoder_embedding(decoder_ids)
        self_caches, cross_caches = [], []
        for block in self.decoder_blocks:
            self_caches.append(_self_attention_key_value(block, x))
            cross = block._cross_attention_layer
            cross_caches.append(keras.ops.stack([cross._key_dense(encoder_states), cross._value_dense(encoder_states)], 1))
            x = block(x, encoder_states, encoder_padding_mask=encoder_mask, training=False)
        return self.logits(x), self_caches, cross_caches

    def decode_step(self, token_ids, position, self_caches, cross_caches, encoder_states, encoder_mask):
        """Feeds one token per row ([B, 1] at `position`); returns its logits [B, V] and the
        self-attention caches grown by one position."""
        x = self.decoder_embedding(token_ids, start_index=position)
        grown = []
        for block, cache, cross_cache in zip(self.decoder_blocks, self_caches, cross_caches):
            cache = keras.ops.concatenate([cache, _self_attention_key_value(block, x)], axis=2)
            # The cache holds exactly the positions before and at this one: no causal mask needed.
            x, _, _ = block(x, encoder_states, encoder_padding_mask=encoder_mask, self_attention_cache=cache,
                            cross_attention_cache=cross_cache, use_causal_mask=False, training=False)
            grown.append(cache)
        return self.logits(x)[:, -1, :], grown

    def call(self, inputs, training=False):
        encoder_ids, decoder_ids = inputs
        states, mask = self.encode(encoder_ids, training=training)
        return self.decode(decoder_ids, states, mask, training=training)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "max_prompt_tokens": self.max_prompt_tokens,
                "max_story_tokens": self.max_story_tokens, "d_model": self.d_model, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "ff_dim": self.ff_dim, "dropout": self.dropout}


def _self_attention_key_value(block, x):
    """The keys and values [B, 2, T, heads, head_dim] a decoder block's self-attention makes of x."""
    attention = block._self_attention_layer
    h = block._self_attention_layer_norm(x) if block.normalize_first else x
    return keras.ops.stack([attention._key_dense(h), attention._value_dense(h)], axis=1)
