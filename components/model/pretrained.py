"""A pretrained keras-hub encoder-decoder behind storygen's decoding interface.

`PretrainedSeq2Seq` wraps a keras-hub `Seq2SeqLM` (its backbone and preprocessor) so that the
trainer, evaluator and exporter use it exactly as they use `StoryTransformer`:

- training and scoring: `final_states`, `output_embeddings`, and calling the model on
  (encoder ids, decoder ids) for logits, all through the backbone's own forward pass;
- decoding: `encode`, `prefill`, `decoding_weights` and `decode_step`, the per-token decoder
  written with plain TensorFlow ops on the backbone's weights and a key/value cache in blocks
  of positions written in place (`decoding.write_row`), never keras-hub's `slice_update` (which
  lowers to XLA ops stock TF Serving lacks).

An architecture is one module (`t5.py`, `bart.py`, `t5gemma.py`) with a subclass that implements
`decoding_weights`, `start_cache` and `decode_step`, and its special ids; `presets.py` maps
keras-hub backbone classes to them.
"""

import keras
import tensorflow as tf

from components.common import SpecialIds
from components.model import decoding


class PretrainedSeq2Seq(keras.Model):
    """The shared part of every pretrained architecture's adapter.

    lm: a keras-hub Seq2SeqLM with its preprocessor; max_prompt_tokens, max_story_tokens: the
    encoder's longest input and the decoder's window (also set as the preprocessor's sequence
    lengths, which its generate() uses).
    """

    # Layer names that `enable_lora` targets (keras-hub's default names fit keras's attention).
    LORA_LAYERS: tuple[str, ...] = ()
    # storygen's shape flags and the backbone config keys they must agree with (`presets.check_shape_flags`).
    SHAPE_KEYS = {"vocab_size": "vocabulary_size", "d_model": "hidden_dim", "num_layers": "num_layers",
                  "num_heads": "num_heads", "ff_dim": "intermediate_dim", "dropout": "dropout"}
    logit_soft_cap = None  # Gemma squashes its logits: soft_cap * tanh(logits / soft_cap)

    def __init__(self, lm, max_prompt_tokens: int, max_story_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.lm = lm
        self.backbone = lm.backbone
        self.max_prompt_tokens = max_prompt_tokens
        self.max_story_tokens = max_story_tokens
        # Decoding chooses among the tokenizer's pieces: a model may have more ids than its
        # tokenizer has pieces (real T5: 32128 and 32100), and an id past the last piece cannot
        # be detokenized. Training and scoring use all of the model's ids, as keras-hub does.
        self.vocab_size = min(self.backbone.vocabulary_size, lm.preprocessor.tokenizer.vocabulary_size())
        self.special = self.special_ids(lm.preprocessor.tokenizer)
        lm.preprocessor.encoder_sequence_length = max_prompt_tokens
        lm.preprocessor.decoder_sequence_length = max_story_tokens

    @staticmethod
    def special_ids(tokenizer) -> SpecialIds:
        raise NotImplementedError

    def enable_lora(self, rank: int):
        """Freezes the backbone and trains rank-`rank` LoRA factors of its attention's query and
        value projections (keras-hub's `enable_lora`); saving merges them into the kernels."""
        self.backbone.enable_lora(rank, target_layer_names=list(self.LORA_LAYERS) or None)

    # ------------------------------------------------------------------ training and scoring

    def call(self, inputs, training=False):
        encoder_ids, decoder_ids = inputs
        states = self.final_states(encoder_ids, decoder_ids, training=training)
        return self.project(states)

    def final_states(self, encoder_ids, decoder_ids, training=False):
        """Decoder states [B, T, d] whose product with `output_embeddings` transposed are the logits."""
        outputs = self.backbone({
            "encoder_token_ids": encoder_ids,
            "encoder_padding_mask": tf.not_equal(encoder_ids, self.special.pad),
            "decoder_token_ids": decoder_ids,
            # The causal mask hides what follows a position, padding included; the start id
            # may be the padding id (T5), so no decoder position is masked as padding.
            "decoder_padding_mask": tf.ones_like(decoder_ids, tf.bool),
        }, training=training)
        return self.scale_states(outputs["decoder_sequence_output"])

    def scale_states(self, states):
        """What the LM head does to the decoder's output before the projection (T5 scales it)."""
        return states

    @property
    def decoder_embedding(self):
        """The decoder's keras ReversibleEmbedding (its input tokens and, tied or not, the output projection)."""
        return self.backbone.token_embedding

    @property
    def output_embeddings(self):
        """The output projection [the model's ids, d]: the token embedding, or the untied head's transpose."""
        embedding = self.decoder_embedding
        if embedding.tie_weights:
            return embedding.embeddings
        return tf.transpose(embedding.reverse_embeddings)

    def head(self):
        """The output projection of the tokenizer's pieces (see `vocab_size`), laid out [d, V] for decoding."""
        embedding = self.decoder_embedding
        if embedding.tie_weights:
            return tf.transpose(tf.convert_to_tensor(embedding.embeddings)[: self.vocab_size])
        return tf.convert_to_tensor(embedding.reverse_embeddings)[:, : self.vocab_size]

    def project(self, states):
        return decoding.soft_cap(tf.matmul(states, tf.cast(self.output_embeddings, states.dtype), transpose_b=True),
                                 self.logit_soft_cap)

    # ------------------------------------------------------------------ decoding

    def encode(self, encoder_ids, training=False):
        """Encoder states [B, S, d] and the prompt's padding mask [B, S]."""
        mask = tf.not_equal(encoder_ids, self.special.pad)
        return self.lm.call_encoder(encoder_ids, mask), mask

    def prefill(self, decoder_ids, encoder_states, encoder_mask, cache_size, weights=None):
        """Feeds a prefix [B, T] one position at a time through `decode_step`: the logits of
        its last position [B, 1, V] and the cache, with room for `cache_size` positions.
        (Generation's prefix is the start id alone, or half a window when it slides.)"""
        weights = weights or self.decoding_weights()
        batch = tf.shape(decoder_ids)[0]
        cache = self.start_cache(encoder_states, encoder_mask, weights, cache_size)

        def step(t, logits, cache):
            logits, cache = self.decode_step(decoder_ids[:, t], t, cache, weights)
            return t + 1, logits, cache

        initial = (tf.constant(0), tf.zeros([batch, self.vocab_size]), cache)
        _, logits, cache = tf.while_loop(lambda t, *_: t < tf.shape(decoder_ids)[1], step, initial,
                                         shape_invariants=decoding.unknown_shapes(initial))
        return logits[:, None, :], cache

    def start_cache(self, encoder_states, encoder_mask, weights, cache_size) -> decoding.DecoderCache:
        raise NotImplementedError

    def decoding_weights(self) -> dict:
        raise NotImplementedError

    def decode_step(self, token_ids, position, cache, weights):
        raise NotImplementedError

    def save_preset(self, preset_dir: str):
        """Writes the model, its tokenizer and preprocessor as a keras-hub preset
        (`keras_hub.models.Seq2SeqLM.from_preset(preset_dir)` loads it); LoRA factors are merged."""
        self.lm.save_to_preset(preset_dir)
