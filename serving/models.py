"""The models a server serves, one ModelManager each: the one model of --model_name and
--model_base_path, or those of a TF Serving ModelServerConfig text file (--model_config_file):

    model_config_list {
      config { name: "stories" base_path: "/models/stories" model_platform: "tensorflow"
               model_version_policy { specific { versions: 1 versions: 2 } }
               version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 } }
      config { name: "fables" base_path: "/models/fables" }
    }

The file is read again every --model_config_file_poll_wait_seconds, and HandleReloadConfigRequest
replaces it: a model added is loaded, a model removed is unloaded (its in-flight requests finish),
and a changed version policy or label applies at the next look at the versions.
"""

import dataclasses
import threading
import time

import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.errors import not_found
from serving.model_manager import ModelManager, Servable, VersionPolicy, VersionStatus


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    base_path: str
    policy: VersionPolicy
    labels: dict[str, int]


def read_model_config(path: str) -> list[ModelSpec]:
    """The models of the ModelServerConfig text file at `path`; ValueError, naming the file,
    for one that does not parse or asks for what storygen-serve does not do."""
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return specs_from_config(text_format.Parse(text, model_server_config_pb2.ModelServerConfig()))
    except (text_format.ParseError, ValueError) as e:
        raise ValueError(f"--model_config_file {path}: {e}") from None


def specs_from_config(config: model_server_config_pb2.ModelServerConfig) -> list[ModelSpec]:
    if config.HasField("custom_model_config"):
        raise ValueError("custom_model_config is not supported; list the models in model_config_list.")
    specs = []
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ValueError(f"every model needs a name and a base_path; got name '{model.name}', "
                             f"base_path '{model.base_path}'.")
        if model.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model '{model.name}' has model_platform '{model.model_platform}'; storygen-serve "
                             "serves TensorFlow SavedModels (\"tensorflow\").")
        if model.HasField("logging_config"):
            raise ValueError(f"model '{model.name}' has a logging_config; storygen-serve does not log requests.")
        specs.append(ModelSpec(model.name, model.base_path, _policy(model.model_version_policy),
                               dict(model.version_labels)))
    names = [spec.name for spec in specs]
    if not names:
        raise ValueError("model_config_list names no model.")
    if len(set(names)) < len(names):
        raise ValueError(f"model names must differ; got {', '.join(names)}.")
    return specs


def _policy(proto) -> VersionPolicy:
    kind = proto.WhichOneof("policy_choice")
    if kind == "all":
        return VersionPolicy("all")
    if kind == "specific":
        if not proto.specific.versions:
            raise ValueError("a specific version policy needs at least one version.")
        return VersionPolicy("specific", versions=frozenset(proto.specific.versions))
    count = proto.latest.num_versions if kind == "latest" else 0
    return VersionPolicy("latest", count=count or 1)  # TF Serving's default: the newest version


class Models:
    """The ModelManagers of the models in `specs`, found by name; `manager_options` are
    ModelManager's keyword arguments (warm-up, load retries, tags) for every model."""

    def __init__(self, specs: list[ModelSpec], **manager_options):
        self._manager_options = manager_options
        self._managers: dict[str, ModelManager] = {}  # replaced, never mutated, so readers need no lock
        self._specs: list[ModelSpec] = []  # what the managers serve
        self._lock = threading.Lock()  # one apply or poll at a time
        self._stop = threading.Event()
        self._thread = None
        self.apply(specs)

    def apply(self, specs: list[ModelSpec]) -> None:
        """Serves exactly `specs` from now on; the versions are loaded or retired by `poll`."""
        with self._lock:
            managers = {}
            for spec in specs:
                manager = self._managers.get(spec.name)
                if manager is None or manager.base_path != spec.base_path:
                    manager = ModelManager(spec.name, spec.base_path, spec.policy, spec.labels,
                                           **self._manager_options)
                manager.policy, manager.labels = spec.policy, spec.labels
                managers[spec.name] = manager
            for name in self._managers.keys() - managers.keys():
                logging.info("Model %s is no longer configured: unloaded (in-flight requests finish on it).", name)
            self._managers, self._specs = managers, list(specs)

    def poll(self) -> None:
        """Loads and retires the versions of every model (see ModelManager.poll)."""
        with self._lock:
            for manager in self._managers.values():
                manager.poll()

    def start_polling(self, interval_s: float, config_file: str | None = None, config_interval_s: float = 0) -> None:
        """Polls the versions every `interval_s` seconds (0: never again) and re-reads
        `config_file` every `config_interval_s` seconds (0: never), in a background thread."""
        if interval_s <= 0 and not (config_file and config_interval_s > 0):
            return
        self._thread = threading.Thread(target=self._poll_loop, args=(interval_s, config_file, config_interval_s),
                                        name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _poll_loop(self, interval_s: float, config_file: str | None, config_interval_s: float) -> None:
        tick = min(period for period in (interval_s, config_interval_s if config_file else 0) if period > 0)
        last_versions = last_config = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                config_changed = False
                if config_file and config_interval_s > 0 and now - last_config >= config_interval_s:
                    last_config = now
                    config_changed = self._reread(config_file)
                if config_changed or interval_s > 0 and now - last_versions >= interval_s:
                    last_versions = now
                    self.poll()
            except Exception:  # a transient file-system error must not end hot reloading
                logging.exception("Polling the models failed; will retry.")

    def _reread(self, config_file: str) -> bool:
        """Applies the config file if it changed (True), keeping the last good one if it is broken."""
        try:
            specs = read_model_config(config_file)
        except (ValueError, tf.errors.OpError) as e:
            logging.log_every_n_seconds(logging.ERROR, "%s; keeping the models already configured.", 60, e)
            return False
        if specs == self._specs:
            return False
        logging.info("%s changed: now serving %s.", config_file, ", ".join(s.name for s in specs) or "no model")
        self.apply(specs)
        return True

    # ---- lookups

    def names(self) -> list[str]:
        return sorted(self._managers)

    def loaded_versions(self) -> dict[str, list[int]]:
        return {name: manager.loaded_versions() for name, manager in sorted(self._managers.items())}

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        return self._manager(name).resolve(name, version, label)

    def statuses(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        return self._manager(name).statuses(name, version, label)

    def _manager(self, name: str) -> ModelManager:
        manager = self._managers.get(name)
        if manager is None:
            raise not_found(f"Model '{name}' is not served here; this server serves "
                            f"{', '.join(repr(n) for n in self.names()) or 'no model'}.")
        return manager
