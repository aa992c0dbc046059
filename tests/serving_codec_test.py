"""Unit tests of the serving package's pure parts: JSON and TensorProto conversion, version
policies and labels, and the cleaning of TF error messages."""

import grpc
import numpy as np
import pytest
import tensorflow as tf

from serving import tensor_codec
from serving.errors import ServingError, from_tf_error, invalid_argument
from serving.model_manager import VersionPolicy, parse_labels


class FakeSignature:
    """What tensor_codec needs of a signature: its name, inputs and their dtypes."""

    def __init__(self, **inputs):
        self.name = "test"
        self.inputs = inputs

    def input_dtype(self, name):
        if name not in self.inputs:
            raise invalid_argument(f"no input '{name}'")
        return self.inputs[name]


def error_of(fn, *args) -> ServingError:
    with pytest.raises(ServingError) as error:
        fn(*args)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return error.value


# ---------------------------------------------------------------------------------- JSON in

def test_json_strings_become_utf8_bytes_and_b64_is_decoded():
    array = tensor_codec.json_to_ndarray("prompt", ["从前", {"b64": "/w=="}, "once"], tf.string)
    assert array.dtype == object and array.tolist() == ["从前".encode(), b"\xff", b"once"]


def test_json_numbers_take_the_signature_dtype_and_shape():
    array = tensor_codec.json_to_ndarray("x", [[1, 2], [3, 4]], tf.int64)
    assert array.dtype == np.int64 and array.shape == (2, 2)
    assert tensor_codec.json_to_ndarray("t", 1, tf.float32).dtype == np.float32  # ints are valid floats
    assert tensor_codec.json_to_ndarray("e", [], tf.int32).shape == (0,)


@pytest.mark.parametrize("value, dtype, fragment", [
    ([True], tf.int32, "integers"),
    ([1.5], tf.int32, "integers"),
    ([2 ** 31], tf.int32, "integers in"),
    (["1"], tf.float32, "numbers"),
    ([1], tf.bool, "true or false"),
    ([1], tf.string, "strings"),
    ([{"b64": "***"}], tf.string, "not valid base64"),
    ([{"b64": "AA==", "x": 1}], tf.string, "strings"),
    (["\ud800"], tf.string, "not valid Unicode"),
    ([[1], [2, 3]], tf.int32, "ragged"),
    ([1], tf.complex64, "use gRPC"),
])
def test_json_values_that_do_not_fit_the_dtype_are_rejected(value, dtype, fragment):
    assert fragment in error_of(tensor_codec.json_to_ndarray, "x", value, dtype).message


def test_json_nesting_deeper_than_any_tensor_is_rejected():
    value = 1
    for _ in range(40):
        value = [value]
    assert "nested deeper" in error_of(tensor_codec.json_to_ndarray, "x", value, tf.int32).message


def test_row_and_columnar_requests_decode_to_the_same_inputs():
    signature = FakeSignature(prompt=tf.string, seed=tf.int64)
    rows, row_format = tensor_codec.decode_json_request(
        {"instances": [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]}, signature)
    columns, columnar = tensor_codec.decode_json_request({"inputs": {"prompt": ["a", "b"], "seed": [1, 2]}}, signature)
    assert (row_format, columnar) == (True, False)
    for inputs in (rows, columns):
        assert inputs["prompt"].tolist() == [b"a", b"b"] and inputs["seed"].tolist() == [1, 2]


def test_bare_values_are_accepted_for_a_single_input_signature_only():
    single = FakeSignature(prompt=tf.string)
    assert tensor_codec.decode_json_request({"instances": ["a"]}, single)[0]["prompt"].tolist() == [b"a"]
    assert tensor_codec.decode_json_request({"inputs": [{"b64": "Yg=="}]}, single)[0]["prompt"].tolist() == [b"b"]
    two = FakeSignature(prompt=tf.string, story=tf.string)
    assert "has 2 inputs" in error_of(tensor_codec.decode_json_request, {"inputs": ["a"]}, two).message


# ---------------------------------------------------------------------------------- JSON out

def test_row_format_response_has_one_entry_per_example():
    outputs = {"story": np.array([b"a", b"\xff"], dtype=object), "log_prob": np.array([0.1, -2.5], np.float32)}
    assert tensor_codec.encode_json_response(outputs, row_format=True) == {"predictions": [
        {"story": "a", "log_prob": 0.1}, {"story": {"b64": "/w=="}, "log_prob": -2.5}]}
    assert tensor_codec.encode_json_response({"story": outputs["story"]}, row_format=True) == {
        "predictions": ["a", {"b64": "/w=="}]}


def test_columnar_response_has_one_entry_per_output():
    outputs = {"story": np.array(["从前".encode()], dtype=object), "token_ids": np.array([[1, 2]], np.int32)}
    assert tensor_codec.encode_json_response(outputs, row_format=False) == {
        "outputs": {"story": ["从前"], "token_ids": [[1, 2]]}}
    assert tensor_codec.encode_json_response({"n": np.array(3, np.int32)}, row_format=False) == {"outputs": 3}


def test_row_format_needs_outputs_with_a_shared_batch_dimension():
    outputs = {"story": np.array([b"a"], dtype=object), "total": np.array(1.0, np.float32)}
    assert "columnar" in error_of(tensor_codec.encode_json_response, outputs, True).message


# ---------------------------------------------------------------------------------- TensorProto

def test_tensor_protos_round_trip():
    proto = tensor_codec.ndarray_to_proto(np.array([b"x", "从".encode()], dtype=object))
    assert tensor_codec.proto_to_ndarray("p", proto, tf.string, 100).tolist() == [b"x", "从".encode()]


def test_tensor_proto_of_another_dtype_is_rejected_by_name():
    proto = tf.make_tensor_proto([1.0], tf.float64)
    message = error_of(tensor_codec.proto_to_ndarray, "temperature", proto, tf.float32, 100).message
    assert message == "Input 'temperature' has dtype float64 but the signature expects float32."


def test_tensor_proto_declaring_more_elements_than_allowed_is_rejected_before_allocating():
    proto = tf.make_tensor_proto([1], tf.int32)
    proto.tensor_shape.dim[0].size = 10 ** 12
    assert "limit of 100 elements" in error_of(tensor_codec.proto_to_ndarray, "x", proto, tf.int32, 100).message


# ---------------------------------------------------------------------------------- policies, errors

@pytest.mark.parametrize("text, selected", [
    ("latest", {5}), ("latest:2", {3, 5}), ("all", {1, 3, 5}), ("specific:1,4", {1}),
])
def test_version_policy_selects_versions(text, selected):
    assert VersionPolicy.parse(text).select([1, 3, 5]) == selected


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "all:2", "specific:", "specific:a"])
def test_bad_version_policy_is_a_clear_error(text):
    with pytest.raises(ValueError, match="is not one of latest, latest:N, all or specific"):
        VersionPolicy.parse(text)


def test_version_labels_parse():
    assert parse_labels("stable:1, canary:2") == {"stable": 1, "canary": 2}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="label:version"):
        parse_labels("stable=1")


def test_tf_errors_keep_their_code_and_message_without_graph_decorations():
    error = tf.errors.InvalidArgumentError(None, None, (
        "Graph execution error:\n\nDetected at node assert/Assert defined at (most recent call last):\n"
        "<stack traces unavailable>\nassertion failed: [temperature must be >= 0] [x = ] [-1]\n"
        "\t [[{{node assert/Assert}}]] [Op:__inference_signature_wrapper_207]"))
    serving_error = from_tf_error(error)
    assert serving_error.code == grpc.StatusCode.INVALID_ARGUMENT and serving_error.http_status == 400
    assert serving_error.message == "assertion failed: [temperature must be >= 0] [x = ] [-1]"
    assert from_tf_error(tf.errors.ResourceExhaustedError(None, None, "OOM")).http_status == 429
