"""Conversions between the wire formats and numpy arrays.

gRPC carries TensorProtos (converted with tf.make_ndarray / tf.make_tensor_proto). REST carries
TF Serving's JSON: a request holds either "instances" (row format: one entry per example) or
"inputs" (columnar format: one entry per input), bytes travel as {"b64": "..."}, and the
response holds "predictions" or "outputs" respectively.

String tensors are numpy object arrays of `bytes`, as TensorFlow returns them.
"""

import base64
import binascii
import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from serving.errors import invalid_argument

# Deeper JSON nesting than any signature's rank is an attack, not a tensor.
_MAX_JSON_RANK = 32


# ---------------------------------------------------------------------------------- TensorProto

def proto_to_ndarray(name: str, proto: tensor_pb2.TensorProto, dtype: tf.DType, max_elements: int) -> np.ndarray:
    """The array in `proto`, which must have `dtype` and at most `max_elements` elements."""
    if proto.dtype != dtype.as_datatype_enum:
        raise invalid_argument(f"Input '{name}' has dtype {_dtype_name(proto.dtype)} but the signature expects "
                               f"{dtype.name}.")
    dims = [d.size for d in proto.tensor_shape.dim]
    # make_ndarray allocates the declared shape before looking at the values, so a tiny proto
    # declaring a huge shape would exhaust memory: check the count first.
    if any(d < 0 for d in dims) or math.prod(dims) > max_elements:
        raise invalid_argument(f"Input '{name}' declares shape {dims}, beyond this server's limit of "
                               f"{max_elements} elements per input.")
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as e:
        raise invalid_argument(f"Input '{name}' is not a valid TensorProto: {e}.") from None


def ndarray_to_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    return tf.make_tensor_proto(array)


def _dtype_name(enum: int) -> str:
    try:
        return tf.as_dtype(enum).name
    except TypeError:
        return f"<invalid dtype {enum}>"


# ---------------------------------------------------------------------------------- JSON in

def decode_json_request(payload: dict, signature) -> tuple[dict[str, np.ndarray], bool]:
    """The inputs of a parsed :predict body for `signature`, and whether it used the row format.

    `signature.input_dtype(name)` gives each input's dtype (and rejects names it lacks)."""
    if ("instances" in payload) == ("inputs" in payload):
        raise invalid_argument('The request body must hold exactly one of "instances" (row format) or '
                               '"inputs" (columnar format).')
    if "instances" in payload:
        return _decode_rows(payload["instances"], signature), True
    value = payload["inputs"]
    if _is_named(value):
        return {name: json_to_ndarray(name, v, signature.input_dtype(name)) for name, v in value.items()}, False
    name = _only_input(signature, '"inputs"')
    return {name: json_to_ndarray(name, value, signature.input_dtype(name))}, False


def _decode_rows(instances, signature) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise invalid_argument('"instances" must be a non-empty list with one entry per example.')
    named = [_is_named(instance) for instance in instances]
    if not any(named):
        name = _only_input(signature, '"instances"')
        return {name: json_to_ndarray(name, instances, signature.input_dtype(name))}
    if not all(named):
        raise invalid_argument('"instances" mixes objects naming inputs with bare values; use one form.')
    names = set(instances[0])
    for i, instance in enumerate(instances):
        if set(instance) != names:
            raise invalid_argument(f"Instance {i} names inputs {sorted(instance)} but instance 0 names "
                                   f"{sorted(names)}; every instance needs the same inputs.")
    return {name: json_to_ndarray(name, [instance[name] for instance in instances], signature.input_dtype(name))
            for name in sorted(names)}


def _is_named(value) -> bool:
    """True for a JSON object naming inputs (as opposed to a {"b64": ...} value)."""
    return isinstance(value, dict) and not _is_b64(value)


def _is_b64(value) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _only_input(signature, field: str) -> str:
    names = list(signature.inputs)
    if len(names) != 1:
        raise invalid_argument(f"{field} must name the inputs (an object per example or per input), because "
                               f"signature '{signature.name}' has {len(names)} inputs: {', '.join(sorted(names))}.")
    return names[0]


def json_to_ndarray(name: str, value, dtype: tf.DType) -> np.ndarray:
    """A (nested) JSON list or scalar as an array of `dtype`; strings are UTF-8 encoded and
    {"b64": ...} values decoded."""
    leaves, shape = _flatten(name, value, depth=0)
    convert = _leaf_converter(name, dtype)
    converted = [convert(leaf) for leaf in leaves]
    if dtype == tf.string:
        array = np.empty(len(converted), dtype=object)  # np.array(list of bytes) would make fixed-width 'S'
        array[:] = converted
    else:
        array = np.array(converted, dtype=dtype.as_numpy_dtype)
    return array.reshape(shape)


def _flatten(name: str, value, depth: int) -> tuple[list, tuple]:
    """The leaves of a nested list in row-major order and its shape; rejects ragged lists."""
    if not isinstance(value, list):
        return [value], ()
    if depth >= _MAX_JSON_RANK:
        raise invalid_argument(f"Input '{name}' is nested deeper than {_MAX_JSON_RANK} levels.")
    if not value:
        return [], (0,)
    leaves, inner = _flatten(name, value[0], depth + 1)
    for item in value[1:]:
        item_leaves, item_shape = _flatten(name, item, depth + 1)
        if item_shape != inner:
            raise invalid_argument(f"Input '{name}' is a ragged list; every row must have the same shape.")
        leaves.extend(item_leaves)
    return leaves, (len(value),) + inner


def _leaf_converter(name: str, dtype: tf.DType):
    """A function checking and converting one JSON leaf to a Python value of `dtype`."""

    def fail(leaf, what):
        shown = repr(leaf) if len(repr(leaf)) <= 40 else repr(leaf)[:37] + "..."
        raise invalid_argument(f"Input '{name}' expects {what} ({dtype.name}), got {shown}.")

    if dtype == tf.string:
        def convert(leaf):
            if isinstance(leaf, str):
                try:
                    return leaf.encode("utf-8")
                except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates
                    raise invalid_argument(f"Input '{name}' holds a string that is not valid Unicode.") from None
            if _is_b64(leaf) and isinstance(leaf["b64"], str):
                try:
                    return base64.b64decode(leaf["b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise invalid_argument(f"Input '{name}' holds a {{\"b64\": ...}} value that is not valid "
                                           "base64.") from None
            fail(leaf, 'strings or {"b64": ...} objects')
    elif dtype == tf.bool:
        def convert(leaf):
            return leaf if isinstance(leaf, bool) else fail(leaf, "true or false")
    elif dtype.is_integer:
        low, high = dtype.min, dtype.max

        def convert(leaf):
            if isinstance(leaf, bool) or not isinstance(leaf, int):
                fail(leaf, "integers")
            if not low <= leaf <= high:
                fail(leaf, f"integers in [{low}, {high}]")
            return leaf
    elif dtype.is_floating:
        def convert(leaf):
            return leaf if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) else fail(leaf, "numbers")
    else:
        raise invalid_argument(f"Input '{name}' has dtype {dtype.name}, which the JSON API does not carry; "
                               "use gRPC.")
    return convert


# ---------------------------------------------------------------------------------- JSON out

def encode_json_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """TF Serving's response body: {"predictions": [...]} for row-format requests (one entry per
    example), else {"outputs": ...}; a single output is given bare, several as an object."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": to_json(next(iter(outputs.values())))}
        return {"outputs": {name: to_json(array) for name, array in outputs.items()}}
    rows = {array.shape[0] if array.ndim else None for array in outputs.values()}
    if len(rows) != 1 or None in rows:
        raise invalid_argument("The outputs do not share a batch dimension, so they cannot be returned as rows; "
                               'send the request with "inputs" (columnar format) instead.')
    if len(outputs) == 1:
        return {"predictions": to_json(next(iter(outputs.values())))}
    columns = {name: to_json(array) for name, array in outputs.items()}
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(rows.pop())]}


def to_json(array: np.ndarray):
    """An array as nested lists of JSON values: text as strings, other bytes as {"b64": ...},
    float32 at its own shortest precision (0.1, not 0.10000000149011612)."""
    if array.dtype == object:
        return _map_nested(array.tolist(), _bytes_to_json)
    if array.dtype in (np.float16, np.float32):
        # str of a numpy float32 is its shortest round-trip text; float() of that prints the same.
        return _map_nested(array.tolist(), lambda x: float(str(array.dtype.type(x))))
    return array.tolist()


def _map_nested(value, fn):
    if isinstance(value, list):
        return [_map_nested(item, fn) for item in value]
    return fn(value)


def _bytes_to_json(value: bytes):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}
