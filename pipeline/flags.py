"""The pipeline's command-line flags, made from the step configs in `components/config.py`.

One flag per config field, with the field's name, default, help text, bounds and choices; a
field that several steps share is one flag. `pipeline/configs/*.flags` hold other
configurations (--flagfile). Nothing here imports TensorFlow.
"""

import dataclasses
import textwrap
import typing

from absl import flags

from components import config
from components.config import ExportConfig, PipelineConfig

FLAGS = flags.FLAGS


def define_pipeline_flags(flag_values: flags.FlagValues = FLAGS):
    """Defines one flag per field of the step configs (`config.flag_fields`)."""
    for name, (field, hint) in config.flag_fields().items():
        _define(name, field, hint, flag_values)
    flags.register_validator(
        "profile_steps", lambda v: v is None or (len(v) == 2 and all(x.isdigit() for x in v)),
        message="--profile_steps takes two step numbers, e.g. --profile_steps=10,20", flag_values=flag_values)


def grouped_help(flag_values: flags.FlagValues = FLAGS) -> str:
    """`--help`: the pipeline's flags grouped by the step they configure, in the pipeline's order
    (a flag that several steps share is listed with the first)."""
    groups, listed = [], set()
    for step in dataclasses.fields(PipelineConfig):
        names = [field.name for field in dataclasses.fields(step.type)
                 if "help" in field.metadata and field.name not in listed]
        listed.update(names)
        lines = [f"{step.name}:"]
        for name in names:
            flag = flag_values[name]
            syntax = f"--[no]{name}" if flag.boolean else f"--{name}"
            lines += textwrap.wrap(f"{syntax}: {flag.help}", 100, initial_indent="  ", subsequent_indent="    ")
            lines.append(f"    (default: {flag.default_as_str})")
        groups.append("\n".join(lines))
    return "\n\n".join(groups)


def pipeline_config(flag_values: flags.FlagValues = FLAGS) -> PipelineConfig:
    """The configs of every step from the parsed flags."""
    return PipelineConfig.from_values({name: flag_values[name].value for name in config.flag_fields()})


def _define(name: str, field, hint, flag_values: flags.FlagValues):
    meta, default = field.metadata, field.default
    common = dict(flag_values=flag_values)
    bounds = {key: meta[short] for key, short in (("lower_bound", "lower"), ("upper_bound", "upper"))
              if meta[short] is not None}
    kind = typing.get_origin(config.value_type(hint)) or config.value_type(hint)
    if meta["choices"]:
        flags.DEFINE_enum(name, default, meta["choices"], meta["help"], **common)
    elif kind is tuple:
        flags.DEFINE_list(name, list(default) if default is not None else None, meta["help"], **common)
    elif kind is bool:
        flags.DEFINE_boolean(name, default, meta["help"], **common)
    elif kind is int:
        flags.DEFINE_integer(name, default, meta["help"], **bounds, **common)
    elif kind is float:
        flags.DEFINE_float(name, default, meta["help"], **bounds, **common)
    else:
        flags.DEFINE_string(name, default, meta["help"], **common)


def define_generate_flags():
    """`python -m pipeline.generate`'s flags; the sampling defaults are serving_default's."""
    sampling = ExportConfig()
    flags.DEFINE_string("model_dir", "saved_models/storygen",
                        "A model base path (its newest integer version is used) or one SavedModel directory.")
    flags.DEFINE_multi_string("prompt", ["从前有座山，"], "Prompt to continue; repeat the flag for several.")
    flags.DEFINE_multi_string("tag", [], "Control tag to write the stories with, such as a language (zh, en) or "
                              "a genre (fable, fairy_tale); repeat the flag for several. The model lists its own.")
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate at most (default: the decoder's window; up to "
                         "the model's max_new_tokens_limit, sliding the window).", lower_bound=1)
    flags.DEFINE_float("temperature", sampling.temperature, "Sampling temperature (0 = greedy).", lower_bound=0.0)
    flags.DEFINE_integer("top_k", sampling.top_k, "Keep only the k most likely tokens (0 = off).", lower_bound=0)
    flags.DEFINE_float("top_p", sampling.top_p, "Keep the most likely tokens up to this probability (1 = off).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same story.")
