"""ServingError: the one exception a request can fail with, carrying a gRPC status code and a
one-sentence message. The REST API maps the same code to its HTTP status."""

import re
import time

import grpc
import tensorflow as tf

# TF Serving's mapping of canonical codes to HTTP statuses (RESOURCE_EXHAUSTED -> 429 so that
# clients back off and retry, as for any rate limit).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

# TF errors carry the canonical code numbers that gRPC uses.
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request that cannot be answered: `code` is a grpc.StatusCode, `message` one sentence.
    `http_status` overrides the REST status for HTTP-only errors (e.g. 413 body too large)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or _HTTP_STATUS.get(code, 500)


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def caller_gone(deadline: float | None) -> ServingError:
    """The error of a request whose caller stopped waiting, for the counters (no one reads it):
    DEADLINE_EXCEEDED if its deadline (a time.monotonic() value) has passed, else CANCELLED. gRPC
    ends a call at its deadline a moment before this process's reading of it, hence the slack."""
    if deadline is not None and time.monotonic() >= deadline - 0.1:
        return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "The deadline passed before the model answered.")
    return ServingError(grpc.StatusCode.CANCELLED, "The caller cancelled the request.")


def from_tf_error(error: tf.errors.OpError) -> ServingError:
    """The ServingError for an error raised inside a model graph, with the graph's message
    (e.g. a tf.debugging assertion) but without TF's node and op-name decorations."""
    message = re.sub(r"\n\s*\[\[.*", "", error.message, flags=re.DOTALL)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return ServingError(_CODE_BY_NUMBER.get(error.error_code, grpc.StatusCode.UNKNOWN),
                        lines[-1] if lines else type(error).__name__)
