"""The Predict path that gRPC and REST share: find the signature a request names, check its
inputs against the signature and the server's limits, and run it, batched when possible.

Every check here turns a request the model cannot or must not run into INVALID_ARGUMENT with
one sentence naming the input, before any model time is spent on it.
"""

import dataclasses
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from tensorflow.python.eager.cancellation import CancellationManager

from serving.batching import Batcher
from serving.errors import ServingError, caller_gone, invalid_argument
from serving.model_manager import Servable, Signature
from serving.models import Models
from serving.stats import Stats


@dataclasses.dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int  # per string element of any string input
    max_request_batch_size: int  # rows per request
    max_new_tokens_limit: int  # for signatures with a max_new_tokens input


class Predictor:
    def __init__(self, models: Models, limits: Limits, stats: Stats, batcher: Batcher | None = None):
        self.models = models
        self.limits = limits
        self.stats = stats
        self.batcher = batcher

    def find(self, name: str, version: int | None, label: str | None,
             signature_name: str) -> tuple[Servable, Signature]:
        servable = self.models.resolve(name, version, label)
        return servable, servable.signature(signature_name)

    def predict(self, servable: Servable, signature: Signature, inputs: dict[str, np.ndarray],
                output_filter=(), deadline: float | None = None,
                on_caller_gone: Callable[[Callable[[], None]], bool] | None = None) -> dict[str, np.ndarray]:
        """The outputs of `signature` for `inputs` (only those in `output_filter`, if given).

        `deadline` is a time.monotonic() value: past it the request fails with DEADLINE_EXCEEDED
        and no model time is spent on it any more (a call it alone waits for is cancelled).
        `on_caller_gone(callback)` registers a callback for when the caller stops waiting, or returns
        False if it already has (gRPC's `context.add_callback`); its request is then dropped, or its
        call cancelled, the same way."""
        self.check(signature, inputs)
        for name in output_filter:
            if name not in signature.outputs:
                raise invalid_argument(f"output_filter names '{name}', which signature '{signature.name}' does not "
                                       f"have; its outputs are {', '.join(sorted(signature.outputs))}.")
        _check_deadline(deadline, "before the request started")

        def run(batch_inputs, cancellation=None):
            outputs = signature(batch_inputs, cancellation)
            self.stats.record_model_call(_rows(signature, batch_inputs))
            return outputs

        if self.batcher is not None and signature.batchable:
            # Requests can share a call if their non-batch inputs (e.g. sampling parameters) are equal
            # and their batch inputs differ only in the number of rows.
            key = (servable, signature.name) + tuple(
                (name, array.shape[1:]) if name in signature.batch_inputs else (name, tuple(array.ravel().tolist()))
                for name, array in sorted(inputs.items()))
            outputs = self.batcher.submit(key, run, inputs, signature.batch_inputs, deadline, on_caller_gone)
        else:
            outputs = _run_cancellable(run, inputs, deadline, on_caller_gone)
        if output_filter:
            outputs = {name: outputs[name] for name in output_filter}
        return outputs

    def check(self, signature: Signature, inputs: dict[str, np.ndarray]) -> None:
        """Raises INVALID_ARGUMENT unless `inputs` are what `signature` takes, within the limits."""
        for name in inputs:
            signature.input_dtype(name)  # rejects inputs the signature does not have
        missing = sorted(signature.inputs.keys() - inputs.keys())
        if missing:
            raise invalid_argument(f"Signature '{signature.name}' needs input(s) {', '.join(missing)}, which the "
                                   f"request lacks.")
        for name, array in inputs.items():
            spec = signature.inputs[name]
            if not spec.shape.is_compatible_with(array.shape):
                hint = (" Scalars cannot be sent in the row (\"instances\") format; use \"inputs\"."
                        if spec.shape.rank == 0 else "")
                raise invalid_argument(f"Input '{name}' has shape {list(array.shape)} but signature "
                                       f"'{signature.name}' expects {_shape_text(spec.shape)}.{hint}")
            if array.dtype == object:
                self._check_text(name, array)
        if signature.batch_inputs:
            rows = {name: len(inputs[name]) for name in signature.batch_inputs}
            if len(set(rows.values())) > 1:
                raise invalid_argument(f"The batch inputs disagree on the number of rows: {rows}.")
            count = next(iter(rows.values()))
            if count == 0:
                raise invalid_argument("The request is an empty batch; send at least one row.")
            if count > self.limits.max_request_batch_size:
                raise invalid_argument(f"The request has {count} rows, more than this server accepts in one request "
                                       f"({self.limits.max_request_batch_size}); split it.")
        if "max_new_tokens" in inputs and signature.inputs["max_new_tokens"].shape.rank == 0:
            value = int(inputs["max_new_tokens"])
            if not 1 <= value <= self.limits.max_new_tokens_limit:
                raise invalid_argument(f"max_new_tokens is {value} but must be between 1 and "
                                       f"{self.limits.max_new_tokens_limit} on this server.")

    def _check_text(self, name: str, array: np.ndarray) -> None:
        """String inputs are text: each element valid UTF-8 and within --max_prompt_bytes."""
        for i, value in enumerate(array.ravel()):
            if len(value) > self.limits.max_prompt_bytes:
                raise invalid_argument(f"Input '{name}' element {i} is {len(value)} bytes long, over this server's "
                                       f"limit of {self.limits.max_prompt_bytes} bytes.")
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid_argument(f"Input '{name}' element {i} is not valid UTF-8 text.") from None


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The deadline passed {when}.")


def _run_cancellable(run, inputs: dict[str, np.ndarray], deadline: float | None, on_caller_gone) -> dict:
    """`run(inputs)`, cancelled at `deadline` or when the caller goes."""
    cancellation = CancellationManager()
    timer = None
    if deadline is not None:
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), cancellation.start_cancel)
        timer.start()
    if on_caller_gone is not None and not on_caller_gone(cancellation.start_cancel):
        cancellation.start_cancel()  # gone already: the call fails at once
    try:
        return run(inputs, cancellation)
    except ServingError as e:
        if e.code == grpc.StatusCode.CANCELLED:  # by the timer or the caller's going
            raise caller_gone(deadline) from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _rows(signature: Signature, inputs: dict[str, np.ndarray]) -> int:
    return len(inputs[next(iter(signature.batch_inputs))]) if signature.batch_inputs else 1


def _shape_text(shape) -> str:
    if shape.rank is None:
        return "any shape"
    return "a scalar" if shape.rank == 0 else str([d if d is not None else "?" for d in shape.as_list()])
