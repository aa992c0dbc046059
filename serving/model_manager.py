"""Finds, loads and retires the versions of one model under its base path.

The layout is TF Serving's: `<model_base_path>/<integer version>/saved_model.pb`. Only
directories with an integer name count (a pusher's `.tmp-3` staging directory is ignored), a
version without saved_model.pb is skipped until it has one, and a version that fails to load is
logged and retried as TF Serving retries it (up to `max_load_retries` more times,
`retry_interval_s` apart), then skipped until any of its files changes (a push whose
saved_model.pb landed before its variables is loaded once they are there). The version policy picks which of the
loadable versions to serve; new ones are loaded, and warmed up, before retired ones are dropped,
and a request keeps the Servable it started with, so no request is dropped by a reload.

Warm-up is TF Serving's: a version's `assets.extra/tf_serving_warmup_requests` (TFRecords of
PredictionLog protos; storygen's exporter writes one Predict request per signature) is replayed
through its signatures before the version takes traffic, so that no client pays a signature's
first call (TensorFlow optimises a function's graph then: seconds for a large model). A version
whose warm-up fails is not served, as one that fails to load.
"""

import contextlib
import dataclasses
import gc
import os
import sys
import threading
import time
import weakref

import grpc
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops that storygen's graphs use
from absl import logging
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.python.framework import ops
from tensorflow.python.eager import cancellation as tf_cancellation
from tensorflow.python.eager import context as tf_context
from tensorflow.python.eager.cancellation import CancellationManager
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from components import control_tags
from components.contract import WARMUP_FILE
from serving.errors import ServingError, failed_precondition, from_tf_error, invalid_argument, not_found

DEFAULT_SIGNATURE = "serving_default"
SAVED_MODEL_FILE = "saved_model.pb"
MAX_WARMUP_REQUESTS = 1000  # TF Serving's limit

State = ModelVersionStatus.State


# ---------------------------------------------------------------------------------- policy

@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which loadable versions to serve: the newest `count` ("latest[:N]"), "all", or
    "specific:1,2"."""

    kind: str
    count: int = 1
    versions: frozenset = frozenset()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", count=int(arg) if arg else 1)
                if policy.count >= 1:
                    return policy
            elif kind == "all" and not arg:
                return cls("all")
            elif kind == "specific" and arg:
                return cls("specific", versions=frozenset(int(v) for v in arg.split(",")))
        except ValueError:
            pass
        raise ValueError(f"Version policy '{text}' is not one of latest, latest:N, all or specific:V1,V2,...")

    def select(self, versions) -> set[int]:
        if self.kind == "all":
            return set(versions)
        if self.kind == "specific":
            return self.versions & set(versions)
        return set(sorted(versions)[-self.count:])


def parse_labels(text: str) -> dict[str, int]:
    """'stable:1,canary:2' -> {'stable': 1, 'canary': 2}."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, _, version = item.partition(":")
        if not label or not version.isdigit():
            raise ValueError(f"Version label '{item}' is not of the form label:version (e.g. stable:1).")
        labels[label] = int(version)
    return labels


# ---------------------------------------------------------------------------------- servables

def _is_batch_dim(shape: tf.TensorShape) -> bool:
    return shape.rank is not None and shape.rank >= 1 and shape[0] is None


class Signature:
    """One callable signature of a loaded version: its SignatureDef, the TensorSpecs of its
    inputs and outputs, and the function to run it."""

    def __init__(self, name: str, signature_def: meta_graph_pb2.SignatureDef, function):
        self.name = name
        self.signature_def = signature_def
        self._function = function
        self.inputs = {k: tf.TensorSpec(tf.TensorShape(v.tensor_shape), tf.as_dtype(v.dtype), k)
                       for k, v in signature_def.inputs.items()}
        self.outputs = {k: tf.TensorSpec(tf.TensorShape(v.tensor_shape), tf.as_dtype(v.dtype), k)
                        for k, v in signature_def.outputs.items()}
        # Inputs with a leading None dimension are concatenated when batching; the others
        # (scalar parameters) must be equal for requests to share a batch.
        self.batch_inputs = frozenset(k for k, spec in self.inputs.items() if _is_batch_dim(spec.shape))
        self.batchable = bool(self.batch_inputs) and all(_is_batch_dim(s.shape) for s in self.outputs.values())

    def input_dtype(self, name: str) -> tf.DType:
        if name not in self.inputs:
            raise invalid_argument(f"Signature '{self.name}' has no input '{name}'; its inputs are "
                                   f"{', '.join(sorted(self.inputs))}.")
        return self.inputs[name].dtype

    def __call__(self, inputs: dict, cancellation: CancellationManager | None = None) -> dict:
        """Runs the signature on numpy inputs; errors raised in the graph become ServingErrors.
        `cancellation.start_cancel()` from another thread stops the call (CANCELLED)."""
        tensors = {k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in inputs.items()}
        try:
            with _cancelled_by(cancellation):
                outputs = self._function(**tensors)
        except tf.errors.CancelledError:
            raise ServingError(grpc.StatusCode.CANCELLED, "The model call was cancelled: its callers had gone.") from None
        except tf.errors.OpError as e:
            raise from_tf_error(e) from None
        return {k: v.numpy() for k, v in outputs.items()}


# TensorFlow passes a function call the CancellationManager that its `cancellation` module's
# context() returns, which reads one process-wide global: two threads making cancellable calls at
# once would take each other's. The call reads it on the calling thread, so a per-thread one works.
_call_cancellation = threading.local()
tf_cancellation.context = lambda: getattr(_call_cancellation, "manager", None)


@contextlib.contextmanager
def _cancelled_by(manager: CancellationManager | None):
    _call_cancellation.manager = manager
    try:
        yield
    finally:
        _call_cancellation.manager = None


class Servable:
    """One loaded version of a model."""

    def __init__(self, name: str, version: int, loaded, meta_graph: meta_graph_pb2.MetaGraphDef):
        self.name = name
        self.version = version
        self._loaded = loaded  # keeps the graph's variables and resources alive
        # Only what can be called: the map in saved_model.pb also lists __saved_model_init_op.
        self.signatures = {key: Signature(key, meta_graph.signature_def[key], loaded.signatures[key])
                           for key in loaded.signatures if key in meta_graph.signature_def}
        self.signature_def_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in self.signatures.items():
            self.signature_def_map.signature_def[key].CopyFrom(signature.signature_def)
        self.control_tags = control_tags.of_model(loaded)  # what its prompts may start with

    def signature(self, name: str) -> Signature:
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:  # TF Serving's code for it: FAILED_PRECONDITION (HTTP 400)
            raise failed_precondition(f"Version {self.version} of model '{self.name}' has no signature '{name}'; it has "
                            f"{', '.join(sorted(self.signatures))}.")
        return self.signatures[name]


def load_servable(name: str, version: int, path: str, tags: tuple[str, ...] = ("serve",)) -> Servable:
    """Loads the SavedModel in `path`: its meta graph with all of `tags` (TF Serving's
    --saved_model_tags; "serve" by default)."""
    with tf.io.gfile.GFile(os.path.join(path, SAVED_MODEL_FILE), "rb") as f:
        saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    meta_graphs = [m for m in saved_model.meta_graphs if set(tags) <= set(m.meta_info_def.tags)]
    if not meta_graphs:
        raise ValueError(f"{path} has no meta graph tagged {','.join(tags)}")
    return Servable(name, version, _load_without_gradients(path, tags), meta_graphs[0])


def _load_without_gradients(path: str, tags: tuple[str, ...]):
    """tf.saved_model.load, minus the gradient functions it registers for the model's custom
    gradients. TensorFlow's registry is global and never forgets them, and they hold the loaded
    functions, so every version loaded stayed in memory (~80 MB per load of the tiny export);
    serving takes no gradients. Loads run one at a time (the poller's lock)."""
    registry = ops._gradient_registry._registry  # private: TensorFlow has no way to unregister
    before = set(registry)
    loaded = tf.saved_model.load(path, tags=list(tags))
    for gradient_name in set(registry) - before:
        del registry[gradient_name]
    return loaded


def in_low_priority_thread(function, *args):
    """function(*args) run in a thread at the lowest CPU priority, with the process's automatic
    garbage collection off meanwhile; then one full collection, in the caller's thread.

    So a load and warm-up yield the cores to requests. A load makes ~140k objects (the Python graphs
    of the tiny export's functions), all of them kept: each full collection that it set off scanned
    them and the served versions for nothing (2-3 a load, 0.13-0.2 s each, holding every request),
    and a collection run at the lowest priority on busy cores holds the requests longer still."""
    result, error = [], []

    def run():
        if sys.platform == "linux":  # where niceness is per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            result.append(function(*args))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    # Threads inherit their creator's niceness: TensorFlow's thread pools, which run every request's
    # ops, are made at its first op, and must not be made by the loader.
    tf_context.ensure_initialized()
    enabled = gc.isenabled()
    gc.disable()
    try:
        thread = threading.Thread(target=run, name="model-loader", daemon=True)
        thread.start()
        thread.join()
    finally:
        if enabled:
            gc.enable()
    gc.collect()
    if error:
        raise error[0]
    return result[0]


def warm_up(servable: Servable, path: str) -> int:
    """Replays the version's warm-up requests through its signatures; returns how many (0
    without a warm-up file). Raises what a request raised, or ValueError for a file TF Serving
    would refuse (more than MAX_WARMUP_REQUESTS records, or a log of another request type)."""
    warmup_path = os.path.join(path, WARMUP_FILE)
    if not tf.io.gfile.exists(warmup_path):
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(warmup_path):
        count += 1
        if count > MAX_WARMUP_REQUESTS:
            raise ValueError(f"{warmup_path} holds more than {MAX_WARMUP_REQUESTS} warm-up requests")
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{warmup_path}: record {count} is a {log.WhichOneof('log_type')}; storygen-serve "
                             "replays Predict requests (predict_log) only")
        request = log.predict_log.request
        servable.signature(request.model_spec.signature_name)(
            {name: tf.make_ndarray(tensor) for name, tensor in request.inputs.items()})
    return count


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    version: int
    state: int  # a ModelVersionStatus.State
    error: str = ""  # why it failed to load, if it did


# ---------------------------------------------------------------------------------- manager

class ModelManager:
    """Serves the versions of one model that `policy` selects among those under `base_path`."""

    def __init__(self, name: str, base_path: str, policy: VersionPolicy, labels: dict[str, int],
                 warmup: bool = True, max_load_retries: int = 5, retry_interval_s: float = 60.0,
                 tags: tuple[str, ...] = ("serve",)):
        self.name = name
        self.base_path = base_path
        self.policy = policy
        self.labels = labels
        self.warmup = warmup  # replay each version's warm-up requests before it takes traffic
        self.max_load_retries = max_load_retries
        self.retry_interval_s = retry_interval_s
        self.tags = tags  # of the meta graph to load
        self._lock = threading.Lock()
        self._servables: dict[int, Servable] = {}  # replaced, never mutated, so readers need no lock
        self._states: dict[int, VersionStatus] = {}
        self._failed: dict[int, FailedLoad] = {}
        self._retired: list[tuple[int, weakref.ref]] = []  # retired versions in-flight requests may still hold

    # ---- polling

    def poll(self) -> None:
        """Loads the versions the policy wants that are not loaded yet, then retires the rest."""
        self._free_released()
        try:
            on_disk = self._scan()
        except tf.errors.OpError as e:  # base path unreadable or gone: keep serving what is loaded
            logging.log_every_n_seconds(logging.WARNING, "Cannot list %s (%s); keeping the loaded versions.",
                                        60, self.base_path, e.message)
            return
        servables = dict(self._servables)
        while True:
            loadable = [v for v, path in on_disk.items() if self._may_load(v, path)]
            wanted = self.policy.select(loadable)
            missing = sorted(wanted - servables.keys(), reverse=True)
            if not missing:
                break
            for version in missing:  # a failure changes `loadable`, so select again afterwards
                servable = self._load(version, on_disk[version])
                if servable is not None:
                    servables[version] = servable
        retired = sorted(servables.keys() - wanted)
        self._retired += [(version, weakref.ref(servables.pop(version))) for version in retired]
        with self._lock:
            self._servables = servables
            for version in retired:
                self._states[version] = VersionStatus(version, State.END)
        for version in retired:
            logging.info("Unloaded version %d of model %s (in-flight requests finish on it).", version, self.name)
        self._free_released()

    def _free_released(self) -> None:
        """Frees the retired versions that no request holds any more. A loaded SavedModel is full of
        reference cycles, which only a full collection frees (0.4-0.5 s for the tiny export, holding every
        request): run once, at the first poll after its last request ended. Run at retirement, when
        requests still held it, it freed nothing, and the version stayed in memory until CPython's next
        automatic full collection, which waits until the objects created since the last one number a
        quarter of the long-lived ones (none had run 5 s after a swap under 8 clients)."""
        released = [version for version, servable in self._retired if servable() is None]
        if released:
            self._retired = [entry for entry in self._retired if entry[0] not in released]
            started = time.monotonic()
            gc.collect()
            logging.info("Freed version(s) %s of model %s in %.2f s", ", ".join(map(str, released)), self.name,
                         time.monotonic() - started)

    def _scan(self) -> dict[int, str]:
        """{version: path} of the complete version directories under the base path."""
        versions = {}
        for entry in tf.io.gfile.listdir(self.base_path):
            name = entry.rstrip("/")
            if not name.isdigit():
                continue  # e.g. a pusher's .tmp-3 staging directory
            path = os.path.join(self.base_path, name)
            if not tf.io.gfile.isdir(path):
                continue
            if not tf.io.gfile.exists(os.path.join(path, SAVED_MODEL_FILE)):
                logging.log_every_n_seconds(logging.WARNING, "Skipping %s: it has no %s (yet).", 60, path,
                                            SAVED_MODEL_FILE)
                continue
            versions[int(name)] = path
        return versions

    def _may_load(self, version: int, path: str) -> bool:
        """False for a version that failed to load, until a retry is due or one of its files changed."""
        failed = self._failed.get(version)
        if failed is None or failed.fingerprint != _fingerprint(path):
            return True
        return failed.attempts <= self.max_load_retries and time.monotonic() - failed.at >= self.retry_interval_s

    def _load(self, version: int, path: str):
        self._set_state(version, State.LOADING)
        logging.info("Loading version %d of model %s from %s", version, self.name, path)
        try:
            servable = in_low_priority_thread(self._load_and_warm_up, version, path)
        except Exception as e:  # any broken SavedModel or warm-up: log it, skip it, keep serving the others
            fingerprint = _fingerprint(path)
            previous = self._failed.get(version)
            attempts = previous.attempts + 1 if previous and previous.fingerprint == fingerprint else 1
            self._failed[version] = FailedLoad(fingerprint, attempts, time.monotonic())
            self._set_state(version, State.END, f"failed to load: {e}")
            retries_left = self.max_load_retries - attempts + 1
            logging.error("Version %d of model %s failed to load (%s); %s", version, self.name, e,
                          f"retrying in {self.retry_interval_s:g} s ({retries_left} retries left)" if retries_left > 0
                          else f"skipped until a file under {path} changes")
            return None
        self._failed.pop(version, None)
        self._set_state(version, State.AVAILABLE)
        logging.info("Version %d of model %s is available, signatures: %s", version, self.name,
                     ", ".join(sorted(servable.signatures)))
        return servable

    def _load_and_warm_up(self, version: int, path: str) -> Servable:
        servable = load_servable(self.name, version, path, self.tags)
        if self.warmup:
            started = time.monotonic()
            count = warm_up(servable, path)
            if count:
                logging.info("Warmed up version %d of model %s with %d requests in %.1f s", version, self.name,
                             count, time.monotonic() - started)
        return servable

    def _set_state(self, version: int, state: int, error: str = "") -> None:
        with self._lock:
            self._states[version] = VersionStatus(version, state, error)

    # ---- lookups

    def loaded_versions(self) -> list[int]:
        return sorted(self._servables)

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names: a version, a label, or else the newest loaded version."""
        self._check_name(name)
        servables = self._servables
        if label:
            version = self._label_version(label)
            if version not in servables:
                raise not_found(f"Label '{label}' of model '{name}' points to version {version}, which is not loaded.")
        if version is None:
            if not servables:
                raise not_found(f"Model '{name}' has no loaded version yet.")
            return servables[max(servables)]
        if version not in servables:
            raise not_found(f"Version {version} of model '{name}' is not loaded; loaded versions: "
                            f"{', '.join(map(str, sorted(servables))) or 'none'}.")
        return servables[version]

    def statuses(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        """The state of every version this server has seen, or of the one named."""
        self._check_name(name)
        if label:
            version = self._label_version(label)
        with self._lock:
            states = dict(self._states)
        if version is not None:
            if version not in states:
                raise not_found(f"Model '{name}' has no version {version}.")
            return [states[version]]
        if not states:
            raise not_found(f"Model '{name}' has no versions under {self.base_path} yet.")
        return [states[v] for v in sorted(states)]

    def _check_name(self, name: str) -> None:
        if name != self.name:
            raise not_found(f"Model '{name}' is not served here; this server serves '{self.name}'.")

    def _label_version(self, label: str) -> int:
        if label not in self.labels:  # TF Serving's code for it: INVALID_ARGUMENT
            raise invalid_argument(f"Model '{self.name}' has no version label '{label}'; labels: "
                            f"{', '.join(sorted(self.labels)) or 'none (see --version_labels)'}.")
        return self.labels[label]


@dataclasses.dataclass(frozen=True)
class FailedLoad:
    fingerprint: tuple  # the version's files when it failed
    attempts: int  # failed loads of these files
    at: float  # time.monotonic() of the last one


def _fingerprint(path: str) -> tuple:
    """The names, sizes and modification times of a version's files: changes when any file is
    added or rewritten, so a fixed or completed version is loaded again."""
    try:
        files = []
        for directory, _, names in tf.io.gfile.walk(path):
            for name in names:
                stat = tf.io.gfile.stat(os.path.join(directory, name))
                files.append((os.path.relpath(os.path.join(directory, name), path), stat.length, stat.mtime_nsec))
    except tf.errors.OpError:
        return ()
    return tuple(sorted(files))
