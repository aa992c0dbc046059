"""storygen's models: its own Transformer and pretrained keras-hub encoder-decoders, behind one
decoding interface (see `decoding`).

    transformer.py   StoryTransformer, storygen's own model
    pretrained.py    the adapter base for keras-hub Seq2SeqLM presets; t5.py, bart.py, t5gemma.py: one per architecture
    presets.py       which presets are supported, loading them
    decoding.py      the decoding loop, samplers, beam search, sliding window (StoryGenerator)
    blocks.py        keras-hub's TransformerDecoder block one token at a time
    internals.py     the only reads of keras-hub's private attributes
"""

import os

from components.config import ModelConfig
from components.model.transformer import StoryTransformer

MODEL_FILE = "model.keras"
PRESET_DIR = "preset"


def build_model(model_config: ModelConfig, load_weights: bool = True):
    """A model with its variables created (checkpoints restore into them): the preset
    `model_config.init_from` (with LoRA factors when `lora_rank`; its pretrained weights unless
    not `load_weights`), or a new StoryTransformer."""
    if model_config.init_from:
        from components.model import presets

        return presets.load(model_config.init_from, model_config, load_weights=load_weights)
    import tensorflow as tf

    model = StoryTransformer(**model_config.story_transformer_args())
    model((tf.zeros([1, 1], tf.int32), tf.zeros([1, 1], tf.int32)))
    return model


def save_model(model, output_dir: str):
    """Writes a trained model into a trainer folder: `model.keras`, or a fine-tuned preset as a
    keras-hub preset in `preset/` (LoRA factors merged)."""
    if isinstance(model, StoryTransformer):
        model.save(os.path.join(output_dir, MODEL_FILE))
    else:
        model.save_preset(os.path.join(output_dir, PRESET_DIR))


def load_model(trainer_dir: str, model_config: ModelConfig | None = None):
    """The model `save_model` wrote into a trainer folder; a fine-tuned preset takes its windows
    from `model_config` (the trainer's), as keras-hub's preset does not record them."""
    preset = os.path.join(trainer_dir, PRESET_DIR)
    if os.path.isdir(preset):
        import dataclasses

        from components.model import presets

        config = model_config and dataclasses.replace(model_config, init_from=preset, lora_rank=0)
        return presets.load(preset, config)
    import keras

    return keras.saving.load_model(os.path.join(trainer_dir, MODEL_FILE))
