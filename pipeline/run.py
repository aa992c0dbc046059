"""`python -m pipeline.run`: one command from a story corpus to a pushed SavedModel.

    ingest -> tokenizer -> [tuner] -> trainer -> evaluator -> exporter -> pusher

Each step is a public function of components/ that takes its config (components/config.py);
this file only wires them together, one step per block, so the whole DAG reads in one
screen. A step's config is its cache key. Flags are in pipeline/flags.py.
"""

import dataclasses
import os
import sys
import time

from absl import logging

from components import cli
from components.common import UserError
from components.config import PipelineConfig
from components.contract import SIGNATURES
from pipeline import flags as storygen_flags
from pipeline.artifacts import PipelineRun, Stopped

storygen_flags.define_pipeline_flags()


def run_pipeline(config: PipelineConfig) -> dict:
    """Runs every step with `config`; returns the pusher's manifest (a worker's last step's, or
    that of the step of --stop_after)."""
    # Imported here so that `--help` and flag errors answer without loading TensorFlow.
    import keras

    from components import trainer
    from components.model import presets

    training = config.training
    init_from = config.model.init_from
    if init_from:
        # Before anything is written: a preset that cannot be read or is not supported stops the run here.
        presets.resolve(init_from, config.model)
    if config.tuner.tune and training.distribution_strategy == "multi_worker_mirrored":
        raise UserError("--tune runs on one host: tune first, then train multi-worker with the best values "
                        "(best_hparams.json) as flags.")
    skipped = _skipped_steps(config)
    if config.run.stop_after in skipped:
        raise UserError(f"--stop_after={config.run.stop_after} names a step this run leaves out "
                        f"({skipped[config.run.stop_after]}): stop after another step.")
    # Multi-worker training configures collective ops, which must happen before any other TensorFlow work.
    strategy = trainer.make_strategy(training.distribution_strategy, training.tpu)
    # Seeds initialisation and dropout; done first, as seeding frees eager TensorFlow resources.
    keras.utils.set_random_seed(training.seed)
    run = PipelineRun(config.run.pipeline_root, config.run.run_id or time.strftime("%Y%m%d-%H%M%S"),
                      use_cache=config.run.cache, stop_after=config.run.stop_after)
    print(f"storygen run {run.dir}", flush=True)
    try:
        return _run_steps(config, run, strategy)
    except Stopped as stopped:
        return stopped.manifest


def _skipped_steps(config: PipelineConfig) -> dict[str, str]:
    """The steps `_run_steps` leaves out with these flags, and why."""
    skipped = {"ingest": "--examples_dir takes an earlier ingest"} if config.ingest.examples_dir else {}
    if not config.tuner.tune:
        skipped["tuner"] = "it runs with --tune"
    return skipped


def _run_steps(config: PipelineConfig, run: PipelineRun, strategy) -> dict:
    """The steps, one block each: the pipeline's DAG."""
    from components import evaluator, exporter, ingest, pusher, records, tokenizer, trainer, tuner
    from components.model import load_model

    training, init_from = config.training, config.model.init_from
    # Ingest: read and validate the stories, write deterministic train/eval/test TFRecord splits
    # (or take those of an earlier ingest, --examples_dir).
    if config.ingest.examples_dir:
        examples = config.ingest.examples_dir
        print(f"[ingest] using {examples}: {ingest.describe(records.read_statistics(examples))}", flush=True)
    else:
        ingested = run.step("ingest", lambda out: ingest.ingest(config.ingest, out),
                            inputs={"data": config.ingest.data}, parameters=config.ingest, describe=ingest.describe)
        examples = ingested["outputs"]["path"]

    # A local preset's files are an input of the steps that read it (a hub handle is a parameter).
    preset = {"preset": init_from} if init_from and os.path.isdir(init_from) else {}

    # Tokenizer: train SentencePiece on the training split (its size is the model's vocabulary),
    # or record the preset's tokenizer.
    tokenized = run.step("tokenizer", lambda out: tokenizer.train_tokenizer(examples, out, config.tokenizer),
                         inputs={"examples": examples, **preset}, parameters=config.tokenizer,
                         describe=tokenizer.describe)
    tokenizer_dir = tokenized["outputs"]["path"]
    tok = tokenizer.load_tokenizer(tokenizer_dir)
    model_config = config.model if init_from else dataclasses.replace(
        config.model, vocab_size=tokenized["metrics"]["vocab_size"])
    data = {"examples": examples, "tokenizer": tokenizer_dir}

    # Tuner (--tune): KerasTuner search; its best values replace the flags' for the trainer.
    if config.tuner.tune:
        tuned = run.step(
            "tuner", lambda out: tuner.tune(examples, tokenizer_dir, out, config.tuner, model_config, training),
            inputs=dict(data, **preset), parameters=(config.tuner, model_config, training),
            # A member of a tuning cluster must join the search: a cached result would leave the others waiting.
            cacheable=tuner.cluster_role() is None, describe=tuner.describe)
        if tuner.is_cluster_worker():
            print("[pipeline] tuned as a tuning-cluster worker; the chief trains with the best values.", flush=True)
            return tuned
        model_config, training = tuner.with_best(tuned["metrics"]["best_hparams"], model_config, training)

    # Trainer: fit the Transformer on tf.data batches of the tokenized examples.
    trained = run.step(
        "trainer", lambda out: trainer.train(examples, tok, out, model_config, training, strategy=strategy),
        inputs=dict(data, **preset), parameters=(model_config, training), describe=trainer.describe)
    if not trainer.is_chief(training.distribution_strategy):
        print("[pipeline] trained as a worker; the chief evaluates, exports and pushes.", flush=True)
        return trained
    model = load_model(trained["outputs"]["path"], model_config)
    data["model"] = trained["outputs"]["path"]

    # Evaluator: test-split metrics (continuations greedy and with the export's sampling), and
    # the blessing against the 5-gram baseline (a first model) or the newest pushed version.
    baseline = pusher.newest_version(os.path.join(config.push.serving_model_dir, config.push.model_name))
    evaluated = run.step(
        "evaluator", lambda out: evaluator.evaluate(model, tok, examples, out, config.evaluation,
                                                    baseline_model=baseline, sampling=config.export),
        inputs=dict(data, **({"baseline_model": baseline} if baseline else {})),
        parameters=(config.evaluation, config.export), describe=evaluator.describe)
    blessing = evaluated["metrics"]["blessing"]

    # Exporter: a SavedModel that tokenises, decodes and detokenises in its graph.
    exported = run.step(
        "exporter", lambda out: {"saved_model": exporter.export(model, tok, out, config.export)},
        inputs={"tokenizer": tokenizer_dir, "model": data["model"]}, parameters=config.export,
        describe=lambda m: f"SavedModel with signatures {', '.join(SIGNATURES)}")

    # Pusher: copy a blessed model atomically to <serving_model_dir>/<model_name>/<next version>/.
    if not blessing["blessed"] and config.push.force_push:
        logging.warning("Pushing a model the evaluator did not bless (--force_push): %s", blessing["reason"])
    saved_model = os.path.join(exported["outputs"]["path"], exporter.SAVED_MODEL_DIR)
    return run.step(
        "pusher", lambda out: pusher.push_if_blessed(saved_model, blessing, config.push),
        inputs={"saved_model": exported["outputs"]["path"]}, parameters=config.push, cacheable=False,
        describe=pusher.describe)


def main():
    cli.run(_run, flags_help=storygen_flags.grouped_help)


def _run(args):
    last = run_pipeline(storygen_flags.pipeline_config())
    if last["step"] == "pusher" and not last["metrics"]["pushed"]:
        sys.exit(cli.EXIT_NOT_PUSHED)  # the pusher's line has said why; a script must not take this for a push


if __name__ == "__main__":
    main()
