"""Dynamic batching: concurrent requests that can share a model call are merged along the batch
dimension, run once, and the outputs split back, as TF Serving's BasicBatchScheduler does.

Requests share a batch when they have the same key (the servable, the signature and the values
of every non-batch input, e.g. the scalar sampling parameters) and fit in `max_batch_size` rows.
A batch runs when it is full, when `batch_timeout_s` has passed since its first request, when
a newer batch with its key was opened, or at once when no batch is running: the model never idles
while a request waits, so a lone client pays no timeout, and requests that arrive while a batch
runs still gather into the next one. At most `max_enqueued_batches` batches wait; a
request that would need another one fails at once with RESOURCE_EXHAUSTED, so overload shows
up as fast rejections rather than growing latency. Batch inputs are concatenated as they are
(string[B] prompts need no padding), so the key must also hold their shapes apart from B.

Two rules keep batches large when clients send their next request as soon as they have an answer:
- The callers of a batch that just finished come back together, but milliseconds apart (each
  answer is encoded and sent, and each next request parsed, in turn). Until as many rows with its
  key have arrived as that batch answered, a batch with that key that is not full waits, for at
  most `RETURN_WINDOW` of the finished batch's run time. Without this the first caller back runs
  alone on the free batch thread, and the clients split into ever smaller groups that each keep a
  batch thread busy.
- A batch thread takes at most an equal share of the waiting and running rows per batch thread and
  leaves the rest to the next free one, so the threads run batches of equal size side by side.

A request whose deadline passes, or whose caller goes, stops waiting at once: if its batch has not
started it runs without it, and a running batch whose callers have all gone is cancelled, so no
model time is spent for callers that are no longer there.
"""

import collections
import math
import threading
import time

import grpc
import numpy as np
from absl import logging
from tensorflow.python.eager.cancellation import CancellationManager

from serving.errors import ServingError, caller_gone, invalid_argument


# The longest wait for a finished batch's callers to come back, as a fraction of its run time.
RETURN_WINDOW = 0.1


class _Task:
    """One request waiting for its share of a batch."""

    def __init__(self, inputs: dict, rows: int, deadline: float | None):
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.batch: "_Batch | None" = None  # the batch it waits in, set by _Batch.add
        self.done = threading.Event()  # set before its batch runs only if its caller stopped waiting
        self.outputs = None
        self.error = None

    def finish(self, outputs=None, error=None) -> None:
        if not self.done.is_set():  # the first answer stands (a caller gone, or the batch's)
            self.outputs, self.error = outputs, error
            self.done.set()


class _Batch:
    def __init__(self, key, run, batch_inputs: frozenset, created: float | None = None):
        self.key = key
        self.run = run  # run(inputs, cancellation)
        self.batch_inputs = batch_inputs
        self.tasks: list[_Task] = []
        self.rows = 0
        self.created = time.monotonic() if created is None else created
        self.cancellation = CancellationManager()  # cancelled when every caller of a running batch has gone

    def add(self, task: "_Task") -> None:
        task.batch = self
        self.tasks.append(task)
        self.rows += task.rows

    def split(self, rows: int) -> "_Batch":
        """Moves its first tasks to a new batch: at most `rows` rows, and at least one task."""
        first = _Batch(self.key, self.run, self.batch_inputs, self.created)
        while self.tasks and (not first.tasks or first.rows + self.tasks[0].rows <= rows):
            task = self.tasks.pop(0)
            self.rows -= task.rows
            first.add(task)
        return first


class _Returning:
    """The callers of the latest batches with one key, awaited until `until`."""

    def __init__(self):
        self.answered = 0  # rows
        self.returned = 0  # rows that arrived since
        self.until = 0.0

    def awaited(self, now: float) -> bool:
        return self.returned < self.answered and now < self.until


class Batcher:
    """Merges concurrent `submit` calls with equal keys into one `run` call per batch. With
    `allowed_batch_sizes`, a batch is padded (with copies of its first row) to the smallest allowed
    size that holds it, as TF Serving pads, so the model sees few distinct batch sizes."""

    def __init__(self, max_batch_size: int, batch_timeout_s: float, max_enqueued_batches: int,
                 num_batch_threads: int, allowed_batch_sizes: tuple[int, ...] = ()):
        if allowed_batch_sizes and (list(allowed_batch_sizes) != sorted(set(allowed_batch_sizes))
                                    or allowed_batch_sizes[-1] != max_batch_size):
            raise ValueError(f"allowed_batch_sizes {list(allowed_batch_sizes)} must increase and end with "
                             f"max_batch_size ({max_batch_size}).")
        self.allowed_batch_sizes = tuple(allowed_batch_sizes)
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self.max_enqueued_batches = max_enqueued_batches
        self._cond = threading.Condition()
        self._queue: collections.deque[_Batch] = collections.deque()  # oldest first
        self._open: dict = {}  # key -> the newest waiting batch with that key, which may still grow
        self._running = 0  # batches that batch threads are running
        self._running_rows = 0
        self._returning: dict = {}  # key -> _Returning, for the keys of batches that answered lately
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key, run, inputs: dict[str, np.ndarray], batch_inputs: frozenset,
               deadline: float | None = None, on_caller_gone=None) -> dict[str, np.ndarray]:
        """Runs `run(inputs, cancellation)` as part of a batch and returns this request's rows of the
        outputs.

        `key` must be hashable and equal only for requests that `run` can serve together;
        `batch_inputs` names the inputs to concatenate; `deadline` is a time.monotonic() value;
        `on_caller_gone(callback)` registers a callback for when the caller stops waiting, or returns
        False if it already has."""
        rows = len(inputs[next(iter(batch_inputs))])
        if rows > self.max_batch_size:
            raise invalid_argument(f"The request has {rows} rows, more than one batch holds "
                                   f"(--max_batch_size={self.max_batch_size}); split it.")
        with self._cond:
            if self._stopped:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down; retry on another one.")
            batch = self._open.get(key)
            if batch is None or batch.rows + rows > self.max_batch_size:
                if len(self._queue) >= self.max_enqueued_batches:
                    raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"The batching queue is full ({len(self._queue)} batches waiting); "
                                       "retry later.")
                batch = _Batch(key, run, batch_inputs)
                self._queue.append(batch)
                self._open[key] = batch
            task = _Task(inputs, rows, deadline)
            batch.add(task)
            if key in self._returning:
                self._returning[key].returned += rows
            if batch.rows == self.max_batch_size:
                del self._open[key]  # full: ready to run
            self._cond.notify()
        if on_caller_gone is not None and not on_caller_gone(lambda: self._abandon(task)):
            self._abandon(task)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not task.done.wait(timeout):
            self._abandon(task)
        if task.error is not None:
            raise task.error
        return task.outputs

    def stop(self) -> None:
        """Runs the batches still waiting, then stops the batch threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _abandon(self, task: _Task) -> None:
        """Answers `task` for a caller that stopped waiting, unless it has its answer; a batch that
        has not started runs without the task, and one that no caller waits for any more is cancelled."""
        with self._cond:
            if task.done.is_set():
                return
            task.finish(error=caller_gone(task.deadline))
            if all(t.done.is_set() for t in task.batch.tasks):
                task.batch.cancellation.start_cancel()

    # ---- batch threads

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_ready()
                while batch is None:
                    if self._stopped and not self._queue:
                        return
                    self._cond.wait(self._time_to_next_check())
                    batch = self._next_ready()
                batch = self._take(batch)
                self._running += 1
                self._running_rows += batch.rows
                if self._queue:
                    self._cond.notify()  # another thread must now watch the next batch
            started = time.monotonic()
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._running_rows -= batch.rows
                    self._expect_back(batch.key, batch.rows, time.monotonic() - started)
                    if self._queue:
                        self._cond.notify()  # with nothing running, the oldest waiting batch may go

    def _take(self, batch: _Batch) -> _Batch:
        """Takes `batch` from the queue, or its first tasks up to this thread's share of the rows
        (waiting and running, per batch thread); the rest then goes to the next free thread."""
        share = math.ceil((self._running_rows + sum(b.rows for b in self._queue)) / len(self._threads))
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]  # new requests start a new batch
        if batch.rows > share and len(batch.tasks) > 1:
            return batch.split(share)
        self._queue.remove(batch)
        return batch

    def _expect_back(self, key, rows: int, run_s: float) -> None:
        """Notes that a batch of `rows` rows with `key`, which ran for `run_s`, has answered its callers."""
        now = time.monotonic()
        self._returning = {k: r for k, r in self._returning.items() if r.awaited(now)}
        returning = self._returning.setdefault(key, _Returning())
        returning.answered += rows
        returning.until = max(returning.until, now + RETURN_WINDOW * run_s)

    def _next_ready(self):
        now = time.monotonic()
        for batch in self._queue:
            if self._open.get(batch.key) is not batch or self._stopped:
                return batch  # closed: no request can join it any more
            if self._awaiting_callers(batch.key, now):
                continue
            if self._running == 0 or now - batch.created >= self.batch_timeout_s:
                return batch  # nothing runs, so waiting for more would only add latency; or its timeout passed
        return None

    def _time_to_next_check(self):
        if not self._queue:
            return None
        now = time.monotonic()
        checks = [self._returning[b.key].until if self._awaiting_callers(b.key, now) else
                  b.created + self.batch_timeout_s for b in self._queue]
        return max(0.0, min(checks) - now)  # or sooner: each request that arrives notifies

    def _awaiting_callers(self, key, now: float) -> bool:
        returning = self._returning.get(key)
        return returning is not None and returning.awaited(now)

    def _run(self, batch: _Batch) -> None:
        now = time.monotonic()
        tasks = []
        for task in batch.tasks:
            if task.done.is_set():  # its caller has gone
                continue
            if task.deadline is not None and task.deadline <= now:
                task.finish(error=ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               "The deadline passed while the request waited for a batch."))
                continue
            tasks.append(task)
        if not tasks:
            return
        error = self._try(batch, tasks)
        if error is None:
            return
        if error.code == grpc.StatusCode.INVALID_ARGUMENT and len(tasks) > 1:
            # One bad request must not fail the requests it was merged with: run each alone.
            for task in tasks:
                task_error = self._try(batch, [task])
                if task_error is not None:
                    task.finish(error=task_error)
        else:
            for task in tasks:
                task.finish(error=error)

    def _try(self, batch: _Batch, tasks: list[_Task]):
        """Runs `tasks` as one model call and finishes them, or returns the ServingError instead."""
        try:
            self._run_tasks(batch, tasks)
        except ServingError as e:
            return e
        except Exception as e:  # a model bug must fail these requests, not kill the batch thread
            logging.exception("A batch of %d requests failed", len(tasks))
            return ServingError(grpc.StatusCode.INTERNAL, f"The model failed: {e}")
        return None

    def _run_tasks(self, batch: _Batch, tasks: list[_Task]) -> None:
        total = sum(t.rows for t in tasks)
        size = next((s for s in self.allowed_batch_sizes if s >= total), total)
        inputs = {name: _padded(np.concatenate([t.inputs[name] for t in tasks]), size)
                  if name in batch.batch_inputs else tasks[0].inputs[name]
                  for name in tasks[0].inputs}
        outputs = batch.run(inputs, batch.cancellation)
        outputs = {name: array[:total] if array.ndim and array.shape[0] == size else array
                   for name, array in outputs.items()}
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise ServingError(grpc.StatusCode.INTERNAL, f"Output '{name}' has shape {list(array.shape)}, not "
                                                              f"{total} rows, so it cannot be split per request.")
        offsets = np.cumsum([t.rows for t in tasks])[:-1]
        parts = {name: np.split(array, offsets) for name, array in outputs.items()}
        for i, task in enumerate(tasks):
            task.finish(outputs={name: pieces[i] for name, pieces in parts.items()})


def _padded(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with copies of its first row appended up to `rows` rows."""
    return array if len(array) == rows else np.concatenate([array, np.repeat(array[:1], rows - len(array), axis=0)])


# The batching flags of storygen-serve, which --batching_parameters_file replaces.
BATCHING_FLAGS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")

# TF Serving's BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto),
# the text proto of --batching_parameters_file; tensorflow-serving-api does not ship it. The fields
# storygen-serve honours, with TF Serving's names and numbers: (number, name, type).
_BATCHING_FIELDS = [(1, "max_batch_size", "Int64Value"), (2, "batch_timeout_micros", "Int64Value"),
                    (3, "max_enqueued_batches", "Int64Value"), (4, "num_batch_threads", "Int64Value"),
                    (5, "thread_pool_name", "StringValue"), (6, "allowed_batch_sizes", "repeated int64"),
                    (7, "pad_variable_length_inputs", "bool")]


def read_batching_parameters(path: str) -> dict:
    """The fields set in the BatchingParameters text file at `path`, as {name: value}; ValueError,
    naming the file, for one that does not parse (e.g. a field storygen-serve does not support)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
    from tensorflow.io import gfile

    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    proto = descriptor_pb2.FileDescriptorProto(name="storygen/batching_parameters.proto", package="tensorflow.serving",
                                               syntax="proto3", dependency=[wrappers_pb2.DESCRIPTOR.name])
    message = proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for number, name, kind in _BATCHING_FIELDS:
        if kind == "repeated int64":
            message.field.add(name=name, number=number, label=field.LABEL_REPEATED, type=field.TYPE_INT64)
        elif kind == "bool":
            message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
        else:
            message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
                              type_name=f".google.protobuf.{kind}")
    pool.Add(proto)
    parameters = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))()
    with gfile.GFile(path) as f:
        text = f.read()
    try:
        text_format.Parse(text, parameters)
    except text_format.ParseError as e:
        raise ValueError(f"--batching_parameters_file {path}: {e} (storygen-serve reads "
                         f"{', '.join(name for _, name, _ in _BATCHING_FIELDS)})") from None
    values = {}
    for descriptor, value in parameters.ListFields():
        values[descriptor.name] = (tuple(value) if descriptor.name == "allowed_batch_sizes"
                                   else value.value if descriptor.message_type else value)
    return values
