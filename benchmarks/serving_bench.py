"""Serving throughput and latency with dynamic batching on and off, side by side.

    python -m benchmarks.serving_bench [--model_base_path saved_models/storygen] [--quick]

Starts `python -m serving.server` twice on the same model base path, with --enable_batching and
without, and drives each with 1, 8 and 32 concurrent gRPC clients (threads of this process,
each sending one-prompt Predict requests back to back) for `--seconds` per point. The table
gives requests per second, p50 and p99 latency, and batching's throughput ratio to no batching.

Without --model_base_path it serves a synthetic model whose call costs like autoregressive
decoding does: `--steps` sequential steps, each a [B, 1024] x [1024, 1024] matmul, so a call
reads the weights once per step whatever B is (as a decoder step reads its layers).
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

flags.DEFINE_string("model_base_path", None, "Model base path to serve; default: a synthetic model.")
flags.DEFINE_string("model_name", "storygen", "Model name to serve it under.")
flags.DEFINE_string("signature", "serving_default", "Signature to call (its only input must be `prompt`).")
flags.DEFINE_string("prompt", "从前有座山", "Prompt; each request appends a counter to it.")
flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent clients per measurement.")
flags.DEFINE_float("seconds", 10, "Measured seconds per point.")
flags.DEFINE_integer("steps", 32, "Sequential steps per call of the synthetic model.")
flags.DEFINE_bool("quick", False, "3 s per point, for a smoke run.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 1024


def save_synthetic_model(base_path: str, steps: int) -> None:
    """Version 1 of the synthetic model under `base_path`."""
    import tensorflow as tf

    class SyntheticStoryModel(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights = tf.Variable(tf.random.stateless_normal([WIDTH, WIDTH], seed=[1, 2]) / WIDTH ** 0.5)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt")])
        def serving_default(self, prompt):
            x = tf.one_hot(tf.strings.to_hash_bucket_fast(prompt, WIDTH), WIDTH)
            _, x = tf.while_loop(lambda i, x: i < steps, lambda i, x: (i + 1, tf.tanh(x @ self.weights)), (0, x))
            score = tf.strings.as_string(tf.reduce_sum(x, axis=1), precision=3)
            return {"story": tf.strings.join([prompt, score], separator=" "),
                    "num_tokens": tf.fill(tf.shape(prompt), steps)}

    model = SyntheticStoryModel()
    staging = os.path.join(base_path, ".tmp-1")
    tf.saved_model.save(model, staging, signatures={"serving_default": model.serving_default})
    os.rename(staging, os.path.join(base_path, "1"))


class Server:
    """One server process on free loopback ports."""

    def __init__(self, base_path: str, *flags_: str):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.server", f"--model_base_path={base_path}",
                                      f"--model_name={FLAGS.model_name}", f"--port={port}", "--rest_api_port=0",
                                      *flags_], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def wait_ready(self) -> None:
        import grpc

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"serving_bench: the server exited with {self.proc.returncode}; run it by hand to see why.")
            try:
                self.stub.Predict(request(FLAGS.prompt), timeout=30)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        sys.exit("serving_bench: the server did not answer within 120 s.")

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(60)


def request(prompt: str):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    message = predict_pb2.PredictRequest()
    message.model_spec.name = FLAGS.model_name
    message.model_spec.signature_name = FLAGS.signature
    message.inputs["prompt"].CopyFrom(tf.make_tensor_proto([prompt.encode("utf-8")], dtype=tf.string, shape=[1]))
    return message


def measure(server: Server, clients: int, seconds: float) -> dict:
    """Requests per second and latency percentiles with `clients` clients sending back to back."""
    import grpc

    latencies, errors = [], []
    stop = threading.Event()

    def client(i):
        n = 0
        while not stop.is_set():
            n += 1
            message = request(f"{FLAGS.prompt} {i}-{n}")
            start = time.perf_counter()
            try:
                server.stub.Predict(message, timeout=60)
                latencies.append(time.perf_counter() - start)
            except grpc.RpcError as e:
                errors.append(e.code().name)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "errors": len(errors),
            "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan")}


def run_side(base_path: str, batching: bool, clients: list[int], seconds: float) -> dict:
    server = Server(base_path, *(["--enable_batching"] if batching else []))
    try:
        server.wait_ready()
        measure(server, max(clients), 1)  # warm-up: thread pools, first traces
        return {c: measure(server, c, seconds) for c in clients}
    finally:
        server.stop()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tf.saved_model.save's progress lines
    seconds = 3 if FLAGS.quick else FLAGS.seconds
    clients = [int(c) for c in FLAGS.clients]
    with tempfile.TemporaryDirectory() as tmp:
        base_path = FLAGS.model_base_path
        what = base_path
        if base_path is None:
            base_path = os.path.join(tmp, "synthetic")
            os.makedirs(base_path)
            save_synthetic_model(base_path, FLAGS.steps)
            what = f"synthetic ({FLAGS.steps} steps of a [B, {WIDTH}] x [{WIDTH}, {WIDTH}] matmul per call)"
        with_batching = run_side(base_path, True, clients, seconds)
        without = run_side(base_path, False, clients, seconds)

    print(f"\nmodel: {what}; signature {FLAGS.signature}; {seconds:g} s per point; {os.cpu_count()} CPUs; "
          "server defaults otherwise (--max_batch_size=32 --batch_timeout_micros=1000)")
    print(f"{'clients':>7} | {'batching req/s':>14} {'p50 ms':>7} {'p99 ms':>7} | {'no batching req/s':>17} "
          f"{'p50 ms':>7} {'p99 ms':>7} | {'throughput ratio':>16} {'p50 ratio':>9}")
    for c in clients:
        b, n = with_batching[c], without[c]
        print(f"{c:>7} | {b['rps']:>14.1f} {b['p50']:>7.1f} {b['p99']:>7.1f} | {n['rps']:>17.1f} {n['p50']:>7.1f} "
              f"{n['p99']:>7.1f} | {b['rps'] / n['rps']:>15.2f}x {b['p50'] / n['p50']:>8.2f}x")
    failed = sum(r["errors"] for side in (with_batching, without) for r in side.values())
    if failed:
        print(f"{failed} requests failed; the numbers above count only the answered ones.")


if __name__ == "__main__":
    app.run(main)
