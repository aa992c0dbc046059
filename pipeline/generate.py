"""`python -m pipeline.generate`: writes stories with a pushed SavedModel.

    python -m pipeline.generate --model_dir saved_models/storygen --prompt 从前有座山
    python -m pipeline.generate --prompt "Once upon a time, in a faraway kingdom" --tag en --tag fable

The model is loaded with plain `tf.saved_model.load`: the SavedModel needs only
tensorflow and tensorflow_text (for its SentencePiece ops), not storygen.
"""

import os

from absl import flags

from components import cli, control_tags
from components.common import UserError
from pipeline import flags as storygen_flags

storygen_flags.define_generate_flags()
FLAGS = flags.FLAGS


def resolve_saved_model(model_dir: str) -> str:
    """`model_dir` itself if it is a SavedModel, else its newest integer version."""
    if os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        return model_dir
    versions = sorted(int(v) for v in os.listdir(model_dir) if v.isdigit()) if os.path.isdir(model_dir) else []
    if not versions:
        raise UserError(f"No SavedModel or integer version folder in '{model_dir}': run the pipeline first "
                                "or point --model_dir at saved_models/<model_name>.")
    return os.path.join(model_dir, str(versions[-1]))


def load(saved_model_path: str):
    """The SavedModel, loaded with plain TensorFlow."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the SentencePiece ops the graph uses

    return tf.saved_model.load(saved_model_path)


def generate(model, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, tags=()) -> list[str]:
    """The loaded `model`'s stories for `prompts`, each written with the control `tags`."""
    import tensorflow as tf

    known = control_tags.of_model(model)
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise UserError(f"The model has no control tag {', '.join(unknown)}; its tags are "
                        f"{', '.join(known) or 'none (it was trained without them)'}.")
    prompts = [control_tags.tagged(prompt, tags) for prompt in prompts]
    signature = model.signatures["generate"]
    limit = int(model.max_new_tokens_limit.numpy())
    max_new_tokens = min(max_new_tokens or int(model.decoder_window.numpy()), limit)
    out = signature(prompt=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens),
                    temperature=tf.constant(temperature), top_k=tf.constant(top_k), top_p=tf.constant(top_p),
                    seed=tf.constant(seed, tf.int64))
    return [story.decode("utf-8", errors="replace") for story in out["story"].numpy()]


def main():
    cli.run(_main)


def _main(args):
    model = load(resolve_saved_model(FLAGS.model_dir))
    stories = generate(model, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                       top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, tags=FLAGS.tag)
    for prompt, story in zip(FLAGS.prompt, stories):
        print(join_story(prompt, story) + "\n")


def join_story(prompt: str, story: str) -> str:
    """The prompt and its continuation as one text: a space between them only where both
    sides are Latin script (Chinese runs on without one)."""
    space = prompt[-1:].isascii() and story[:1].isascii() and not prompt[-1:].isspace()
    return prompt + (" " if space and prompt and story else "") + story


if __name__ == "__main__":
    main()
