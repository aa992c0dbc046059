"""storygen-serve's and storygen-client's command lines: light imports, one-sentence errors."""

import subprocess
import sys

import pytest

from components.cli import EXIT_USAGE, EXIT_USER_ERROR
from conftest import REPO, run_cli

PROGRAMS = ["serving.server", "serving.client"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_defining_the_flags_imports_no_tensorflow(module):
    code = (f"import sys, {module} as m; m.define_flags(); "
            "print(sorted(name for name in ('tensorflow', 'keras', 'keras_tuner', 'grpc') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", PROGRAMS)
def test_help_answers_without_tensorflow(module, tmp_path):
    # A `tensorflow` that cannot be imported, first on the path: --help must not need it.
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("raise ImportError('--help imported tensorflow')\n")
    result = run_cli(module, "--help", env={"PYTHONPATH": f"{tmp_path}:{REPO}"}, timeout=60)
    assert result.returncode == 1 and not result.stderr, result.stderr  # absl's --help: usage on stdout, status 1
    assert "--model_name" in result.stdout


@pytest.mark.parametrize("args, status, message", [
    (["serving.server", "--model_base_path=/nonexistent"], EXIT_USER_ERROR,
     "python -m serving.server: error: --model_base_path /nonexistent is not a directory"),
    (["serving.server", "--model_base_path=/tmp", "--model_version_policy=newest"], EXIT_USER_ERROR,
     "python -m serving.server: error: "),
    (["serving.server", "--model_base_path=/tmp", "--no_such_flag=1"], EXIT_USAGE,
     "error: Unknown command line flag 'no_such_flag'"),
    (["serving.server", "--model_base_path=/tmp", "--port=0"], EXIT_USAGE, "error: flag --port=0"),
    (["serving.server", "--model_base_path=/tmp", "stray"], EXIT_USAGE, "error: unexpected arguments stray"),
    (["serving.server"], EXIT_USER_ERROR, "error: --model_base_path is required"),
    # TF Serving's configuration files: read, or refused with one sentence.
    (["serving.server", "--model_config_file=/nonexistent/models.config"], EXIT_USER_ERROR,
     "error: Cannot read --model_config_file /nonexistent/models.config"),
    (["serving.server", "--model_config_file=/dev/null", "--model_base_path=/tmp"], EXIT_USER_ERROR,
     "error: --model_config_file and --model_base_path both say which models to serve; use one."),
    (["serving.server", "--model_base_path=/tmp", "--batching_parameters_file=/dev/null"], EXIT_USER_ERROR,
     "error: --batching_parameters_file needs --enable_batching."),
    (["serving.server", "--model_base_path=/tmp", "--enable_batching", "--batching_parameters_file=/dev/null",
      "--max_batch_size=8"], EXIT_USER_ERROR,
     "error: --max_batch_size and --batching_parameters_file both set batching parameters; use one."),
    (["serving.server", "--model_base_path=/tmp", "--monitoring_config_file=monitoring.config"], EXIT_USER_ERROR,
     "error: storygen-serve does not support --monitoring_config_file: Prometheus metrics"),
    (["serving.server", "--model_base_path=/tmp", "--grpc_channel_arguments=grpc.max_concurrent_streams"],
     EXIT_USER_ERROR, "error: --grpc_channel_arguments: 'grpc.max_concurrent_streams' is not key=value."),
    (["serving.client"], EXIT_USAGE, "error: flag --prompt=None"),
    (["serving.client", "--prompt=x", "--signature=score"], EXIT_USAGE, "error: flag --signature=score"),
    (["serving.client", "--prompt=x", "--rest=http://127.0.0.1:9", "--timeout=5"], EXIT_USER_ERROR,
     "python -m serving.client: error: Cannot reach http://127.0.0.1:9/v1/models/storygen"),
])
def test_mistakes_are_one_line_with_their_exit_status(args, status, message):
    result = run_cli(*args)
    assert result.returncode == status and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name, text, message", [
    ("model_config_file", 'model_config_list { config { name: "a" base_path: "/tmp" model_platform: "onnx" } }',
     "model 'a' has model_platform 'onnx'; storygen-serve serves TensorFlow SavedModels"),
    ("batching_parameters_file", "max_execution_batch_size { value: 64 }",
     'has no field named "max_execution_batch_size". (storygen-serve reads max_batch_size, '),
])
def test_a_config_file_storygen_serve_cannot_honour_is_one_line(tmp_path, name, text, message):
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    model = [] if name == "model_config_file" else ["--model_base_path=/tmp", "--enable_batching"]
    result = run_cli("serving.server", f"--{name}={path}", *model)
    assert result.returncode == EXIT_USER_ERROR and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_version_prints_and_exits_like_tf_servings():
    result = run_cli("serving.server", "--version")
    assert result.returncode == 0 and result.stdout.startswith("storygen-serve "), result.stderr


def test_thread_flags_set_tensorflows_thread_pools(tmp_path):
    # _serve sets them once TensorFlow is imported, before anything can run an op; a missing
    # --model_base_path stops it just after.
    code = ("from absl import flags; from serving import server; from components.common import UserError; "
            "server.define_flags(); flags.FLAGS(['serve', '--model_base_path=" + str(tmp_path / "none") + "', "
            "'--tensorflow_intra_op_parallelism=1', '--tensorflow_inter_op_parallelism=3'])\n"
            "try:\n    server._serve([])\nexcept UserError:\n    pass\n"
            "import tensorflow as tf; tf.constant(1.0) + 1\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "3"], result.stderr[-2000:]
