"""Helpers for the serving tests (imported explicitly, so they never clash with conftest.py).

- `StubStoryModel`: a tiny tf.Module with the serving contract's `serving_default` and
  `generate` signatures whose outputs are easy to predict (`expected_story`,
  `expected_generation`) and say which version answered. `generate` takes max_new_tokens
  milliseconds (in-graph, without Python), so tests can make a request slow, and fails with
  InvalidArgument for a negative temperature, as the real exporter's graph does.
- `save_version` / `stage_version` + `publish_version`: write a version atomically as the
  pusher does (`<base>/.tmp-N`, then rename to `<base>/N`).
- `ServerProcess`: `python -m serving.server` on free loopback ports, with gRPC stubs and a
  small REST helper; always `stop()` it. `serve_stub_versions` starts one over fresh stub
  versions and stops it afterwards.
- `clients_running`: client threads that send requests until the block ends.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from components.contract import PARAMETER_DTYPES, WARMUP_FILE
from components.model.decoding import input_signature

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "storygen"
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


# ---------------------------------------------------------------------------------- models

def expected_story(prompt: str, version: int) -> str:
    return f"{prompt} v{version}"


def expected_generation(prompt: str, version: int, max_new_tokens: int, top_k: int, seed: int) -> str:
    return f"{prompt} v{version} n={max_new_tokens} k={top_k} seed={seed}"


def _sleep(microseconds):
    """Sleeps inside the graph (tf.data's SleepDataset): a slow model without Python or busy CPU."""
    dataset = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    slept = tf.raw_ops.SleepDataset(input_dataset=dataset._variant_tensor, sleep_microseconds=microseconds,
                                    output_types=[tf.int64], output_shapes=[[]])
    # take(1): the iterator sleeps before each GetNext, and reduce() would ask once more for the end.
    return tf.data.experimental.from_variant(slept, dataset.element_spec).take(1).reduce(
        tf.constant(0, tf.int64), lambda total, x: total + x)


class StubStoryModel(tf.Module):
    def __init__(self, version: int):
        super().__init__()
        self.version = version

    @tf.function(input_signature=input_signature("serving_default"))
    def serving_default(self, prompt):
        return {"story": tf.strings.join([prompt, f" v{self.version}"]),
                "num_tokens": tf.strings.length(prompt, unit="UTF8_CHAR")}

    @tf.function(input_signature=input_signature("generate"))
    def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        check = tf.debugging.assert_greater_equal(temperature, 0.0, message="temperature must be >= 0")
        with tf.control_dependencies([check]):
            slept = _sleep(tf.cast(max_new_tokens, tf.int64) * 1000)
        with tf.control_dependencies([slept]):
            suffix = tf.strings.format(f" v{self.version} n={{}} k={{}} seed={{}}", (max_new_tokens, top_k, seed))
            story = tf.strings.join([prompt, suffix])
        chars = tf.strings.length(prompt, unit="UTF8_CHAR")
        batch = tf.shape(prompt)[0]
        # The prompt's code points, cut or padded to max_new_tokens columns.
        token_ids = tf.strings.unicode_decode(prompt, "UTF-8").to_tensor(shape=tf.stack([batch, max_new_tokens]))
        return {"story": story,
                "num_tokens": tf.fill([batch], max_new_tokens),
                "log_prob": -temperature * tf.cast(chars, tf.float32),
                "token_ids": token_ids}


def stage_version(base_path: str, version: int) -> str:
    """Saves StubStoryModel(version) under `<base_path>/.tmp-<version>` and returns that path."""
    staging = os.path.join(base_path, f".tmp-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    model = StubStoryModel(version)
    tf.saved_model.save(model, staging, signatures={"serving_default": model.serving_default,
                                                    "generate": model.generate})
    return staging


def stage_broken_version(base_path: str, version: int) -> str:
    """A staged version whose saved_model.pb is garbage, so loading it fails."""
    staging = os.path.join(base_path, f".tmp-{version}")
    os.makedirs(staging)
    with open(os.path.join(staging, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    return staging


def publish_version(staging: str, version: int) -> str:
    target = os.path.join(os.path.dirname(staging), str(version))
    os.rename(staging, target)  # atomic: the server sees the whole version or nothing
    return target


def save_version(base_path: str, version: int) -> str:
    return publish_version(stage_version(base_path, version), version)


# ---------------------------------------------------------------------------------- server

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServerProcess:
    """`python -m serving.server` on free loopback ports; `flags` are extra server flags (with
    model_base_path None, they name the models, e.g. --model_config_file)."""

    def __init__(self, model_base_path: str | None, log_path: str, *flags: str):
        self.grpc_port, self.rest_port = free_ports(2)
        self.log_path = str(log_path)
        models = [f"--model_base_path={model_base_path}"] if model_base_path else []
        command = [sys.executable, "-m", "serving.server", *models, f"--port={self.grpc_port}",
                   f"--rest_api_port={self.rest_port}", *flags]
        env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def wait_ready(self, version: int, timeout_s: float = 90) -> "ServerProcess":
        """Polls GetModelStatus until `version` is AVAILABLE."""
        deadline = time.monotonic() + timeout_s
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"The server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                response = self.models.GetModelStatus(request, timeout=2)
                if any(s.version == version and s.state == AVAILABLE for s in response.model_version_status):
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"Version {version} was not AVAILABLE after {timeout_s} s:\n{self.log()[-3000:]}")

    def wait_log(self, text: str, timeout_s: float = 60) -> float:
        """Polls the log until it holds `text`; returns time.monotonic() then."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"'{text}' was not logged after {timeout_s} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("VmRSS missing from /proc/<pid>/status")

    def metric(self, name: str, **labels: str) -> float:
        """A value from /monitoring/prometheus/metrics, summed over the series matching `labels`."""
        with urllib.request.urlopen(self.rest_url + "/monitoring/prometheus/metrics", timeout=10) as response:
            text = response.read().decode()
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{")[0].split(" ")[0] == name and all(w in line for w in wanted))

    # ---- gRPC

    def predict(self, prompts, signature: str = "", timeout: float = 30, **kwargs):
        return self.prediction.Predict(predict_request(prompts, signature, **kwargs), timeout=timeout)

    # ---- REST

    def rest(self, path: str, body=None, *, method: str | None = None, headers: dict | None = None,
             timeout: float = 30) -> tuple[int, object]:
        """(HTTP status, parsed JSON) of a request; `body` is JSON-encoded unless it is bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.rest_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def predict_request(prompts, signature: str = "", *, model: str = MODEL_NAME, version: int | None = None,
                    label: str | None = None, **params) -> predict_pb2.PredictRequest:
    """A PredictRequest for `prompts` (str or bytes) with scalar parameters in the contract's dtypes."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    encoded = [p.encode("utf-8") if isinstance(p, str) else p for p in prompts]
    request.inputs["prompt"].CopyFrom(tf.make_tensor_proto(encoded, dtype=tf.string, shape=[len(encoded)]))
    for name, value in params.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=PARAMETER_DTYPES[name]))
    return request


def write_warmup_requests(version_path: str, requests) -> None:
    """Writes TF Serving's warm-up file into a version: one PredictionLog record per PredictRequest."""
    from tensorflow_serving.apis import prediction_log_pb2

    os.makedirs(os.path.join(version_path, os.path.dirname(WARMUP_FILE)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_path, WARMUP_FILE)) as writer:
        for request in requests:
            writer.write(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())


def stories(response) -> list[str]:
    return [s.decode("utf-8") for s in tf.make_ndarray(response.outputs["story"]).tolist()]


@contextlib.contextmanager
def serve_stub_versions(root, versions, *flags: str):
    """A server over `root/storygen` holding stub `versions`, ready with the newest one."""
    base = root / MODEL_NAME
    base.mkdir()
    for version in versions:
        save_version(str(base), version)
    process = ServerProcess(str(base), root / "server.log", *flags)
    try:
        yield process.wait_ready(max(versions))
    finally:
        process.stop()


def rest_story(server: ServerProcess, prompt: str) -> str:
    """The story of one REST row request, or 'HTTP <status>: <body>' when it failed."""
    status, body = server.rest(f"/v1/models/{MODEL_NAME}:predict", {"instances": [prompt]})
    return body["predictions"][0]["story"] if status == 200 else f"HTTP {status}: {body}"


@contextlib.contextmanager
def clients_running(count: int, client):
    """Runs `client(i, stop)` in `count` threads for the duration of the block; each loops
    until the `stop` event is set, which happens when the block ends."""
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(i, stop)) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()
