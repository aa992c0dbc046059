"""Pretrained keras-hub presets: which architectures storygen fine-tunes, and loading them.

`--init_from` takes a keras-hub preset handle (`t5_small_multi`, `kaggle://...`, `hf://...`)
or a local directory that `save_to_preset` wrote, loaded through keras-hub's own `from_preset`.
Each supported backbone class maps to one adapter module (`ARCHITECTURES`): adding an
architecture is one new module and one line here.
"""

import importlib
import os

from components.common import SpecialIds, UserError
from components.config import ModelConfig

# keras-hub backbone class -> (what users call it, "module:adapter class").
ARCHITECTURES = {
    "T5Backbone": ("T5 and Flan-T5", "components.model.t5:T5"),
    "BartBackbone": ("BART", "components.model.bart:Bart"),
    "T5GemmaBackbone": ("T5Gemma", "components.model.t5gemma:T5Gemma"),
}
# Transformers-format presets (hf://) name their architecture by model_type.
HF_MODEL_TYPES = {"t5": "T5Backbone", "bart": "BartBackbone", "t5gemma": "T5GemmaBackbone"}


def _adapter(backbone_class: str):
    module, name = ARCHITECTURES[backbone_class][1].split(":")
    return getattr(importlib.import_module(module), name)


def supported() -> str:
    return ", ".join(f"{name} ({backbone_class})" for backbone_class, (name, _) in ARCHITECTURES.items())


def resolve(handle: str, model_config: ModelConfig | None = None) -> str:
    """The preset's backbone class, after checking that storygen supports it and that the
    shape flags agree with it; one sentence (UserError) if the preset cannot be read."""
    local = os.path.isdir(handle)
    if not local and (os.sep in handle or handle.startswith(".")) and "://" not in handle:
        raise UserError(f"--init_from={handle}: no such preset directory.")
    from components.model import internals

    try:
        config = internals.preset_config(handle)
    except Exception as e:  # keras-hub raises whatever its download or file reader raised
        if local:
            raise UserError(f"--init_from={handle} is not a keras-hub preset directory (no readable config.json: "
                            f"{type(e).__name__}).") from None
        raise UserError(f"Could not download the keras-hub preset '{handle}' ({type(e).__name__}): download it on a "
                        f"machine with network access (keras_hub.models.Seq2SeqLM.from_preset('{handle}')"
                        f".save_to_preset(DIR)) and pass --init_from=DIR.") from None
    backbone_class = HF_MODEL_TYPES.get(config.get("model_type"), config.get("registered_name", "").split(">")[-1])
    if backbone_class not in ARCHITECTURES:
        raise UserError(f"--init_from={handle} is a {backbone_class or 'model'} preset; storygen fine-tunes "
                        f"{supported()}.")
    if model_config is not None and "config" in config:
        check_shape_flags(model_config, config["config"], handle, _adapter(backbone_class).SHAPE_KEYS)
    return backbone_class


def check_shape_flags(model_config: ModelConfig, backbone_config: dict, handle: str, shape_keys: dict):
    """Refuses shape flags set to other values than their defaults and the preset's
    (`shape_keys`: the adapter's flag -> backbone config key)."""
    defaults = ModelConfig()
    for flag, key in shape_keys.items():
        value = getattr(model_config, flag)
        if key in backbone_config and value != getattr(defaults, flag) and value != backbone_config[key]:
            raise UserError(f"--{flag}={value} contradicts the preset {handle} ({key}={backbone_config[key]}): "
                            f"with --init_from the preset's shape is used; drop --{flag}.")
    limit = backbone_config.get("max_sequence_length")
    for flag in ("max_prompt_tokens", "max_story_tokens"):
        if limit and getattr(model_config, flag) > limit:
            raise UserError(f"--{flag}={getattr(model_config, flag)} exceeds the preset's learned positions "
                            f"({limit}): use at most {limit}.")


def load_tokenizer(handle: str):
    """The preset's keras-hub tokenizer."""
    import keras_hub

    return keras_hub.models.Tokenizer.from_preset(handle)


def special_ids(tokenizer) -> SpecialIds:
    """The special ids of a preset tokenizer's architecture."""
    import keras_hub

    for backbone_class in ARCHITECTURES:
        if isinstance(tokenizer, _tokenizer_class(keras_hub, backbone_class)):
            return _adapter(backbone_class).special_ids(tokenizer)
    raise UserError(f"{type(tokenizer).__name__} is not the tokenizer of a supported preset ({supported()}).")


def _tokenizer_class(keras_hub, backbone_class: str):
    return getattr(keras_hub.models, backbone_class.replace("Backbone", "Tokenizer"))


def load(handle: str, model_config: ModelConfig | None = None, load_weights: bool = True):
    """The preset as a storygen model (a `pretrained.PretrainedSeq2Seq`), in the current dtype
    policy, with its weights unless not `load_weights`. model_config: the window sizes and LoRA
    rank (default: the preset's preprocessor's sequence lengths, within the learned positions,
    and no LoRA)."""
    import keras
    import keras_hub

    backbone_class = resolve(handle)
    adapter = _adapter(backbone_class)  # imported first: its module may set up warning filters
    lm = keras_hub.models.Seq2SeqLM.from_preset(handle, load_weights=load_weights,
                                                dtype=keras.config.dtype_policy().name)
    if lm.preprocessor is None:
        raise UserError(f"--init_from={handle} has no tokenizer: save the preset with its preprocessor.")
    if model_config is None:
        limit = lm.backbone.get_config().get("max_sequence_length") or float("inf")
        model_config = ModelConfig(max_prompt_tokens=min(lm.preprocessor.encoder_sequence_length, limit),
                                   max_story_tokens=min(lm.preprocessor.decoder_sequence_length, limit))
    check_shape_flags(model_config, lm.backbone.get_config(), handle, adapter.SHAPE_KEYS)
    model = adapter(lm, model_config.max_prompt_tokens, model_config.max_story_tokens)
    if model_config.lora_rank:
        model.enable_lora(model_config.lora_rank)
    return model


def preset_shape(model) -> dict:
    """The adapter's shape in storygen's flag names (for the run's hyperparameters)."""
    config = model.backbone.get_config()
    return {flag: config[key] for flag, key in model.SHAPE_KEYS.items() if key in config}
