"""Exports the trained model as a SavedModel that writes stories by itself.

The saved module is `decoding.StoryGenerator`: tokenisation, the decoding loop (a
tf.while_loop over a key/value cache) and detokenisation are all in the graph, so TF
Serving, or any process with only tensorflow and tensorflow_text, turns prompt strings into
story strings through the signatures of the serving contract (`components/contract.py`).
The graph holds only TensorFlow core ops and tf-text's tokenizer ops: no XLA, no Python.

Beside the graph, `assets.extra/tf_serving_warmup_requests` holds a PredictionLog of one
small request per signature (TF Serving's model warm-up file): a server replays them before a
new version takes traffic, so that no client pays the first call's graph optimisation (about
6 s per signature for a t5gemma_s_s-shaped model here).
"""

import os

import tensorflow as tf

from components.config import ExportConfig
from components.contract import SIGNATURES, WARMUP_FILE
from components.model.decoding import StoryGenerator

SAVED_MODEL_DIR = "saved_model"
# One request per signature, in both languages: short, so that replaying them costs little
# more than the graph optimisation they are there to trigger. (Plain values: a tensor made at
# import would start TensorFlow's runtime, which MultiWorkerMirroredStrategy must configure first.)
WARMUP_PROMPTS = ["从前有座山，", "Once upon a time"]
WARMUP_INPUTS = {
    "serving_default": {},
    "generate": {"max_new_tokens": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 0},
    "continue_story": {"token_ids": [[5, 6], [7, 8]], "max_new_tokens": 4, "temperature": 0.8, "top_k": 40,
                       "top_p": 0.95, "seed": 0},
    "beam_search": {"max_new_tokens": 4, "num_beams": 2},
    "score": {"story": ["山里有座庙。", " there was a fox."]},
}


def export(model, tokenizer, output_dir: str, config: ExportConfig) -> str:
    """Saves the generator to `<output_dir>/saved_model`, with its warm-up requests, and returns that path."""
    generator = StoryGenerator(model, tokenizer, temperature=config.temperature, top_k=config.top_k,
                               top_p=config.top_p, max_new_tokens_limit=config.max_new_tokens_limit)
    path = os.path.join(output_dir, SAVED_MODEL_DIR)
    tf.saved_model.save(generator, path, signatures={name: getattr(generator, name) for name in SIGNATURES})
    write_warmup_requests(path)
    return path


def write_warmup_requests(saved_model_path: str) -> None:
    """Writes `WARMUP_FILE`: TFRecords of PredictionLog protos, one PredictRequest per signature."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    warmup_path = os.path.join(saved_model_path, WARMUP_FILE)
    os.makedirs(os.path.dirname(warmup_path), exist_ok=True)
    with tf.io.TFRecordWriter(warmup_path) as writer:
        for signature, inputs in WARMUP_INPUTS.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            dtypes = {tensor.name: tensor.dtype for tensor in SIGNATURES[signature].inputs}
            for name, value in {"prompt": WARMUP_PROMPTS, **inputs}.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtypes[name]))
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
