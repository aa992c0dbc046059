"""`python -m pipeline.run`: one command from a story corpus to a pushed SavedModel.

    ingest -> tokenizer -> [tuner] -> trainer -> evaluator -> exporter -> pusher

Each step is a plain function in components/; this file only wires them together, one
step per block, so the whole DAG reads in one screen. Flags are in pipeline/flags.py.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the log

from absl import flags, logging

from pipeline import cli
from pipeline import flags as storygen_flags
from pipeline.artifacts import PipelineRun

storygen_flags.define_pipeline_flags()
FLAGS = flags.FLAGS
# How ingest reads a source: they change its output, so they are part of its cache key.
SOURCE_FLAGS = ("text_key", "prompt_key", "title_key", "lang_key", "tags_key", "text_separator", "tfds_text_key",
                "tfds_data_dir")


def run_pipeline(f) -> dict:
    """Runs every step with the flag values in `f`; returns the pusher's manifest."""
    # Imported here so that `--help` and flag errors answer without loading TensorFlow.
    import keras

    from components import evaluator, exporter, ingest, pusher, tokenizer, trainer, transform, tuner
    from components.common import UserError

    # Multi-worker training configures collective ops, which must happen before any other TensorFlow work.
    strategy = trainer.make_strategy(f.distribution_strategy, f.tpu)
    chief = trainer.is_chief(f.distribution_strategy)
    if f.tune and f.distribution_strategy == "multi_worker_mirrored":
        raise UserError("--tune runs on one host: tune first, then train multi-worker with the best values "
                        "(best_hparams.json) as flags.")
    # Seeds initialisation and dropout; done first, as seeding frees eager TensorFlow resources.
    keras.utils.set_random_seed(f.seed)
    run = PipelineRun(f.pipeline_root, f.run_id or time.strftime("%Y%m%d-%H%M%S"), use_cache=f.cache)
    print(f"storygen run {run.dir}", flush=True)

    # Ingest: read and validate the stories, write deterministic train/eval/test TFRecord splits.
    ingested = run.step(
        "ingest", lambda out: ingest.ingest(
            f.data, out, seed=f.seed, eval_fraction=f.eval_fraction, test_fraction=f.test_fraction,
            num_shards=f.num_shards, window_bytes=f.window_bytes, max_chars=f.max_chars,
            max_bad_fraction=f.max_bad_fraction, builtin_count=f.builtin_count,
            builtin_langs=f.builtin_langs, encoding=f.encoding, **_values(f, *SOURCE_FLAGS, "num_parallel_reads")),
        inputs={"data": f.data},
        parameters=_values(f, "seed", "eval_fraction", "test_fraction", "num_shards", "window_bytes", "max_chars",
                           "max_bad_fraction", "builtin_count", "builtin_langs", "encoding", *SOURCE_FLAGS),
        describe=lambda m: (f"{m['stories']} stories -> {m['examples']} examples, {m['quarantined']} quarantined, "
                            f"{m['stories_per_second']:.0f} stories/s"))
    examples = ingested["outputs"]["path"]

    # Tokenizer: train SentencePiece on the training split.
    tokenized = run.step(
        "tokenizer", lambda out: tokenizer.train_tokenizer(examples, out, vocab_size=f.vocab_size, seed=f.seed),
        inputs={"examples": examples}, parameters=_values(f, "vocab_size", "seed"),
        describe=lambda m: (f"{m['vocab_size']} pieces, {m['eval_chars_per_token']:.2f} chars/token, "
                            f"byte fallback {m['eval_byte_fallback_rate']:.2%} of eval tokens"))
    tok = tokenizer.make_tokenizer(tokenizer.load_proto(tokenized["outputs"]["path"]))
    vocab_size = tokenized["metrics"]["vocab_size"]

    # Tuner (--tune): KerasTuner search; its best values replace the flags' for the trainer.
    hparams = _values(f, "d_model", "num_layers", "num_heads", "ff_dim", "dropout", "learning_rate", "warmup_steps",
                      "label_smoothing")
    shapes = dict(max_prompt_tokens=f.max_prompt_tokens, max_story_tokens=f.max_story_tokens)
    if f.tune:
        tune_parameters = dict(_values(f, "tuner", "max_trials", "max_epochs_per_trial", "tune_steps_per_epoch",
                                       "tune_time_budget", "tune_workers", "batch_size", "weight_decay", "seed",
                                       "lr_schedule", "clip_norm"),
                               base_config=dict(hparams, vocab_size=vocab_size, **shapes))
        tuned = run.step(
            "tuner", lambda out: tuner.tune(
                examples, tokenized["outputs"]["path"], out, base_config=tune_parameters["base_config"],
                tuner=f.tuner, max_trials=f.max_trials, max_epochs_per_trial=f.max_epochs_per_trial,
                steps_per_epoch=f.tune_steps_per_epoch, time_budget=f.tune_time_budget, workers=f.tune_workers,
                batch_size=f.batch_size, weight_decay=f.weight_decay, seed=f.seed, lr_schedule=f.lr_schedule,
                clip_norm=f.clip_norm),
            inputs={"examples": examples, "tokenizer": tokenized["outputs"]["path"]}, parameters=tune_parameters,
            # A member of a tuning cluster must join the search: a cached result would leave the others waiting.
            cacheable=tuner.cluster_role() is None, describe=tuner.describe)
        if tuner.is_cluster_worker():
            print("[pipeline] tuned as a tuning-cluster worker; the chief trains with the best values.", flush=True)
            return tuned
        hparams = tuned["metrics"]["best_hparams"]

    # Trainer: fit the Transformer on tf.data batches (the transform, built on demand).
    model_config = dict(vocab_size=vocab_size, **shapes, **{key: hparams[key] for key in (
        "d_model", "num_layers", "num_heads", "ff_dim", "dropout")})
    training = dict(hparams=hparams, **_values(f, "batch_size", "epochs", "steps", "weight_decay", "lr_schedule",
                                               "clip_norm", "mixed_precision", "jit_compile", "early_stopping_patience",
                                               "time_budget", "distribution_strategy", "seed", "profile_steps"))

    def train(out):
        train_data = transform.training_batches(examples, "train", tok, batch_size=f.batch_size, shuffle=True,
                                                seed=f.seed, **shapes)
        eval_data = transform.training_batches(examples, "eval", tok, batch_size=f.batch_size, shuffle=False,
                                               **shapes)
        steps_per_epoch = transform.batches_per_epoch(examples, "train", f.batch_size)
        return trainer.train(
            train_data, eval_data, out, model_config=model_config, steps_per_epoch=steps_per_epoch, epochs=f.epochs,
            steps=f.steps, learning_rate=hparams["learning_rate"], warmup_steps=hparams["warmup_steps"],
            label_smoothing=hparams["label_smoothing"], weight_decay=f.weight_decay, lr_schedule=f.lr_schedule,
            clip_norm=f.clip_norm, strategy_name=f.distribution_strategy, strategy=strategy,
            mixed_precision=f.mixed_precision, jit_compile=f.jit_compile,
            checkpoint_every_steps=f.checkpoint_every_steps, early_stopping_patience=f.early_stopping_patience,
            time_budget=f.time_budget or None, tokenizer=tok,
            profile_steps=tuple(map(int, f.profile_steps)) if f.profile_steps else None)

    trained = run.step(
        "trainer", train, inputs={"examples": examples, "tokenizer": tokenized["outputs"]["path"]},
        parameters=dict(model_config, **training),
        describe=lambda m: (f"{m['steps']} steps, loss {m['loss']:.3f}, val_loss {m['val_loss']:.3f} "
                            f"(val perplexity {m['val_perplexity']:.1f}), {m['tokens_per_second']:.0f} tokens/s"
                            + ("" if m["stopped"] == "completed" else f", stopped: {m['stopped']}")))
    if not chief:
        print("[pipeline] trained as a worker; the chief evaluates, exports and pushes.", flush=True)
        return trained
    model = trainer.load_model(trained["outputs"]["path"])

    # Evaluator: test-split metrics, and the blessing against the newest pushed version.
    model_base_path = os.path.join(f.serving_model_dir, f.model_name)
    pushed = pusher.versions(model_base_path)
    baseline = os.path.join(model_base_path, str(pushed[-1])) if pushed else None
    evaluated = run.step(
        "evaluator", lambda out: evaluator.evaluate(
            model, tok, examples, out, batch_size=f.batch_size, baseline_model=baseline,
            max_bpc_regression=f.max_bpc_regression, max_bits_per_char=f.max_bits_per_char,
            generate_count=f.eval_generate_count, **shapes),
        inputs={"examples": examples, "tokenizer": tokenized["outputs"]["path"], "model": trained["outputs"]["path"],
                **({"baseline_model": baseline} if baseline else {})},
        parameters=dict(shapes, **_values(f, "batch_size", "max_bpc_regression", "max_bits_per_char",
                                          "eval_generate_count")),
        describe=_describe_evaluation)
    blessing = evaluated["metrics"]["blessing"]

    # Exporter: a SavedModel that tokenises, decodes and detokenises in its graph.
    exported = run.step(
        "exporter", lambda out: {"saved_model": exporter.export(
            model, tok, out, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
            max_new_tokens_limit=f.max_new_tokens_limit)},
        inputs={"tokenizer": tokenized["outputs"]["path"], "model": trained["outputs"]["path"]},
        parameters=_values(f, "temperature", "top_k", "top_p", "max_new_tokens_limit"),
        describe=lambda m: "SavedModel with signatures serving_default, generate, beam_search, score")

    # Pusher: copy a blessed model atomically to <serving_model_dir>/<model_name>/<next version>/.
    saved_model = os.path.join(exported["outputs"]["path"], exporter.SAVED_MODEL_DIR)
    if not blessing["blessed"] and f.force_push:
        logging.warning("Pushing a model the evaluator did not bless (--force_push): %s", blessing["reason"])

    def push(out):
        if blessing["blessed"] or f.force_push:
            return {"pushed": True, **pusher.push(saved_model, f.serving_model_dir, f.model_name)}
        return {"pushed": False, "reason": blessing["reason"]}

    return run.step(
        "pusher", push, inputs={"saved_model": exported["outputs"]["path"]},
        parameters=_values(f, "serving_model_dir", "model_name", "force_push"), cacheable=False,
        describe=lambda m: (f"pushed version {m['version']} to {m['path']}" if m["pushed"]
                            else f"not pushed: {m['reason']}"))


def _describe_evaluation(m) -> str:
    test, generation = m["test"], m["generation"]["all"]
    text = (f"test perplexity {test['perplexity']:.2f} (unigram {test['unigram_perplexity']:.1f}), "
            f"{test['bits_per_char']:.3f} bits/char (char 5-gram {test['char_5gram_bits_per_char']:.3f}")
    if "exact_bits_per_char" in test:
        text += f", exact {test['exact_bits_per_char']:.3f}"
    text += f"), BLEU {generation['bleu']:.3f}, ROUGE-L {generation['rouge_l']:.3f}"
    if "grammar_acceptance_rate" in generation:
        text += f", {generation['grammar_acceptance_rate']:.0%} accepted by the grammar"
    return text + f"; {'blessed' if m['blessing']['blessed'] else 'NOT blessed: ' + m['blessing']['reason']}"


def _values(f, *names) -> dict:
    return {name: f[name].value for name in names}


def main():
    cli.run(lambda: run_pipeline(FLAGS))


if __name__ == "__main__":
    main()
