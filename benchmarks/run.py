"""storygen against its peers, side by side: one command, one table of ratios.

    python -m benchmarks.run [--quick] [--only training,decoding] [--repeats N] [--json OUT]

Sections (all by default; `--only` picks some), one module each:
  training        tokens/s of storygen's trainer vs the same model in PyTorch (eager, torch.compile),
                  fp32 and bf16; model FLOPs utilisation; padding waste; where storygen's step
                  spends its time (a profile by part of the model)        (benchmarks/training.py)
  input_pipeline  examples/s of transform.training_batches vs what the trainer consumes
                                                                           (benchmarks/input_pipeline.py)
  decoding        the exported `generate` signature vs recompute, keras-hub's BartSeq2SeqLM.generate
                  and a PyTorch greedy decoder with a KV cache            (benchmarks/decoding.py)
  decoding_t5     the exported `generate` of a T5 preset (t5_small_multi's shape) vs keras-hub's
                  T5Seq2SeqLM.generate, in a tf.function and XLA-compiled  (benchmarks/decoding.py)
  decoding_t5gemma  the same for a T5Gemma preset (t5gemma_s_s's shape, 256k vocabulary)
                                                                           (benchmarks/decoding.py)
  serving         TF Serving-compatible servers: throughput, p50/p99, batching on vs off
                                                                           (benchmarks/serving.py)
  streaming       a story streamed (gRPC StreamStory) vs written in one call: first text, whole story
                                                                           (benchmarks/streaming.py)
  scale           ingest + tokenizer time and peak memory for 10 MB, 100 MB and 1 GB corpora
                                                                           (benchmarks/scale.py)

benchmarks/harness.py says how peers are measured (each in its own worker process, in turns)
and what a row of `--json OUT` holds; benchmarks/RESULTS.md has the results so far.
"""

import json
import os
import tempfile
import time

from absl import flags

from benchmarks import decoding, harness, input_pipeline, scale, serving, streaming, training
from components import cli
from components.common import UserError

SECTIONS = ("training", "input_pipeline", "decoding", "decoding_t5", "decoding_t5gemma", "serving", "streaming",
            "scale")


def _known_sections(sections) -> bool:
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise flags.ValidationError(f"unknown section(s) {', '.join(unknown)} in --only: use {', '.join(SECTIONS)}")
    return True


def _sizes(values) -> bool:
    try:
        return values is None or all(float(v) > 0 for v in values)
    except ValueError:
        return False


flags.DEFINE_bool("quick", False, "Small model, few steps and repeats: a smoke run.")
flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, in this order: {', '.join(SECTIONS)}.")
flags.DEFINE_integer("repeats", None, "Timed runs per peer (default 3; --quick 2).", lower_bound=1)
flags.DEFINE_string("json", None, "Write the result rows to this JSON file (after every section).")
flags.DEFINE_string("serving_model_base_path", None, "Serve this model in the serving section (default: a "
                    "synthetic model) and the streaming one (default: the default configuration's shape).")
flags.DEFINE_list("serving_flags", [], "storygen-serve flags for both servers of the serving section, e.g. "
                  "--tensorflow_intra_op_parallelism=1.")
flags.DEFINE_list("scale_sizes_mb", None, "Corpus sizes of the scale section, in MB (default 10,100,1000; "
                  "--quick 10).")
flags.DEFINE_string("work_dir", None, "Keep data and worker logs here (default: a temporary directory).")
flags.register_validator("only", _known_sections)
flags.register_validator("scale_sizes_mb", _sizes, message="--scale_sizes_mb takes positive numbers, e.g. 10,100")
harness.define_worker_flags()
FLAGS = flags.FLAGS


def run_sections(h: harness.Harness, sections) -> None:
    """Runs the sections in the order given, writing the JSON after each: a long run that fails
    later keeps what it measured."""
    prepared = consumption = None
    for section in sections:
        h.section = section
        start = time.perf_counter()
        h.progress(f"[{section}]")
        if section in ("training", "input_pipeline") and prepared is None:
            prepared = training.prepare_in_worker(h)
        if section == "training":
            consumption = training.run_section(h, prepared)
        elif section == "input_pipeline":
            input_pipeline.run_section(h, prepared, consumption)
        elif section == "decoding":
            decoding.run_section(h)
        elif section in decoding.PRETRAINED:
            decoding.run_pretrained_section(h, section)
        elif section == "serving":
            serving.run_section(h, FLAGS.serving_model_base_path, FLAGS.serving_flags)
        elif section == "streaming":
            streaming.run_section(h, FLAGS.serving_model_base_path)
        elif section == "scale":
            scale.run_section(h, [float(s) for s in FLAGS.scale_sizes_mb] if FLAGS.scale_sizes_mb else None)
        h.progress(f"[{section}] {time.perf_counter() - start:.0f} s")
        h.write_json()


def main(args):
    del args  # none allowed
    if FLAGS.worker:
        harness.worker_main(FLAGS.worker, json.loads(FLAGS.worker_args))
        return
    repeats = FLAGS.repeats or (2 if FLAGS.quick else 3)
    h = harness.Harness(FLAGS.quick, repeats, FLAGS.work_dir or tempfile.mkdtemp(prefix="storygen-bench-"),
                        FLAGS.json)
    start = time.perf_counter()
    try:
        run_sections(h, FLAGS.only)
    except harness.WorkerError as e:
        raise UserError(str(e)) from e
    finally:
        h.close()
        h.write_json()
    print(f"\nstorygen benchmarks ({'quick' if FLAGS.quick else 'full'}, {repeats} repeats, median and "
          f"min-max; {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s; worker logs in {h.log_dir})\n")
    print(harness.table(h.rows, h.notes))


if __name__ == "__main__":
    # This process and the workers import TensorFlow only where they need it: the PyTorch peers' workers never do.
    cli.run(main, uses_tensorflow=False)
