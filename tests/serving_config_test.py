"""TF Serving's configuration files against a real server process: several models from a
--model_config_file with their version policies and labels, the file re-read as it changes,
HandleReloadConfigRequest, and batching from a --batching_parameters_file (padding to
allowed_batch_sizes)."""

import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2

from serving.batching import read_batching_parameters
from serving.model_manager import VersionPolicy
from serving.models import ModelSpec, read_model_config
from serving_fixtures import (AVAILABLE, ServerProcess, expected_generation, expected_story, predict_request,
                              save_version, stories)

CONFIG = """
model_config_list {
  config {
    name: "stories"  base_path: "%(root)s/stories"  model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 3 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 3 }
  }
  config { name: "fables"  base_path: "%(root)s/fables" }
}
"""


def test_model_config_file_is_read_with_tf_servings_defaults(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(CONFIG % {"root": "/m"})
    assert read_model_config(str(path)) == [
        ModelSpec("stories", "/m/stories", VersionPolicy("specific", versions=frozenset({1, 3})),
                  {"stable": 1, "canary": 3}),
        ModelSpec("fables", "/m/fables", VersionPolicy("latest", count=1), {})]


@pytest.mark.parametrize("text, message", [
    ("", "model_config_list names no model."),
    ('model_config_list { config { name: "a" base_path: "/m" } config { name: "a" base_path: "/n" } }',
     "model names must differ; got a, a."),
    ('model_config_list { config { name: "a" } }', "every model needs a name and a base_path"),
    ('model_config_list { config { name: "a" base_path: "/m" model_version_policy { specific {} } } }',
     "a specific version policy needs at least one version."),
    ('model_config_list { config { name: "a" base_path: "/m" logging_config {} } }', "does not log requests"),
    ('custom_model_config { }', "custom_model_config is not supported"),
    ("model_config_list { config { name: ", "1:36 : '': Expected string"),
])
def test_a_model_config_storygen_serve_cannot_serve_is_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ValueError, match="^--model_config_file .*models.config: ") as error:
        read_model_config(str(path))
    assert message in str(error.value)


def test_batching_parameters_file_is_read_as_tf_servings_text_proto(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 0 }\nthread_pool_name { value: "
                    "'p' }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\npad_variable_length_inputs: true\n")
    assert read_batching_parameters(str(path)) == {
        "max_batch_size": 8, "batch_timeout_micros": 0, "thread_pool_name": "p", "allowed_batch_sizes": (4, 8),
        "pad_variable_length_inputs": True}
    path.write_text("enable_large_batch_splitting: true")
    with pytest.raises(ValueError, match='no field named "enable_large_batch_splitting"'):
        read_batching_parameters(str(path))


def available(server, model) -> list[int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    return [s.version for s in server.models.GetModelStatus(request, timeout=10).model_version_status
            if s.state == AVAILABLE]


def story(server, model, **spec) -> str:
    return stories(server.prediction.Predict(predict_request(["从前"], model=model, **spec), timeout=30))[0]


def wait_for(condition, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the server")


@pytest.fixture
def models_root(tmp_path):
    for model, versions in [("stories", [1, 2, 3]), ("fables", [1, 2]), ("tales", [5])]:
        (tmp_path / model).mkdir()
        for version in versions:
            save_version(str(tmp_path / model), version)
    return tmp_path


def test_model_config_file_serves_its_models_and_follows_its_changes(models_root, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(CONFIG % {"root": models_root})
    server = ServerProcess(None, tmp_path / "server.log", f"--model_config_file={config}",
                           "--model_config_file_poll_wait_seconds=0.5", "--file_system_poll_wait_seconds=0")
    try:
        wait_for(lambda: available(server, "stories") == [1, 3] and available(server, "fables") == [2])
        assert story(server, "stories") == expected_story("从前", 3)
        assert story(server, "stories", label="stable") == expected_story("从前", 1)
        assert story(server, "stories", version=3) == expected_story("从前", 3)
        assert story(server, "fables") == expected_story("从前", 2)
        with pytest.raises(grpc.RpcError) as error:
            story(server, "stories", version=2)  # on disk, but not in the policy
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        status, body = server.rest("/v1/models/fables/versions/2/metadata")
        assert status == 200 and body["model_spec"] == {"name": "fables", "signature_name": "", "version": "2"}

        # The file changes: fables goes, tales comes, stories follows the newest version.
        config.write_text(CONFIG.replace("specific { versions: 1 versions: 3 }", "latest { num_versions: 1 }")
                          .replace('version_labels { key: "stable" value: 1 }', "")
                          .replace('"fables"  base_path: "%(root)s/fables"', '"tales"  base_path: "%(root)s/tales"')
                          % {"root": models_root})
        wait_for(lambda: available(server, "stories") == [3] and available(server, "tales") == [5])
        with pytest.raises(grpc.RpcError) as error:
            story(server, "fables")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "serves 'stories', 'tales'" in error.value.details()
        assert story(server, "tales") == expected_story("从前", 5)

        # HandleReloadConfigRequest answers once the new config's versions are loaded.
        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(f'model_config_list {{ config {{ name: "fables" base_path: "{models_root}/fables" '
                          'model_version_policy { all {} } } }', request.config)
        assert server.models.HandleReloadConfigRequest(request, timeout=60).status.error_code == 0
        assert available(server, "fables") == [1, 2]
        assert story(server, "fables", version=1) == expected_story("从前", 1)
        with pytest.raises(grpc.RpcError):
            story(server, "stories")
    finally:
        server.stop()
    log = server.log()
    assert "models.config changed: now serving stories, tales" in log
    assert "Model fables is no longer configured" in log


def test_batching_parameters_file_pads_batches_to_allowed_sizes(models_root, tmp_path):
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 300000 }\n"
                          "num_batch_threads { value: 1 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 4\n")
    server = ServerProcess(str(models_root / "fables"), tmp_path / "server.log", "--enable_batching",
                           f"--batching_parameters_file={parameters}")
    try:
        server.wait_ready(2)
        rows = server.metric("storygen_model_rows_total")
        barrier = threading.Barrier(3)

        def client(i):
            barrier.wait()
            request = predict_request([f"故事 {i}"], "generate", max_new_tokens=5, temperature=0.5, top_k=40,
                                      top_p=0.9, seed=7)
            return stories(server.prediction.Predict(request, timeout=30))[0]

        with futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(client, range(3)))
        assert answers == [expected_generation(f"故事 {i}", 2, 5, 40, 7) for i in range(3)]
        assert server.metric("storygen_model_rows_total") - rows == 4  # 3 rows, padded to the allowed size 4
    finally:
        server.stop()
