"""BART behind storygen's decoding interface.

keras-hub's BART decoder is its `TransformerDecoder` block with layer norm after each
residual sum (post-norm), learned positions added to the token embedding and normalised,
and an output projection tied to the token embedding; per token it is `blocks.decoder_blocks_step`
with `normalize_first=False`. Its positions are learned up to `max_sequence_length` (1024 for
the real presets): the window (`max_story_tokens`) may not exceed it, and a longer story
slides the window, so no position past the trained ones is ever used.
"""

import tensorflow as tf

from components.common import SpecialIds
from components.model import blocks, decoding, internals
from components.model.pretrained import PretrainedSeq2Seq


class Bart(PretrainedSeq2Seq):
    """A keras-hub BartSeq2SeqLM. BART frames a prompt with <s> before and </s> after it, and
    the decoder reads </s> <s> before the story, as keras-hub's BartSeq2SeqLMPreprocessor packs them.

    `presets.load("bart_base_en", model_config)` builds one.
    """

    @staticmethod
    def special_ids(tokenizer) -> SpecialIds:
        return SpecialIds(pad=tokenizer.pad_token_id, start=tokenizer.end_token_id, eos=tokenizer.end_token_id,
                          prompt_start=tokenizer.start_token_id, prompt_end=tokenizer.end_token_id,
                          story_start=tokenizer.start_token_id)

    def decoding_weights(self) -> dict:
        backbone = self.backbone
        return {"blocks": [blocks.decoder_block_weights(internals.decoder_block_parts(layer), backbone.hidden_dim,
                                                        backbone.intermediate_dim)
                           for layer in backbone.decoder_transformer_layers],
                "embedding_norm": blocks.norm_weights(backbone.decoder_embeddings_layer_norm),
                "tokens": tf.convert_to_tensor(backbone.token_embedding.embeddings), "head": self.head(),
                "positions": tf.convert_to_tensor(backbone.decoder_position_embedding.position_embeddings)}

    def start_cache(self, encoder_states, encoder_mask, weights, cache_size):
        return blocks.start_cache(weights["blocks"], encoder_states, encoder_mask, self.backbone.num_heads, cache_size)

    def decode_step(self, token_ids, position, cache, weights):
        """One token per row at window `position`: its logits [B, V] and the cache with its keys
        and values written in place (the cache passed in must not be used again)."""
        x = tf.gather(weights["tokens"], token_ids) + weights["positions"][position]
        x = blocks.layer_norm(x, weights["embedding_norm"])
        x, cache = blocks.decoder_blocks_step(x, position, cache, weights["blocks"], self.backbone.num_heads,
                                              normalize_first=False)
        return decoding.project(x, weights["head"]), cache
