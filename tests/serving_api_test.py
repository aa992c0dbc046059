"""The server's gRPC and REST APIs against a real server process: predictions in Chinese and
English, metadata, model status, version and label selection, the client CLI, and 62 malformed
requests that each get their own status while the server keeps answering."""

import base64
import http.client
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, predict_pb2, regression_pb2)

from components.contract import SIGNATURES
from serving_fixtures import (AVAILABLE, REPO, expected_generation, expected_story, predict_request,
                              serve_stub_versions, stories)

ZH, EN = "从前有座山", "Once upon a time"
CODE = grpc.StatusCode
GENERATE = dict(max_new_tokens=4, temperature=0.5, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Versions 1 and 2 of the stub model, both served; labels stable -> 1, canary -> 2, gone -> 9."""
    with serve_stub_versions(tmp_path_factory.mktemp("serving_api"), [1, 2], "--model_version_policy=all",
                             "--version_labels=stable:1,canary:2,gone:9", "--max_prompt_bytes=1024",
                             "--max_request_batch_size=8", "--max_new_tokens_limit=2000",
                             "--max_request_bytes=65536", "--file_system_poll_wait_seconds=0") as process:
        yield process


def assert_still_serving(server):
    assert stories(server.predict([ZH])) == [expected_story(ZH, 2)]


# ---------------------------------------------------------------------------------- gRPC

def test_grpc_predict_answers_from_the_newest_version_in_chinese_and_english(server):
    response = server.predict([ZH, EN])
    assert stories(response) == [expected_story(ZH, 2), expected_story(EN, 2)]
    assert tf.make_ndarray(response.outputs["num_tokens"]).tolist() == [5, 16]
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == ("storygen", 2, "serving_default")


def test_grpc_generate_passes_the_sampling_parameters(server):
    response = server.predict([ZH, EN], "generate", **GENERATE)
    assert stories(response) == [expected_generation(ZH, 2, 4, 40, 7), expected_generation(EN, 2, 4, 40, 7)]
    assert tf.make_ndarray(response.outputs["num_tokens"]).tolist() == [4, 4]
    assert tf.make_ndarray(response.outputs["log_prob"]).tolist() == [-2.5, -8.0]
    assert tf.make_ndarray(response.outputs["token_ids"]).tolist() == [[ord(c) for c in ZH[:4]],
                                                                       [ord(c) for c in EN[:4]]]


@pytest.mark.parametrize("spec, version", [({"version": 1}, 1), ({"version": 2}, 2), ({"label": "stable"}, 1),
                                           ({"label": "canary"}, 2), ({}, 2)])
def test_grpc_version_or_label_picks_the_version(server, spec, version):
    response = server.predict([EN], **spec)
    assert stories(response) == [expected_story(EN, version)]
    assert response.model_spec.version.value == version


def test_grpc_output_filter_returns_only_the_outputs_asked_for(server):
    request = predict_request([EN], "generate", **GENERATE)
    request.output_filter.append("story")
    response = server.prediction.Predict(request, timeout=30)
    assert list(response.outputs) == ["story"]


def test_grpc_metadata_lists_the_signatures_with_dtypes_and_shapes(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "storygen"
    response = server.prediction.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 2
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    signatures = signature_defs.signature_def
    assert set(signatures) == {"serving_default", "generate"}  # the stub's signatures

    def described(tensors):
        return {name: (tf.as_dtype(info.dtype).name, [d.size for d in info.tensor_shape.dim])
                for name, info in tensors.items()}

    def contract(tensors):
        return {t.name: (t.dtype, [-1 if size is None else size for size in t.shape]) for t in tensors}

    for name in signatures:
        assert described(signatures[name].inputs) == contract(SIGNATURES[name].inputs), name
        assert described(signatures[name].outputs) == contract(SIGNATURES[name].outputs), name


def test_grpc_model_status_lists_the_available_versions(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "storygen"
    response = server.models.GetModelStatus(request, timeout=30)
    assert [(s.version, s.state, s.status.error_code) for s in response.model_version_status] == [
        (1, AVAILABLE, 0), (2, AVAILABLE, 0)]
    request.model_spec.version_label = "stable"
    assert [s.version for s in server.models.GetModelStatus(request, timeout=30).model_version_status] == [1]


def test_grpc_deadline_is_honoured_on_a_slow_request(server):
    with pytest.raises(grpc.RpcError) as error:
        server.predict([EN], "generate", timeout=0.3, **dict(GENERATE, max_new_tokens=1500))
    assert error.value.code() == CODE.DEADLINE_EXCEEDED
    assert_still_serving(server)


# ---------------------------------------------------------------------------------- REST

def test_rest_row_format_returns_predictions_per_example(server):
    status, body = server.rest("/v1/models/storygen:predict", {"instances": [ZH, EN]})
    assert status == 200
    assert body == {"predictions": [{"story": expected_story(ZH, 2), "num_tokens": 5},
                                    {"story": expected_story(EN, 2), "num_tokens": 16}]}
    status, body = server.rest("/v1/models/storygen/versions/1:predict", {"instances": [{"prompt": ZH}]})
    assert (status, body) == (200, {"predictions": [{"story": expected_story(ZH, 1), "num_tokens": 5}]})


def test_rest_columnar_format_returns_outputs_per_name(server):
    body = {"signature_name": "generate", "inputs": {"prompt": [ZH, EN], **GENERATE}}
    status, answer = server.rest("/v1/models/storygen/labels/stable:predict", body)
    assert status == 200
    assert answer == {"outputs": {
        "story": [expected_generation(ZH, 1, 4, 40, 7), expected_generation(EN, 1, 4, 40, 7)],
        "num_tokens": [4, 4], "log_prob": [-2.5, -8.0],
        "token_ids": [[ord(c) for c in ZH[:4]], [ord(c) for c in EN[:4]]]}}


def test_rest_accepts_b64_bytes_in_both_formats(server):
    encoded = {"b64": base64.b64encode(ZH.encode("utf-8")).decode("ascii")}
    status, body = server.rest("/v1/models/storygen:predict", {"instances": [encoded]})
    assert (status, body) == (200, {"predictions": [{"story": expected_story(ZH, 2), "num_tokens": 5}]})
    status, body = server.rest("/v1/models/storygen/versions/2:predict", {"inputs": {"prompt": [encoded, EN]}})
    assert (status, body["outputs"]["story"]) == (200, [expected_story(ZH, 2), expected_story(EN, 2)])


def test_rest_metadata_and_status(server):
    status, body = server.rest("/v1/models/storygen/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "storygen", "signature_name": "", "version": "1"}
    generate = body["metadata"]["signature_def"]["signature_def"]["generate"]
    assert generate["inputs"]["seed"]["dtype"] == "DT_INT64"
    assert generate["inputs"]["seed"]["tensor_shape"] == {"dim": [], "unknown_rank": False}
    assert generate["outputs"]["token_ids"]["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}] * 2,
                                                                "unknown_rank": False}
    # The fixed parts of the URL in any case, as TF Serving matches them.
    assert server.rest("/V1/MODELS/storygen/VERSIONS/1/METADATA")[1] == body
    status, body = server.rest("/v1/models/storygen")
    assert (status, body) == (200, {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in "12"]})
    status, body = server.rest("/v1/models/storygen/labels/canary")
    assert (status, [s["version"] for s in body["model_version_status"]]) == (200, ["2"])


def test_rest_keep_alive_connection_stays_in_step_after_errors(server):
    """Requests on one connection, some of whose bodies the server does not read."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    good = json.dumps({"instances": [EN]}).encode()
    try:
        for method, path, body, status in [("POST", PREDICT, good, 200), ("POST", "/v2/stories", good, 404),
                                           ("POST", PREDICT, b"{bad", 400), ("PUT", PREDICT, good, 405),
                                           ("POST", PREDICT, good, 200)]:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == status, answer
        assert answer == {"predictions": [{"story": expected_story(EN, 2), "num_tokens": 16}]}
    finally:
        connection.close()


def test_a_reused_rest_connection_answers_as_fast_as_a_new_one(server):
    """Medians over 30 requests each way (a reused connection used to add 40 ms: Nagle's
    algorithm held the body until the client's delayed ACK of the headers)."""
    import statistics

    body = json.dumps({"instances": [EN]}).encode()

    def timed_request(connection):
        started = time.perf_counter()
        connection.request("POST", PREDICT, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return time.perf_counter() - started

    reused = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        kept = [timed_request(reused) for _ in range(30)]
    finally:
        reused.close()
    fresh = []
    for _ in range(30):
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        try:
            fresh.append(timed_request(connection))
        finally:
            connection.close()
    assert statistics.median(kept) <= statistics.median(fresh) * 1.2 + 0.002, (kept, fresh)


# ---------------------------------------------------------------------------------- client CLI

def test_client_cli_prints_the_story_over_grpc_and_rest(server):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    runs = {
        "grpc": ["--server", server.target, "--prompt", ZH, "--prompt", EN],
        "rest": ["--rest", server.rest_url, "--model_version", "1", "--prompt", ZH, "--signature", "generate",
                 "--temperature", "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "7", "--max_new_tokens", "8"],
        "error": ["--server", server.target, "--prompt", ZH, "--signature", "generate", "--seed", "7"],
    }
    # In parallel: each client spends most of its time importing TensorFlow.
    processes = {name: subprocess.Popen([sys.executable, "-m", "serving.client", *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, args in runs.items()}
    results = {name: (p.wait(120), p.stdout.read().decode(), p.stderr.read().decode())
               for name, p in processes.items()}
    assert results["grpc"][:2] == (0, f"{expected_story(ZH, 2)}\n{expected_story(EN, 2)}\n"), results["grpc"]
    assert results["rest"][:2] == (0, expected_generation(ZH, 1, 8, 40, 7) + "\n"), results["rest"]
    code, stdout, stderr = results["error"]
    assert (code, stdout) == (1, "")
    assert "INVALID_ARGUMENT" in stderr and "max_new_tokens" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------------------------- bad requests

def _with(request, name, proto=None):
    """`request` with input `name` replaced by `proto` (or removed)."""
    if proto is None:
        del request.inputs[name]
    else:
        request.inputs[name].CopyFrom(proto)
    return request


def _generate(**changes):
    return predict_request([EN], "generate", **dict(GENERATE, **changes))


def _huge_declared_shape():
    proto = tf.make_tensor_proto([b"x"], dtype=tf.string)
    proto.tensor_shape.dim[0].size = 10 ** 9
    return proto


def _truncated_proto():
    """A float32 scalar whose packed bytes are cut short."""
    proto = tf.make_tensor_proto(0.5, tf.float32)
    proto.ClearField("float_val")
    proto.tensor_content = b"\x00\x00\x00"
    return proto


def _filtered(request, name):
    request.output_filter.append(name)
    return request


def _status(model="storygen", version=None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    return request


# name -> (PredictRequest, expected code, a fragment of the message)
BAD_PREDICT = {
    "wrong dtype": (_with(predict_request([EN]), "prompt", tf.make_tensor_proto([1])), CODE.INVALID_ARGUMENT,
                    "dtype int32"),
    "wrong scalar dtype": (_with(_generate(), "temperature", tf.make_tensor_proto(0.5, tf.float64)),
                           CODE.INVALID_ARGUMENT, "expects float32"),
    "missing input": (_with(_generate(), "seed"), CODE.INVALID_ARGUMENT, "seed"),
    "extra input": (predict_request([EN], seed=7), CODE.INVALID_ARGUMENT, "no input 'seed'"),
    "empty batch": (predict_request([]), CODE.INVALID_ARGUMENT, "empty batch"),
    "wrong rank": (_with(predict_request([EN]), "prompt", tf.make_tensor_proto([[b"a"]], tf.string)),
                   CODE.INVALID_ARGUMENT, "shape [1, 1]"),
    "vector for a scalar": (_with(_generate(), "max_new_tokens", tf.make_tensor_proto([4], tf.int32)),
                            CODE.INVALID_ARGUMENT, "scalar"),
    "huge prompt": (predict_request(["x" * 2000]), CODE.INVALID_ARGUMENT, "1024 bytes"),
    "invalid utf-8": (predict_request([b"\xff\xfe story"]), CODE.INVALID_ARGUMENT, "UTF-8"),
    "too many rows": (predict_request([EN] * 9), CODE.INVALID_ARGUMENT, "9 rows"),
    "negative temperature": (_generate(temperature=-1.0), CODE.INVALID_ARGUMENT, "temperature must be >= 0"),
    "max_new_tokens over limit": (_generate(max_new_tokens=5000), CODE.INVALID_ARGUMENT, "2000"),
    "max_new_tokens zero": (_generate(max_new_tokens=0), CODE.INVALID_ARGUMENT, "max_new_tokens"),
    "huge declared shape": (_with(predict_request([EN]), "prompt", _huge_declared_shape()), CODE.INVALID_ARGUMENT,
                            "limit"),
    "malformed tensor": (_with(_generate(), "temperature", _truncated_proto()), CODE.INVALID_ARGUMENT,
                         "not a valid TensorProto"),
    "unknown output filter": (_filtered(predict_request([EN]), "log_prob"), CODE.INVALID_ARGUMENT, "output_filter"),
    "message too large": (predict_request(["x" * 1000] * 80), CODE.RESOURCE_EXHAUSTED, ""),
    "unknown model": (predict_request([EN], model="poems"), CODE.NOT_FOUND, "poems"),
    "unknown version": (predict_request([EN], version=7), CODE.NOT_FOUND, "Version 7"),
    "unknown label": (predict_request([EN], label="beta"), CODE.INVALID_ARGUMENT, "beta"),
    "label of an unloaded version": (predict_request([EN], label="gone"), CODE.NOT_FOUND, "version 9"),
    "unknown signature": (predict_request([EN], "poem"), CODE.FAILED_PRECONDITION, "poem"),
    "no model spec": (predict_pb2.PredictRequest(), CODE.INVALID_ARGUMENT, "Missing ModelSpec"),
}

# name -> (RPC of the server, request, expected code, a fragment of the message)
BAD_OTHER_RPCS = {
    "classify": ("prediction.Classify", classification_pb2.ClassificationRequest(), CODE.UNIMPLEMENTED, "Classify"),
    "regress": ("prediction.Regress", regression_pb2.RegressionRequest(), CODE.UNIMPLEMENTED, "Regress"),
    "multi inference": ("prediction.MultiInference", inference_pb2.MultiInferenceRequest(), CODE.UNIMPLEMENTED,
                        "MultiInference"),
    "reload config without models": ("models.HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest(),
                                     CODE.INVALID_ARGUMENT, "names no model"),
    "metadata field": ("prediction.GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "storygen"}, metadata_field=["graph"]), CODE.INVALID_ARGUMENT, "signature_def"),
    "status of unknown model": ("models.GetModelStatus", _status(model="poems"), CODE.NOT_FOUND, "poems"),
    "status of unknown version": ("models.GetModelStatus", _status(version=7), CODE.NOT_FOUND, "7"),
    "status without model spec": ("models.GetModelStatus", get_model_status_pb2.GetModelStatusRequest(),
                                  CODE.INVALID_ARGUMENT, "Missing ModelSpec"),
}


def assert_rpc_error(rpc, request, code, fragment):
    with pytest.raises(grpc.RpcError) as error:
        rpc(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()
    assert "\n" not in error.value.details() and "Traceback" not in error.value.details()


@pytest.mark.parametrize("case", sorted(BAD_PREDICT))
def test_bad_predict_request_gets_its_status_and_the_server_keeps_serving(server, case):
    assert_rpc_error(server.prediction.Predict, *BAD_PREDICT[case])
    assert_still_serving(server)


@pytest.mark.parametrize("case", sorted(BAD_OTHER_RPCS))
def test_other_bad_rpcs_get_their_status_and_the_server_keeps_serving(server, case):
    rpc_name, request, code, fragment = BAD_OTHER_RPCS[case]
    stub_name, method = rpc_name.split(".")
    assert_rpc_error(getattr(getattr(server, stub_name), method), request, code, fragment)
    assert_still_serving(server)


def _generate_body(**changes):
    return {"signature_name": "generate", "inputs": {"prompt": [EN], **dict(GENERATE, **changes)}}


PREDICT = "/v1/models/storygen:predict"
# name -> (path, body (bytes are sent as they are), HTTP status, a fragment of the error, method)
BAD_REST = {
    "malformed json": (PREDICT, b'{"instances": [', 400, "not valid JSON", None),
    "body not an object": (PREDICT, [EN], 400, "JSON object", None),
    "no instances or inputs": (PREDICT, {"signature_name": ""}, 400, "exactly one", None),
    "both instances and inputs": (PREDICT, {"instances": [EN], "inputs": [EN]}, 400, "exactly one", None),
    "bad base64": (PREDICT, {"instances": [{"b64": "%%%"}]}, 400, "base64", None),
    "number for a string": (PREDICT, {"instances": [42]}, 400, "expects strings", None),
    "float for an int": (PREDICT, _generate_body(max_new_tokens=1.5), 400, "integers", None),
    "int out of range": (PREDICT, _generate_body(seed=2 ** 70), 400, "integers in", None),
    "b64 for a number": (PREDICT, _generate_body(seed={"b64": "AA=="}), 400, "integers", None),
    "ragged list": (PREDICT, {"inputs": {"prompt": [[EN], []]}}, 400, "ragged", None),
    "empty instances": (PREDICT, {"instances": []}, 400, "non-empty", None),
    "empty inputs batch": (PREDICT, {"inputs": {"prompt": []}}, 400, "empty batch", None),
    "scalar in row format": (PREDICT, {"signature_name": "generate", "instances": [dict(GENERATE, prompt=EN)]}, 400,
                             "Scalars cannot be sent in the row", None),
    "mixed instances": (PREDICT, {"instances": [{"prompt": EN}, EN]}, 400, "mixes", None),
    "instances with other inputs": (PREDICT, {"signature_name": "generate",
                                              "instances": [{"prompt": EN}, {"prompt": EN, "seed": 1}]}, 400,
                                    "same inputs", None),
    "lone surrogate": (PREDICT, b'{"instances": ["\\ud800"]}', 400, "not valid Unicode", None),
    "body not utf-8": (PREDICT, b'{"instances": ["\xff"]}', 400, "not valid JSON", None),
    "missing input": (PREDICT, {"signature_name": "generate", "inputs": {"prompt": [EN], "seed": 7}}, 400,
                      "needs input(s) max_new_tokens", None),
    "extra input": (PREDICT, {"inputs": {"prompt": [EN], "style": ["fable"]}}, 400, "no input 'style'", None),
    "negative temperature": (PREDICT, _generate_body(temperature=-0.5), 400, "temperature must be >= 0", None),
    "max_new_tokens over limit": (PREDICT, _generate_body(max_new_tokens=2001), 400, "2000", None),
    "huge prompt": (PREDICT, {"instances": ["字" * 400]}, 400, "1024 bytes", None),
    "body too large": (PREDICT, {"instances": ["x" * 1000] * 80}, 413, "limit", None),
    "unknown model": ("/v1/models/poems:predict", {"instances": [EN]}, 404, "poems", None),
    "unknown version": ("/v1/models/storygen/versions/7:predict", {"instances": [EN]}, 404, "Version 7", None),
    "unknown label": ("/v1/models/storygen/labels/beta:predict", {"instances": [EN]}, 400, "beta", None),
    "unknown signature": (PREDICT, {"signature_name": "poem", "instances": [EN]}, 400, "poem", None),
    "no model name": ("/v1/models", None, 400, "Missing model name", "GET"),
    "signature name not a string": (PREDICT, {"signature_name": 3, "instances": [EN]}, 400, "signature_name", None),
    "unknown url": ("/v2/stories", None, 404, "No such URL", None),
    "metadata of unknown version": ("/v1/models/storygen/versions/7/metadata", None, 404, "Version 7", None),
    "classify": ("/v1/models/storygen:classify", {"examples": []}, 501, "Classify", None),
    "regress": ("/v1/models/storygen:regress", {"examples": []}, 501, "Regress", None),
    "get on predict": (PREDICT, None, 405, "not allowed", "GET"),
}


@pytest.mark.parametrize("case", sorted(BAD_REST))
def test_bad_rest_request_gets_its_http_status_and_the_server_keeps_serving(server, case):
    path, body, status, fragment, method = BAD_REST[case]
    code, answer = server.rest(path, body, method=method)
    assert code == status, answer
    assert list(answer) == ["error"] and fragment in answer["error"]
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert_still_serving(server)


def test_requests_are_counted_by_protocol_method_and_status(server):
    def count(protocol, code):
        return server.metric("storygen_requests_total", protocol=protocol, method="Predict", code=code)

    before = count("grpc", "NOT_FOUND"), count("rest", "INVALID_ARGUMENT"), count("rest", "OK")
    with pytest.raises(grpc.RpcError):
        server.predict([EN], model="poems")
    assert server.rest(PREDICT, {"instances": [7]})[0] == 400
    assert server.rest(PREDICT, {"instances": [EN]})[0] == 200
    after = count("grpc", "NOT_FOUND"), count("rest", "INVALID_ARGUMENT"), count("rest", "OK")
    assert [b - a for a, b in zip(before, after)] == [1, 1, 1]
    assert server.metric("storygen_requests_in_flight") == 0
