"""T5Gemma (an encoder-decoder adapted from Gemma 2) behind storygen's decoding interface.

What keras-hub's T5Gemma decoder computes per token, with plain TensorFlow ops: the token
embedding scaled by sqrt(d); in each layer three sublayers (self-attention, cross-attention,
a gated-GELU feed-forward), each with Gemma's RMS norm (x / rms(x) * (1 + scale)) before and
after it and a residual sum; grouped-query attention (fewer key/value heads than query heads)
with rotary positions in self-attention only, queries scaled by query_pre_attn_scalar^-0.5,
and the scores soft-capped (cap * tanh(scores / cap)) before masking; a layer of type
"sliding_attention" sees only the last `sliding_window` + 1 positions; a final RMS norm; the
output projection (the decoder's token embedding, tied or not); and the logits soft-capped.

Its vocabulary is Gemma's 256k SentencePiece pieces, which cover Chinese and English alike.
Rotary positions have no learned limit: the window (`max_story_tokens`) bounds the cache, and
a longer story slides it.
"""

import tensorflow as tf

from components.common import SpecialIds
from components.model import blocks
from components.model.blocks import dense_weights, rms_norm
from components.model.decoding import attend, blocks_read, dense, project, soft_cap, write_row, write_rows
from components.model.pretrained import PretrainedSeq2Seq


def _norm_weights(layer):
    """Gemma's RMSNormalization (x / rms(x) * (1 + scale), `blocks.rms_norm`) as (1 + scale, epsilon)."""
    return 1.0 + tf.convert_to_tensor(layer.scale), layer.epsilon


def rotary_tables(positions: int, head_dim: int, max_wavelength: float):
    """cos and signed sin [positions, head_dim] of rotary position embedding, as keras-hub's
    RotaryEmbedding lays them out (each frequency twice: first half, then second half); the
    sin's first half is negated, so that `rotate` is one roll of the features."""
    inverse_frequency = tf.pow(tf.constant(max_wavelength, tf.float32),
                               -tf.range(0, head_dim, 2, dtype=tf.float32) / float(head_dim))
    angles = tf.range(positions, dtype=tf.float32)[:, None] * inverse_frequency[None, :]
    return tf.cos(tf.concat([angles, angles], axis=-1)), tf.concat([-tf.sin(angles), tf.sin(angles)], axis=-1)


def rotate(x, cos, signed_sin):
    """Rotary embedding of x [..., head_dim] at one position: x * cos + (-x2, x1) * sin, where
    x1 and x2 are x's halves ((-x2, x1) is x rolled by half, its first half negated by `signed_sin`)."""
    return x * cos + tf.roll(x, shift=x.shape[-1] // 2, axis=-1) * signed_sin


class T5Gemma(PretrainedSeq2Seq):
    """A keras-hub T5GemmaSeq2SeqLM. Prompts end with <eos> and the decoder starts from <bos>,
    as keras-hub's T5GemmaSeq2SeqLMPreprocessor packs them for training. (Its generate() packs
    the prompt without the <eos>; storygen frames prompts alike in training and decoding.)

    `presets.load("t5gemma_s_s_prefixlm", model_config)` builds one.
    """

    SHAPE_KEYS = {"vocab_size": "vocabulary_size", "d_model": "decoder_hidden_dim",
                  "num_layers": "decoder_num_layers", "num_heads": "decoder_num_attention_heads",
                  "ff_dim": "decoder_intermediate_dim", "dropout": "dropout_rate"}

    @staticmethod
    def special_ids(tokenizer) -> SpecialIds:
        return SpecialIds(pad=tokenizer.pad_token_id, start=tokenizer.start_token_id, eos=tokenizer.end_token_id,
                          prompt_start=None, prompt_end=tokenizer.end_token_id)

    @property
    def logit_soft_cap(self):
        return self.backbone.final_logit_softcapping

    @property
    def decoder_embedding(self):
        return self.backbone.decoder_token_embedding

    def encode(self, encoder_ids, training=False):
        mask = tf.not_equal(encoder_ids, self.special.pad)
        states, _ = self.lm.call_encoder(encoder_ids, mask)
        return states, mask

    def decoding_weights(self) -> dict:
        """The decoder's weights for `decode_step`, read once per generation, and the rotary
        tables of the window's positions."""
        backbone = self.backbone
        width = backbone.decoder_num_attention_heads * backbone.decoder_head_dim

        def scaled(weights, scale):
            return weights[0] * scale, None if weights[1] is None else weights[1] * scale

        weights = []
        for layer in backbone.decoder_layers:
            attention, cross, mlp = layer.self_attn, layer.cross_attn, layer.mlp
            # The query scale folded into the query kernel (rotation is linear, so it commutes).
            query, key, value = (dense_weights(dense_layer, backbone.decoder_hidden_dim) for dense_layer in
                                 (attention.query_dense, attention.key_dense, attention.value_dense))
            query = scaled(query, attention.scaling)
            weights.append({
                "pre_self_norm": _norm_weights(layer.pre_self_attn_layernorm),
                "qkv": (tf.concat([query[0], key[0], value[0]], axis=1),
                        None if query[1] is None else tf.concat([query[1], key[1], value[1]], axis=0)),
                "self_output": dense_weights(attention.output_dense, width),
                "post_self_norm": _norm_weights(layer.post_self_attn_layernorm),
                "pre_cross_norm": _norm_weights(layer.pre_cross_attn_layernorm),
                "cross_query": scaled(dense_weights(cross.query_dense, backbone.decoder_hidden_dim), cross.scaling),
                "cross_key": dense_weights(cross.key_dense, backbone.cross_attention_hidden_size),
                "cross_value": dense_weights(cross.value_dense, backbone.cross_attention_hidden_size),
                "cross_output": dense_weights(cross.output_dense, width),
                "post_cross_norm": _norm_weights(layer.post_cross_attn_layernorm),
                "pre_feedforward_norm": _norm_weights(layer.pre_feedforward_layernorm),
                # The gate's and the up projection's kernels side by side, one matmul.
                "intermediate": (tf.concat([tf.convert_to_tensor(mlp.gate_proj.kernel),
                                            tf.convert_to_tensor(mlp.up_proj.kernel)], axis=1), None),
                "activation": mlp.act_fn,
                "output": (tf.convert_to_tensor(mlp.down_proj.kernel), None),
                "post_feedforward_norm": _norm_weights(layer.post_feedforward_layernorm),
                # Positions a query at p sees: p - sliding_window .. p (all of them: None).
                "sliding_window": backbone.sliding_window if layer.layer_type == "sliding_attention" else None,
            })
        cos, sin = rotary_tables(self.max_story_tokens, backbone.decoder_head_dim, backbone.rope_max_wavelength)
        return {"blocks": weights, "norm": _norm_weights(backbone.decoder_norm),
                "tokens": tf.convert_to_tensor(self.decoder_embedding.embeddings), "head": self.head(),
                "cos": cos, "sin": sin}

    def start_cache(self, encoder_states, encoder_mask, weights, cache_size):
        return blocks.start_cache(weights["blocks"], encoder_states, encoder_mask,
                                  self.backbone.decoder_num_key_value_heads, cache_size)

    def decode_step(self, token_ids, position, cache, weights):
        """One token per row at window `position`: its logits [B, V] and the cache with its keys
        and values written in place (the cache passed in must not be used again)."""
        backbone = self.backbone
        heads, kv_heads, head_dim = (backbone.decoder_num_attention_heads, backbone.decoder_num_key_value_heads,
                                     backbone.decoder_head_dim)
        groups = heads // kv_heads
        cos, sin = weights["cos"][position], weights["sin"][position]
        attention_cap = backbone.attn_logit_softcapping

        # Once per step, not per layer: the cache rows this position writes, and per kind of
        # layer the blocks it reads. Reshapes take -1 for the batch, so no layer computes a shape.
        batch = tf.shape(token_ids)[0]
        rows = write_rows(position, batch, kv_heads)
        windows = dict.fromkeys(block["sliding_window"] for block in weights["blocks"])  # in the layers' order
        reads = {window: blocks_read(position, batch, kv_heads, head_dim, window) for window in windows}

        # Grouped-query attention: queries [B, kv_heads, groups, head_dim] attend to keys and
        # values of kv_heads heads (groups is 1 when every head has its own keys).
        def query_heads(query):
            return tf.reshape(query, [-1, kv_heads, groups, head_dim])

        x = tf.gather(weights["tokens"], token_ids) * tf.sqrt(tf.cast(backbone.decoder_hidden_dim, tf.float32))
        keys, values = [], []
        for i, block in enumerate(weights["blocks"]):
            def sublayer(x, name, compute):
                return x + rms_norm(compute(rms_norm(x, block[f"pre_{name}_norm"])), block[f"post_{name}_norm"])

            def self_attention(h):
                # Queries and keys rotated together: [B, heads + kv_heads, head_dim].
                query_key, value = tf.split(tf.reshape(dense(h, block["qkv"]), [-1, heads + 2 * kv_heads, head_dim]),
                                            [heads + kv_heads, kv_heads], axis=1)
                query, key = tf.split(rotate(query_key, cos, sin), [heads, kv_heads], axis=1)
                keys.append(write_row(cache.keys[i], rows, key))
                values.append(write_row(cache.values[i], rows, value))
                read = reads[block["sliding_window"]]
                attended = attend(query_heads(query), read.of(keys[i]), read.of(values[i]), read.bias,
                                  cap=attention_cap)
                return dense(tf.reshape(attended, [-1, heads * head_dim]), block["self_output"])

            def cross_attention(h):
                attended = attend(query_heads(dense(h, block["cross_query"])), cache.cross_keys[i],
                                  cache.cross_values[i], cache.cross_bias, cap=attention_cap)
                return dense(tf.reshape(attended, [-1, heads * head_dim]), block["cross_output"])

            def feedforward(h):
                gate, up = tf.split(dense(h, block["intermediate"]), 2, axis=-1)
                return dense(block["activation"](gate) * up, block["output"])

            x = sublayer(x, "self", self_attention)
            x = sublayer(x, "cross", cross_attention)
            x = sublayer(x, "feedforward", feedforward)
        x = rms_norm(x, weights["norm"])
        return soft_cap(project(x, weights["head"]), self.logit_soft_cap), cache._replace(keys=keys, values=values)
