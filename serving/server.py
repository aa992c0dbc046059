r"""storygen-serve: serves the versions of SavedModels over TensorFlow Serving's gRPC and REST
APIs, for machines where tensorflow_model_server is not available.

    python -m serving.server --model_name storygen --model_base_path saved_models/storygen \
        --port 8500 --rest_api_port 8501
    python -m serving.server --model_config_file models.config --model_config_file_poll_wait_seconds 60

Flags that tensorflow_model_server also has keep its names and meanings. The server binds
127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C) stops accepting requests, lets the
ones in flight finish (up to --drain_timeout_seconds) and exits 0, or 1 if it had to cut some.
REST requests that arrive on kept-alive connections while it drains get 503 and `Connection: close`.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import typing
from concurrent import futures

from absl import flags, logging

from components import cli
from components.common import UserError
from components.config import ExportConfig

if typing.TYPE_CHECKING:  # names for the annotations; the modules load after the flags are parsed
    import grpc

    from serving.predictor import Predictor
    from serving.rest import RestServer
    from serving.stats import Stats

FLAGS = flags.FLAGS


def define_flags():
    """Defines the server's flags (in a function, so importing this module defines none)."""
    flags.DEFINE_string("model_name", "storygen", "Name of the model in requests (ModelSpec.name, /v1/models/<name>).")
    flags.DEFINE_string("model_base_path", None, "Directory holding the model's integer-named version directories, "
                        "e.g. saved_models/storygen (any tf.io.gfile path).")
    flags.DEFINE_bool("version", False, "Print storygen-serve's version and exit.")
    flags.DEFINE_string("saved_model_tags", "serve", "Comma-separated tags of the SavedModel meta graph to load.")
    flags.DEFINE_string("grpc_channel_arguments", "", "Comma-separated gRPC server arguments, e.g. "
                        "grpc.max_concurrent_streams=100 (integer values are passed as integers).")
    flags.DEFINE_string("model_config_file", None, "TF Serving's ModelServerConfig text file naming the models to "
                        "serve (name, base_path, model_version_policy, version_labels); instead of --model_base_path.")
    flags.DEFINE_float("model_config_file_poll_wait_seconds", 0, "Seconds between reads of --model_config_file; 0 "
                       "reads it once.", lower_bound=0)
    flags.DEFINE_string("batching_parameters_file", None, "TF Serving's BatchingParameters text file (max_batch_size, "
                        "batch_timeout_micros, max_enqueued_batches, num_batch_threads, allowed_batch_sizes); "
                        "with --enable_batching, instead of the batching flags.")
    flags.DEFINE_string("monitoring_config_file", None, "TF Serving's flag, not supported by storygen-serve: "
                        "Prometheus metrics are always served at /monitoring/prometheus/metrics on the REST port.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; 0.0.0.0 (or ::) opens the server to the network.")
    flags.DEFINE_integer("port", 8500, "gRPC port.", lower_bound=1, upper_bound=65535)
    flags.DEFINE_integer("rest_api_port", 8501, "REST port; 0 turns the REST API off.", lower_bound=0,
                         upper_bound=65535)
    flags.DEFINE_bool("playground", True, "Serve the story playground, a page that streams stories from the served "
                      "models, at / on the REST port.")
    flags.DEFINE_string("model_version_policy", "latest", "Versions to serve: latest, latest:N (the newest N), all, "
                        "or specific:V1,V2.")
    flags.DEFINE_string("version_labels", "", "Version labels for ModelSpec.version_label and /labels/<label>, "
                        "e.g. stable:1,canary:2.")
    flags.DEFINE_float("file_system_poll_wait_seconds", 1, "Seconds between looks for new or retired versions; "
                       "0 looks once at startup.", lower_bound=0)
    flags.DEFINE_bool("enable_model_warmup", True, "Replay a version's assets.extra/tf_serving_warmup_requests "
                      "(storygen's exports have one) before it takes traffic.")
    flags.DEFINE_integer("max_num_load_retries", 5, "Times a version that failed to load is tried again before it "
                         "is skipped until one of its files changes.", lower_bound=0)
    flags.DEFINE_integer("load_retry_interval_micros", 60_000_000, "Wait between load retries, in microseconds.",
                         lower_bound=0)
    flags.DEFINE_bool("enable_batching", False, "Merge concurrent requests into one model call (dynamic batching).")
    flags.DEFINE_integer("max_batch_size", 32, "Most rows in one batched model call.", lower_bound=1)
    flags.DEFINE_integer("batch_timeout_micros", 1000, "Longest wait for more requests to fill a batch.",
                         lower_bound=0)
    flags.DEFINE_integer("max_enqueued_batches", 100, "Most batches waiting to run; beyond it requests fail with "
                         "RESOURCE_EXHAUSTED (HTTP 429).", lower_bound=1)
    flags.DEFINE_integer("num_batch_threads", os.cpu_count() or 1, "Batches run in parallel; under load "
                         "each takes an equal share of the waiting rows.", lower_bound=1)
    # 0 is TensorFlow's choice, one thread per core. Under concurrent requests on a small machine, 1 thread per
    # op lets requests (or batches) run side by side instead of splitting each small op across the cores.
    flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0, "Threads that one op's work is split over; 0 lets "
                         "TensorFlow choose.", lower_bound=0)
    flags.DEFINE_integer("tensorflow_inter_op_parallelism", 0, "Ops that run at once, across requests; 0 lets "
                         "TensorFlow choose.", lower_bound=0)
    # Every request waiting for a batch holds a gRPC thread, so this also bounds how full batches get.
    flags.DEFINE_integer("grpc_max_threads", 64, "Threads answering gRPC requests.", lower_bound=1)
    flags.DEFINE_integer("grpc_max_concurrent_rpcs", 10_000, "Most gRPC requests running or waiting for a thread; "
                         "beyond it requests fail at once with RESOURCE_EXHAUSTED.", lower_bound=1)
    flags.DEFINE_integer("rest_api_num_threads", 64, "Threads running REST Predict requests (connections need none); "
                         "more requests wait for one.", lower_bound=1)
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "Deadline of a REST request.", lower_bound=1)
    flags.DEFINE_integer("max_request_bytes", 4 << 20, "Largest gRPC message or REST body accepted.",
                         lower_bound=1024)
    flags.DEFINE_integer("max_prompt_bytes", 8192, "Longest string (prompt or story) accepted, in UTF-8 bytes.",
                         lower_bound=1)
    flags.DEFINE_integer("max_request_batch_size", 64, "Most rows (prompts) in one request.", lower_bound=1)
    flags.DEFINE_integer("max_new_tokens_limit", ExportConfig().max_new_tokens_limit, "Largest max_new_tokens "
                         "accepted, for signatures that have it (the model's own limit applies too).", lower_bound=1)
    flags.DEFINE_float("drain_timeout_seconds", 30, "On SIGTERM, longest wait for in-flight requests.",
                       lower_bound=0)
    flags.DEFINE_float("summary_interval_seconds", 60, "Seconds between summary log lines.", lower_bound=0.1)


def main():
    """Console script entry point (`storygen-serve`)."""
    define_flags()
    cli.run(_serve, logs_info=True, uses_tensorflow=False)


def _serve(args):
    if FLAGS.version:
        from importlib.metadata import version

        print(f"storygen-serve {version('storygen')} (TensorFlow Serving's gRPC and REST APIs)")
        return
    if FLAGS.monitoring_config_file:
        raise UserError("storygen-serve does not support --monitoring_config_file: Prometheus metrics are always "
                        "served at /monitoring/prometheus/metrics on the REST port.")
    if FLAGS.model_config_file and FLAGS.model_base_path:
        raise UserError("--model_config_file and --model_base_path both say which models to serve; use one.")
    if not FLAGS.model_config_file and not FLAGS.model_base_path:
        raise UserError("--model_base_path is required (or --model_config_file): the folder holding the model's "
                        "version directories, e.g. saved_models/storygen.")
    if FLAGS.batching_parameters_file and not FLAGS.enable_batching:
        raise UserError("--batching_parameters_file needs --enable_batching.")
    # Loaded after the flags are checked, so that --help, --version and flag errors answer at once.
    cli.import_tensorflow()
    _set_tensorflow_threads()

    from serving.models import Models
    from serving.predictor import Limits, Predictor
    from serving.stats import Stats

    # The imported modules' ~350k objects live as long as the process: kept out of garbage collections,
    # a full one takes ~20 ms instead of ~210, so the ones after a load and after a version is retired
    # (see serving.model_manager) scan the models alone.
    gc.collect()
    gc.freeze()
    specs = _model_specs()
    batcher = _batcher() if FLAGS.enable_batching else None

    # Handle SIGTERM from the start, so that one arriving while the model loads also drains cleanly.
    stopping = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    stats = Stats()
    models = Models(specs, warmup=FLAGS.enable_model_warmup, max_load_retries=FLAGS.max_num_load_retries,
                    retry_interval_s=FLAGS.load_retry_interval_micros / 1e6,
                    tags=tuple(tag.strip() for tag in FLAGS.saved_model_tags.split(",") if tag.strip()))
    limits = Limits(FLAGS.max_prompt_bytes, FLAGS.max_request_batch_size, FLAGS.max_new_tokens_limit)
    predictor = Predictor(models, limits, stats, batcher)
    # Bind both ports before loading the model, so that a port in use fails at once.
    grpc_server = _bind_grpc(predictor, stats)
    rest_server = _bind_rest(predictor, stats) if FLAGS.rest_api_port else None

    models.poll()
    for name, versions in models.loaded_versions().items():
        if not versions:
            logging.warning("No loadable version of model %s yet; waiting for one.", name)
    grpc_server.start()
    if rest_server:
        rest_server.start()
    models.start_polling(FLAGS.file_system_poll_wait_seconds, FLAGS.model_config_file,
                         FLAGS.model_config_file_poll_wait_seconds)
    threading.Thread(target=_log_summaries, args=(stats, stopping), name="summary", daemon=True).start()
    rest = ""
    if rest_server:
        rest = f" and REST {FLAGS.host}:{FLAGS.rest_api_port}"
        if FLAGS.playground:
            rest += f" (the playground at http://{FLAGS.host}:{FLAGS.rest_api_port}/)"
    logging.info("Serving %s on gRPC %s:%d%s, batching %s",
                 ", ".join(f"model {name} (versions {versions})" for name, versions in models.loaded_versions().items()),
                 FLAGS.host, FLAGS.port, rest, "on" if batcher else "off")
    # Timed waits: the kernel hands a process's signal to any of its threads, and when that is not this
    # one, Python runs the handler only once this thread next runs Python code, which a bare wait never does.
    while not stopping.wait(0.2):
        pass

    in_flight = stats.in_flight()
    grpc_stopped = grpc_server.stop(grace=FLAGS.drain_timeout_seconds)  # refuses new RPCs at once
    if rest_server:
        rest_server.shutdown()
    # Logged once new requests are refused, so whoever reads it knows the server is draining.
    logging.info("%s received: draining %d in-flight requests (at most %.0f s).", received[0], in_flight,
                 FLAGS.drain_timeout_seconds)
    drained = stats.wait_idle(FLAGS.drain_timeout_seconds)
    cut = stats.in_flight()
    grpc_stopped.wait()
    if rest_server:
        rest_server.close()
    if batcher:
        batcher.stop()
    models.stop()
    if not drained:  # a non-zero exit, so that whoever stopped the server learns that requests were cut
        raise UserError(f"Exiting with {cut} requests still in flight after "
                        f"{FLAGS.drain_timeout_seconds:.0f} s of draining: they were cut.")
    logging.info("All requests answered; exiting.")


def _set_tensorflow_threads():
    """Applies --tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism. Called before
    any op runs: TensorFlow makes its thread pools once, at the first op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.tensorflow_intra_op_parallelism)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.tensorflow_inter_op_parallelism)


def _model_specs():
    """The models to serve: those of --model_config_file, or the one of --model_name and --model_base_path."""
    import tensorflow as tf

    from serving.model_manager import VersionPolicy, parse_labels
    from serving.models import ModelSpec, read_model_config

    if FLAGS.model_config_file:
        try:
            return read_model_config(FLAGS.model_config_file)
        except tf.errors.OpError as e:
            raise UserError(f"Cannot read --model_config_file {FLAGS.model_config_file}: {e.message}") from None
        except ValueError as e:
            raise UserError(str(e)) from None
    try:
        policy = VersionPolicy.parse(FLAGS.model_version_policy)
        labels = parse_labels(FLAGS.version_labels)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not tf.io.gfile.isdir(FLAGS.model_base_path):
        raise UserError(f"--model_base_path {FLAGS.model_base_path} is not a directory; point it at the folder "
                        "holding the version directories, e.g. saved_models/storygen.")
    return [ModelSpec(FLAGS.model_name, FLAGS.model_base_path, policy, labels)]


def _batcher():
    """The Batcher of --max_batch_size and the other batching flags, or of --batching_parameters_file."""
    import tensorflow as tf

    from serving.batching import BATCHING_FLAGS, Batcher, read_batching_parameters

    values = {name: FLAGS[name].value for name in BATCHING_FLAGS}
    if FLAGS.batching_parameters_file:
        given = [f"--{name}" for name in BATCHING_FLAGS if FLAGS[name].present]
        if given:
            raise UserError(f"{', '.join(given)} and --batching_parameters_file both set batching parameters; "
                            "use one.")
        try:
            values.update(read_batching_parameters(FLAGS.batching_parameters_file))
        except tf.errors.OpError as e:
            raise UserError(f"Cannot read --batching_parameters_file {FLAGS.batching_parameters_file}: "
                            f"{e.message}") from None
        except ValueError as e:
            raise UserError(str(e)) from None
    try:
        return Batcher(values["max_batch_size"], values["batch_timeout_micros"] / 1e6, values["max_enqueued_batches"],
                       values["num_batch_threads"], values.get("allowed_batch_sizes", ()))
    except ValueError as e:
        raise UserError(f"Batching parameters: {e}") from None


def _bind_grpc(predictor: Predictor, stats: Stats) -> grpc.Server:
    import grpc

    from serving.grpc_service import add_services

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=FLAGS.grpc_max_threads, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=FLAGS.grpc_max_concurrent_rpcs,
        # gRPC uses the first of repeated arguments, so --grpc_channel_arguments come first to override these.
        options=_channel_arguments(FLAGS.grpc_channel_arguments) + [
            ("grpc.max_receive_message_length", FLAGS.max_request_bytes),
            # gRPC sets SO_REUSEPORT by default, which would let a second server share the port silently.
            ("grpc.so_reuseport", 0),
            # gRPC core drops calls at random (CANCELLED, unseen by the server) once more than 1,000 wait for
            # Python to pick them up, which a burst of calls does in moments. Let every burst through: the limit
            # that answers is maximum_concurrent_rpcs, with RESOURCE_EXHAUSTED.
            ("grpc.server.max_pending_requests", 1 << 20),
            ("grpc.server.max_pending_requests_hard_limit", 1 << 20)])
    add_services(server, predictor, stats, max_elements=FLAGS.max_request_bytes)
    host = f"[{FLAGS.host}]" if ":" in FLAGS.host else FLAGS.host
    try:
        server.add_insecure_port(f"{host}:{FLAGS.port}")
    except RuntimeError as e:
        raise UserError(f"Cannot listen for gRPC on {host}:{FLAGS.port} ({e}); is another server using the "
                        "port?") from None
    return server


def _channel_arguments(text: str) -> list[tuple]:
    """--grpc_channel_arguments 'a=1,b=x' -> [("a", 1), ("b", "x")]."""
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise UserError(f"--grpc_channel_arguments: '{item}' is not key=value.")
        arguments.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return arguments


def _bind_rest(predictor: Predictor, stats: Stats) -> RestServer:
    from serving.rest import RestServer

    try:
        return RestServer(FLAGS.host, FLAGS.rest_api_port, predictor, stats, max_request_bytes=FLAGS.max_request_bytes,
                          timeout_s=FLAGS.rest_api_timeout_in_ms / 1000, num_threads=FLAGS.rest_api_num_threads,
                          playground=FLAGS.playground)
    except OSError as e:
        raise UserError(f"Cannot listen for REST on {FLAGS.host}:{FLAGS.rest_api_port} ({e}); is another server "
                        "using the port?") from None


def _log_summaries(stats: Stats, stopping: threading.Event) -> None:
    while not stopping.wait(FLAGS.summary_interval_seconds):
        logging.info("%s", stats.take_summary(FLAGS.summary_interval_seconds))


if __name__ == "__main__":
    main()
