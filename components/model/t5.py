"""T5 (v1.0 with ReLU, v1.1 and Flan-T5 with gated GELU) behind storygen's decoding interface.

What keras-hub's T5 decoder computes per token, with plain TensorFlow ops: RMS layer norms
without bias, unscaled dot-product attention plus a learned relative-position bias that the
first layer's self-attention computes and every layer shares, cross-attention to the prompt,
a feed-forward block (gated: activation(x W_in) * (x W_gate)), a final norm, and the output
projection (tied to the token embedding with the states scaled by d_model^-0.5, or T5 1.1's
separate head). The relative bias depends on the distance alone and saturates at 128 tokens,
so the decoder behaves the same past its trained length; the window (`max_story_tokens`)
bounds the cache, and a longer story slides it.
"""

import warnings

import tensorflow as tf

from components.common import SpecialIds
from components.model import blocks, decoding
from components.model.pretrained import PretrainedSeq2Seq


# keras-hub's T5 attention layers ignore the Keras mask its embeddings attach (the padding masks
# are passed explicitly), and Keras warns about that on every trace: noise in every run's log.
warnings.filterwarnings("ignore", message=r"Layer '\w+' \(of type T5MultiHeadAttention\) was passed an input with a mask",
                        category=UserWarning)


def _kernel(layer):
    """A bias-free Dense layer's (kernel, None) (its LoRA factors merged, as `kernel` gives it)."""
    return tf.convert_to_tensor(layer.kernel), None


def _rms_weights(layer):
    """T5's layer norm (an RMS norm, `blocks.rms_norm`) as (scale, epsilon)."""
    return tf.convert_to_tensor(layer.weight), layer.epsilon


class T5(PretrainedSeq2Seq):
    """A keras-hub T5Seq2SeqLM. T5 frames a prompt with EOS after it and starts the decoder from
    the padding id, as keras-hub's T5Seq2SeqLMPreprocessor does.

    `presets.load("t5_small_multi", model_config)` builds one.
    """

    LORA_LAYERS = ("query_projector", "value_projector")

    @staticmethod
    def special_ids(tokenizer) -> SpecialIds:
        return SpecialIds(pad=tokenizer.pad_token_id, start=tokenizer.pad_token_id, eos=tokenizer.end_token_id,
                          prompt_start=None, prompt_end=tokenizer.end_token_id)

    def scale_states(self, states):
        if self.backbone.tie_embedding_weights:
            return states * tf.cast(self.backbone.hidden_dim ** -0.5, states.dtype)
        return states

    def decoding_weights(self) -> dict:
        """The decoder's weights for `decode_step`, read once per generation, and the relative
        position bias of every distance within the window."""
        layers = self.backbone.decoder_transformer_layers
        weights = []
        for layer in layers:
            attention, cross = layer.self_attention, layer.cross_attention
            feedforward = [layer.input_projector] + ([layer.gate_projector] if layer.use_gated_activation else [])
            weights.append({
                "self_norm": _rms_weights(layer.self_attention_layer_norm),
                "qkv": (tf.concat([_kernel(attention.query_projector)[0], _kernel(attention.key_projector)[0],
                                   _kernel(attention.value_projector)[0]], axis=1), None),
                "self_output": _kernel(attention.output_projector),
                "cross_norm": _rms_weights(layer.cross_attention_layer_norm),
                "cross_query": _kernel(cross.query_projector),
                "cross_key": _kernel(cross.key_projector),
                "cross_value": _kernel(cross.value_projector),
                "cross_output": _kernel(cross.output_projector),
                "feedforward_norm": _rms_weights(layer.layer_norm),
                # Gated: the activation's and the gate's kernels side by side, one matmul.
                "intermediate": (tf.concat([_kernel(f)[0] for f in feedforward], axis=1), None),
                "activation": layer.input_projector.activation,
                "gated": layer.use_gated_activation,
                "output": _kernel(layer.output_projector),
            })
        window = self.max_story_tokens
        # The first layer's bias for a query at window - 1 over keys 0 .. window - 1: row j is
        # the bias at distance window - 1 - j, [window, heads].
        bias = layers[0].self_attention.compute_bias(1, window, query_start_index=window - 1)
        embedding = self.backbone.token_embedding
        return {"blocks": weights, "norm": _rms_weights(self.backbone.decoder_layer_norm),
                "tokens": tf.convert_to_tensor(embedding.embeddings), "head": self.head(),
                "position_bias": tf.transpose(bias[0, :, 0, :])}

    def start_cache(self, encoder_states, encoder_mask, weights, cache_size):
        return blocks.start_cache(weights["blocks"], encoder_states, encoder_mask, self.backbone.num_heads, cache_size)

    def decode_step(self, token_ids, position, cache, weights):
        """One token per row at window `position`: its logits [B, V] and the cache with its keys
        and values written in place (the cache passed in must not be used again)."""
        # Keys 0 .. position are at distances position .. 0: [position + 1, heads].
        bias = weights["position_bias"][self.max_story_tokens - 1 - position:]
        x, cache = blocks.decoder_blocks_step(tf.gather(weights["tokens"], token_ids), position, cache,
                                              weights["blocks"], self.backbone.num_heads, normalize_first=True,
                                              norm=blocks.rms_norm, self_bias=bias)
        x = self.scale_states(blocks.rms_norm(x, weights["norm"]))
        logits = decoding.project(x, weights["head"])
        return logits, cache
