"""Exports the trained model as a SavedModel that writes stories by itself.

The saved module is `decoding.StoryGenerator`: tokenisation, the decoding loop (a
tf.while_loop over a key/value cache) and detokenisation are all in the graph, so TF
Serving, or any process with only tensorflow and tensorflow_text, turns prompt strings into
story strings through the four signatures of the serving contract (`components/contract.py`).
The graph holds only TensorFlow core ops and tf-text's tokenizer ops: no XLA, no Python.
"""

import os

import tensorflow as tf

from components.config import ExportConfig
from components.contract import SIGNATURES
from components.model.decoding import StoryGenerator

SAVED_MODEL_DIR = "saved_model"


def export(model, tokenizer, output_dir: str, config: ExportConfig) -> str:
    """Saves the generator to `<output_dir>/saved_model` and returns that path."""
    generator = StoryGenerator(model, tokenizer, temperature=config.temperature, top_k=config.top_k,
                               top_p=config.top_p, max_new_tokens_limit=config.max_new_tokens_limit)
    path = os.path.join(output_dir, SAVED_MODEL_DIR)
    tf.saved_model.save(generator, path, signatures={name: getattr(generator, name) for name in SIGNATURES})
    return path
