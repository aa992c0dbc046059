"""Serving throughput and latency with dynamic batching on and off, side by side.

Section `serving` of `python -m benchmarks.run`. A worker process starts `python -m
serving.server` twice on the same model base path, with --enable_batching and without (server
defaults otherwise: --max_batch_size=32 --batch_timeout_micros=1000), and drives them with 1,
8 and 32 concurrent gRPC clients (threads of the worker, each sending one-prompt Predict
requests back to back) for a few seconds per point, the two servers taking turns. The rows
give requests per second, p50 and p99 latency, batching on against off.

Without `--serving_model_base_path` it serves a synthetic model whose call costs like
autoregressive decoding does: 32 sequential steps, each a [B, 1024] x [1024, 1024] matmul, so a
call reads the weights once per step whatever B is (as a decoder step reads its layers).
"""

import atexit
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from benchmarks.harness import REPO, alternate
from components.config import PushConfig

CLIENTS = (1, 8, 32)
SIDES = {"batching": ("--enable_batching",), "no batching": ()}
MODEL_NAME = PushConfig().model_name
SIGNATURE = "serving_default"  # its only input must be `prompt`
PROMPT = "从前有座山"  # each request appends a counter to it
WIDTH = 1024  # of the synthetic model's matmuls
SYNTHETIC_STEPS = 32  # sequential matmuls per call of the synthetic model


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

    def __init__(self, base_path: str, *server_flags: str):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.server", f"--model_base_path={base_path}",
                                      f"--model_name={MODEL_NAME}", f"--port={port}", "--rest_api_port=0",
                                      *server_flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def wait_ready(self) -> None:
        import grpc

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; run `python -m serving.server` "
                                "by hand to see why.")
            try:
                self.stub.Predict(request(PROMPT), timeout=30)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError("the server did not answer within 120 s.")

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(60)


def request(prompt: str):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    message = predict_pb2.PredictRequest()
    message.model_spec.name = MODEL_NAME
    message.model_spec.signature_name = SIGNATURE
    message.inputs["prompt"].CopyFrom(tf.make_tensor_proto([prompt.encode("utf-8")], dtype=tf.string, shape=[1]))
    return message


def load(server: Server, clients: int, seconds: float) -> dict:
    """Requests per second and latency percentiles with `clients` clients sending back to back."""
    import grpc

    latencies, errors = [], []
    stop = threading.Event()

    def client(i):
        n = 0
        while not stop.is_set():
            n += 1
            message = request(f"{PROMPT} {i}-{n}")
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


def serving_worker(work_dir: str, model_base_path: str | None, server_flags=()):
    """Worker: both servers (SIDES, each also with `server_flags`) on one model, started and
    warmed up; `load(side, clients, seconds)` measures one point. The servers stop when the
    worker exits."""
    if model_base_path is None:
        model_base_path = os.path.join(work_dir, "serving-synthetic")
        os.makedirs(model_base_path)
        save_synthetic_model(model_base_path, SYNTHETIC_STEPS)
    servers = {}

    def stop_servers():
        for server in servers.values():
            server.stop()

    atexit.register(stop_servers)  # registered first: a server that fails to start leaves none running
    for side, side_flags in SIDES.items():
        servers[side] = Server(model_base_path, *side_flags, *server_flags)
    for server in servers.values():
        server.wait_ready()
        load(server, max(CLIENTS), 1)  # warm-up: thread pools, first traces
    return {"load": lambda side, clients, seconds: load(servers[side], clients, seconds)}


def run_section(h, model_base_path: str | None = None, server_flags=()):
    seconds = 2.0 if h.quick else 4.0
    w = h.worker("serving", "benchmarks.serving:serving_worker", work_dir=h.work_dir, model_base_path=model_base_path,
                 server_flags=server_flags)
    model = model_base_path or (f"synthetic ({SYNTHETIC_STEPS} sequential [B, {WIDTH}] x [{WIDTH}, {WIDTH}] matmuls "
                                "per call)")
    added = f", plus {' '.join(server_flags)}" if server_flags else ""
    h.note(f"serving: model {model}; {seconds:g} s per point; servers with default flags "
           f"(--max_batch_size=32 --batch_timeout_micros=1000){added}; one-prompt gRPC Predict requests back to back")
    for clients in CLIENTS:
        points = {side: (lambda side=side: w.call("load", side=side, clients=clients, seconds=seconds))
                  for side in SIDES}
        stats = alternate(points, h.repeats)
        on, off = stats["batching"], stats["no batching"]
        h.row(f"serving {clients} clients: throughput", "requests/s", on.map(lambda r: r["rps"]), "batching off",
              off.map(lambda r: r["rps"]))
        for p in ("p50", "p99"):
            h.row(f"serving {clients} clients: {p} latency", "ms", on.map(lambda r, p=p: r[p]), "batching off",
                  off.map(lambda r, p=p: r[p]), higher_is_better=False)
        errors = sum(r["errors"] for r in on.values + off.values)
        if errors:
            h.note(f"serving {clients} clients: {errors} failed requests (not counted)")
    w.close()
