"""Input pipeline: examples/s that `transform.training_batches` makes against what the trainer eats.

Section `input_pipeline` of `python -m benchmarks.run`. A timed run is one epoch of the training
stream (as many stories as the split holds) through the whole pipeline the trainer gets: read
the TFRecord shards, parse, shuffle, tokenize in-graph, bucket by length, pad and batch. The
consumer is storygen's trainer: its examples/s from the training section of the same run (its
faster precision), or, when that section is not run, its step (bf16 where the CPU has it) on
the same batches, timed in turns with the pipeline passes. Target: the pipeline makes at least
10x what the trainer consumes, so that it never starves the step, even with a faster step or
fewer cores left for tf.data.
"""

from benchmarks import training
from benchmarks.harness import alternate, timed


def pipeline_worker(examples_dir: str, tokenizer_dir: str, batch_size: int, max_prompt_tokens: int,
                    max_story_tokens: int, seed: int):
    """Worker: one `epoch` op, an epoch of training_batches (as many stories as the split holds)."""
    from components import tokenizer, transform

    tok = tokenizer.make_tokenizer(tokenizer.load_proto(tokenizer_dir))

    def epoch():
        data = transform.training_batches(examples_dir, "train", tok, batch_size=batch_size, shuffle=True, seed=seed,
                                          max_prompt_tokens=max_prompt_tokens, max_story_tokens=max_story_tokens)
        steps = transform.batches_per_epoch(examples_dir, "train", batch_size)
        examples, batches = 0, 0
        for _, targets in data.take(steps):
            examples += int(targets.shape[0])
            batches += 1
        return {"examples": examples, "batches": batches}

    return {"epoch": timed(epoch)}


def run_section(h, prep: dict, consumption: dict | None):
    """The row of the pipeline's examples/s against the trainer's: `consumption` from the training
    section, or (None) measured here."""
    s = training.setup(h.quick)
    pipeline = h.worker("input-pipeline", "benchmarks.input_pipeline:pipeline_worker",
                        examples_dir=prep["examples_dir"], tokenizer_dir=prep["tokenizer_dir"],
                        batch_size=s.training.batch_size, seed=s.training.seed,
                        max_prompt_tokens=s.model.max_prompt_tokens, max_story_tokens=s.model.max_story_tokens)
    runs = {"pipeline": lambda: pipeline.call("epoch")}
    if consumption is None:
        trainer = h.worker("input-trainer", training.STORYGEN_WORKER, batches_path=prep["batches"],
                           model_config=prep["model_config"], mixed_precision=True)
        runs["trainer"] = lambda: trainer.call("run")
    for run in runs.values():
        run()  # warm-up
    stats = alternate(runs, h.repeats)
    made = stats["pipeline"].map(lambda r: r["examples"] / r["seconds"])
    if consumption is None:
        eaten = stats["trainer"].map(lambda r: r["examples"] / r["seconds"])
        peer = "trainer step (bf16 if supported), same run"
        trainer.close()
    else:
        eaten = consumption["examples_per_second"]
        peer = "trainer (training section's best storygen)"
    pipeline.close()
    first = stats["pipeline"].values[0]
    h.note(f"input pipeline: one epoch = {first['examples']} examples in {first['batches']} batches of "
           f"{s.training.batch_size} (read, parse, shuffle, tokenize, bucket, batch)")
    h.row("input pipeline: examples/s vs trainer", "examples/s", made, peer, eaten, target=10.0)
