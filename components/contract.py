"""The serving contract: the exported SavedModel's signatures, their inputs and outputs.

The one definition that the exporter builds its signatures from, that clients send their
requests by, and that the tests check the SavedModel against. Dtypes are TensorFlow's names,
so this module needs no TensorFlow; a shape is a tuple where None is any length (B is the
batch, T the generated tokens).

>>> [tensor.name for tensor in SIGNATURES["generate"].inputs]
['prompt', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed']
>>> PARAMETER_DTYPES["seed"]
'int64'
>>> SIGNATURES["score"].output_names
('log_likelihood', 'num_tokens', 'bits_per_char')
"""

import typing


class Tensor(typing.NamedTuple):
    name: str
    dtype: str  # a tf.dtypes.DType name: "string", "int32", "float32", "int64"
    shape: tuple  # None for any length


class Signature(typing.NamedTuple):
    inputs: tuple
    outputs: tuple

    @property
    def input_names(self) -> tuple:
        return tuple(tensor.name for tensor in self.inputs)

    @property
    def output_names(self) -> tuple:
        return tuple(tensor.name for tensor in self.outputs)


PROMPT = Tensor("prompt", "string", (None,))
STORY = Tensor("story", "string", (None,))
NUM_TOKENS = Tensor("num_tokens", "int32", (None,))
LOG_PROB = Tensor("log_prob", "float32", (None,))
MAX_NEW_TOKENS = Tensor("max_new_tokens", "int32", ())
TOKEN_IDS = Tensor("token_ids", "int32", (None, None))
SAMPLING = (Tensor("temperature", "float32", ()), Tensor("top_k", "int32", ()), Tensor("top_p", "float32", ()),
            Tensor("seed", "int64", ()))

SIGNATURES = {
    "serving_default": Signature(inputs=(PROMPT,), outputs=(STORY, NUM_TOKENS)),
    "generate": Signature(inputs=(PROMPT, MAX_NEW_TOKENS, *SAMPLING), outputs=(STORY, NUM_TOKENS, LOG_PROB, TOKEN_IDS)),
    # `generate` going on from a story's first tokens, for at most max_new_tokens more (streaming).
    "continue_story": Signature(inputs=(PROMPT, TOKEN_IDS, MAX_NEW_TOKENS, *SAMPLING),
                                outputs=(STORY, NUM_TOKENS, LOG_PROB, TOKEN_IDS)),
    "beam_search": Signature(inputs=(PROMPT, MAX_NEW_TOKENS, Tensor("num_beams", "int32", ())),
                             outputs=(STORY, NUM_TOKENS, LOG_PROB)),
    "score": Signature(inputs=(PROMPT, Tensor("story", "string", (None,))),
                       outputs=(Tensor("log_likelihood", "float32", (None,)), NUM_TOKENS,
                                Tensor("bits_per_char", "float32", (None,)))),
}
DEFAULT_SIGNATURE = "serving_default"
# TF Serving's model warm-up file, inside a SavedModel: PredictionLog records that a server
# replays before the version takes traffic (the exporter writes it, storygen-serve reads it).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"

# The scalar parameters a request may send, and their dtypes.
PARAMETER_DTYPES = {tensor.name: tensor.dtype for signature in SIGNATURES.values() for tensor in signature.inputs
                    if tensor.shape == ()}
