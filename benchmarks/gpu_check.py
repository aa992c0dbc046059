"""storygen on a GPU: the tiny and the default pipeline, and the training and decoding
benchmarks, run on this machine's GPU and summed up in one table.

    bash benchmarks/gpu_check.sh            # installs .venv-gpu (storygen[gpu,bench]), then runs this

Not part of the test suite, and nothing on the CPU path uses it. Each step is the command a user
runs (`python -m pipeline.run ...`, `python -m benchmarks.run ...`) in a process of its own, so
TensorFlow places the work on the GPU as it would for them. The PyTorch peers of the benchmarks
run on the CPU (`benchmarks/torch_peers.py` has no CUDA path): on a GPU their ratios compare
devices, not implementations, so the table gives storygen's own figures first.

--allow_cpu runs the same steps where TensorFlow sees no GPU (a dry run of this script, labelled
CPU); --quick shortens every step (the default pipeline trains for --quick_time_budget seconds,
the benchmarks run --quick); --sections picks the benchmark sections (training and decoding
need the PyTorch of the [bench] extra).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.harness import REPO, fmt

flags.DEFINE_string("work_dir", None, "Where the runs and the benchmark rows go (default: a new temporary directory).")
flags.DEFINE_bool("quick", False, "Short steps: a smoke run of the script.")
flags.DEFINE_integer("quick_time_budget", 60, "With --quick: the default pipeline's --time_budget in seconds.",
                     lower_bound=1)
flags.DEFINE_bool("allow_cpu", False, "Run even where TensorFlow sees no GPU (a dry run, labelled CPU).")
flags.DEFINE_list("sections", ["training", "decoding", "decoding_t5"], "The benchmarks.run sections to run.")
FLAGS = flags.FLAGS

# (run name, pipeline.run flags): the README's two runs.
PIPELINES = (("tiny", ["--flagfile=pipeline/configs/tiny.flags"]), ("default", []))


def accelerator() -> str | None:
    """The first GPU's name as TensorFlow sees it, or None without one. Asked in a process of its
    own, so that this one holds no GPU memory while the steps run."""
    code = ("import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); details = gpus and "
            "tf.config.experimental.get_device_details(gpus[0]); print(details.get('device_name', gpus[0].name) "
            "if gpus else '')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip() or None


def run_step(command: list[str], log_path: str) -> float:
    """Runs `python -m <command>` from the repository root, its output to `log_path`; its wall seconds."""
    print(f"gpu_check: python -m {' '.join(command)} (log: {log_path})", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run([sys.executable, "-m", *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"gpu_check: `python -m {' '.join(command)}` exited with {result.returncode}; see {log_path}")
    return time.monotonic() - start


def pipeline_rows(name: str, seconds: float, run_dir: str) -> list[tuple[str, str]]:
    """A pipeline run's table rows: wall time, training speed, and what the evaluator measured."""
    with open(os.path.join(run_dir, "trainer", "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    with open(os.path.join(run_dir, "evaluator", "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    test, greedy = metrics["test"], metrics["generation"]["greedy"]["all"]
    return [
        (f"{name} pipeline: wall time", f"{seconds:.0f} s"),
        (f"{name} pipeline: training tokens/s (last epoch)", fmt(history["tokens_per_second"][-1])),
        (f"{name} pipeline: test bits/char (char 5-gram, grammar's exact)",
         f"{test['bits_per_char']:.4f} ({test['char_5gram_bits_per_char']:.4f}, {test['exact_bits_per_char']:.4f})"),
        (f"{name} pipeline: greedy stories the grammar accepts, hero kept",
         f"{greedy['grammar_acceptance_rate']:.0%}, {greedy['protagonist_kept_rate']:.0%}"),
    ]


def benchmark_rows(rows: list[dict]) -> list[tuple[str, str]]:
    def ratio(row):
        return "" if row["ratio"] is None else f" ({row['ratio']:.2f}x)"

    return [(f"benchmark {row['name']}", f"{fmt(row['ours'])} {row['unit']} vs {row['peer']} "
                                         f"{fmt(row['peer_value'])}{ratio(row)}") for row in rows]


def table(device: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"storygen on {device}", "", f"| {'what':<{width}} | figure |", f"|{'-' * (width + 2)}|--------|"]
    return "\n".join(lines + [f"| {name:<{width}} | {value} |" for name, value in rows])


def main(argv):
    del argv
    device = accelerator()
    if device is None and not FLAGS.allow_cpu:
        sys.exit("gpu_check: TensorFlow sees no GPU here (check nvidia-smi and the CUDA libraries that "
                 "tensorflow[and-cuda] installs); --allow_cpu runs the steps anyway.")
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="storygen-gpu-check-")
    os.makedirs(work_dir, exist_ok=True)
    rows = []
    for name, pipeline_flags in PIPELINES:
        if FLAGS.quick and name == "default":
            pipeline_flags = pipeline_flags + [f"--time_budget={FLAGS.quick_time_budget}"]
        seconds = run_step(["pipeline.run", *pipeline_flags, f"--pipeline_root={work_dir}/pipelines",
                            f"--run_id={name}", f"--serving_model_dir={work_dir}/saved_models/{name}"],
                           os.path.join(work_dir, f"pipeline-{name}.log"))
        rows += pipeline_rows(name, seconds, os.path.join(work_dir, "pipelines", name))
    rows_path = os.path.join(work_dir, "benchmarks.json")
    quick = ["--quick"] if FLAGS.quick else []
    run_step(["benchmarks.run", f"--only={','.join(FLAGS.sections)}", f"--json={rows_path}", *quick],
             os.path.join(work_dir, "benchmarks.log"))
    with open(rows_path, encoding="utf-8") as f:
        rows += benchmark_rows(json.load(f))
    label = device or "CPU (no GPU: --allow_cpu)"
    print(table(f"{label}{', --quick' if FLAGS.quick else ''}; PyTorch peers on the CPU; logs in {work_dir}", rows))


if __name__ == "__main__":
    app.run(main)
