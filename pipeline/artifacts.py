"""Artifact folders, manifests and caching for pipeline steps.

Every step of a run writes into `<pipeline_root>/<run_id>/<step>/` and finishes by writing
`manifest.json` there (inputs and their fingerprints, parameters, outputs, metrics, wall
time, library versions). A step is built in a hidden `.<step>.partial` folder and renamed
into place only when it succeeded, so a folder with a manifest is always complete.

A step is skipped when its folder in this run is already complete (resuming a crashed run),
or copied from another run whose manifest has the same cache key: the same step, code,
parameters and input fingerprints (as TFX's caching does). A step that was killed or
interrupted, in this run or another, is resumed from what it left when it runs again with the
same cache key. A step that failed with an error leaves nothing: a rerun would fail the same way.
"""

import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time

from components.config import cache_key

MANIFEST = "manifest.json"
LIBRARIES = ("tensorflow", "tensorflow-text", "keras", "keras-hub", "sentencepiece", "storygen")
CODE_DIRS = ("components", "pipeline", "schemas")


def fingerprint(path: str) -> str:
    """sha256 over a folder's relative paths and contents (manifests excluded), or a file's name
    and contents: a reader goes by the name (the same bytes as .jsonl and .txt are other stories)."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names if name not in (MANIFEST, ".cache_key"))
    for file in files:
        digest.update((os.path.basename(file) if file == path else os.path.relpath(file, path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def code_fingerprint() -> str:
    """Fingerprint of storygen's own code: a code change invalidates cached steps."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for pattern in CODE_DIRS:
        for file in sorted(glob.glob(os.path.join(root, pattern, "**", "*.p*"), recursive=True)):
            with open(file, "rb") as f:
                digest.update(file[len(root):].encode() + f.read())
    return digest.hexdigest()


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Stopped(Exception):
    """Raised by `PipelineRun.step` after the step the run was told to stop after (`--stop_after`);
    `manifest` is that step's."""

    def __init__(self, manifest: dict):
        super().__init__(manifest["step"])
        self.manifest = manifest


class PipelineRun:
    """One run's folder; `step()` runs, resumes or reuses a step and writes its manifest."""

    def __init__(self, pipeline_root: str, run_id: str, use_cache: bool = True, stop_after: str | None = None):
        self.pipeline_root = pipeline_root
        self.run_id = run_id
        self.dir = os.path.join(pipeline_root, run_id)
        self.use_cache = use_cache
        self.stop_after = stop_after
        self._code = code_fingerprint()
        os.makedirs(self.dir, exist_ok=True)

    def step(self, name: str, fn, *, inputs: dict, parameters, describe, cacheable: bool = True) -> dict:
        """Runs `fn(output_dir) -> metrics` unless a complete equal step exists; returns the manifest,
        or raises Stopped with it when the run stops after this step.

        inputs: {input name: path}, fingerprinted; parameters: the step's config (or a tuple of
        configs): the fields that change the output are its cache key (`config.cache_key`);
        describe: metrics -> the progress line's text.
        """
        manifest = self._step(name, fn, inputs, parameters, describe, cacheable)
        if name == self.stop_after:
            print(f"[pipeline] stopped after the {name} step (--stop_after): {manifest['outputs']['path']}", flush=True)
            raise Stopped(manifest)
        return manifest

    def _step(self, name, fn, inputs, parameters, describe, cacheable):
        start = time.time()
        parameters = _parameters(parameters)
        inputs = {key: {"path": path, "fingerprint": _input_fingerprint(path)} for key, path in inputs.items()}
        cache_key = hashlib.sha256(json.dumps(
            [name, self._code, parameters, {k: v["fingerprint"] for k, v in inputs.items()}],
            sort_keys=True, default=str).encode()).hexdigest()
        final = os.path.join(self.dir, name)
        if cacheable and self.use_cache:
            manifest = self._reusable(name, final, cache_key)
            if manifest is not None:
                print(f"[{name}] reused {manifest['reused_from']}: {describe(manifest['metrics'])}", flush=True)
                return manifest
        partial = os.path.join(self.dir, f".{name}.partial")
        shutil.rmtree(final, ignore_errors=True)
        # A crashed attempt with the same cache key, in this run or another, left state to resume
        # from (the trainer's checkpoints); one with other inputs or parameters left only stale files.
        key_file = os.path.join(partial, ".cache_key")
        if _read_text(key_file) != cache_key:
            shutil.rmtree(partial, ignore_errors=True)
            crashed = self._crashed_attempt(name, cache_key) if self.use_cache else None
            if crashed:
                os.rename(crashed, partial)
                print(f"[{name}] resuming what run {os.path.basename(os.path.dirname(crashed))} left when it was "
                      "stopped (the same step, code, parameters and inputs)", flush=True)
            else:
                os.makedirs(partial)
                with open(key_file, "w") as f:
                    f.write(cache_key)
        print(f"[{name}] running ...", flush=True)
        try:
            metrics = fn(partial)
        except Exception:  # not KeyboardInterrupt: an interrupted step keeps its folder, to be resumed
            shutil.rmtree(partial, ignore_errors=True)
            raise
        manifest = {
            "step": name, "run_id": self.run_id, "cache_key": cache_key,
            "inputs": inputs, "parameters": parameters,
            "outputs": {"path": final, "files": sorted(f for f in os.listdir(partial) if f != ".cache_key"),
                        "fingerprint": fingerprint(partial)},
            "metrics": metrics, "wall_time_seconds": time.time() - start,
            "library_versions": library_versions(), "reused_from": None,
        }
        os.remove(key_file)
        _write_json(os.path.join(partial, MANIFEST), manifest)
        os.rename(partial, final)
        print(f"[{name}] {describe(metrics)} ({manifest['wall_time_seconds']:.1f}s)", flush=True)
        return manifest

    def _crashed_attempt(self, name, cache_key):
        """The newest folder of this step that a killed or interrupted run left, with the same cache key."""
        folders = glob.glob(os.path.join(self.pipeline_root, "*", f".{name}.partial"))
        for folder in sorted(folders, key=os.path.getmtime, reverse=True):
            if _read_text(os.path.join(folder, ".cache_key")) == cache_key:
                return folder
        return None

    def _reusable(self, name, final, cache_key):
        """A complete earlier result of this step with the same cache key, copied into this run."""
        candidates = [final] + sorted(glob.glob(os.path.join(self.pipeline_root, "*", name)), key=os.path.getmtime,
                                      reverse=True)
        for folder in candidates:
            manifest = _read_manifest(folder)
            if manifest is None or manifest["cache_key"] != cache_key:
                continue
            if folder != final:
                partial = os.path.join(self.dir, f".{name}.partial")
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(folder, partial)
                manifest = dict(manifest, run_id=self.run_id, reused_from=folder,
                                outputs=dict(manifest["outputs"], path=final))
                _write_json(os.path.join(partial, MANIFEST), manifest)
                shutil.rmtree(final, ignore_errors=True)
                os.rename(partial, final)
            else:
                manifest["reused_from"] = manifest["reused_from"] or folder
            return manifest
        return None


def _parameters(configs) -> dict:
    """A step's configs as {config class name: its cache-key fields}."""
    configs = configs if isinstance(configs, tuple) else (configs,)
    return {type(c).__name__: cache_key(c) for c in configs}


def _input_fingerprint(path: str) -> str:
    """Step folders carry their fingerprint in the manifest; other paths are hashed, and a
    spec that is not a path (such as builtin:fairy_tales) stands for itself."""
    manifest = _read_manifest(path)
    if manifest is not None:
        return manifest["outputs"]["fingerprint"]
    matches = sorted(glob.glob(path)) if not os.path.exists(path) else [path]
    if not matches:
        return hashlib.sha256(path.encode()).hexdigest()
    return hashlib.sha256("".join(fingerprint(p) for p in matches).encode()).hexdigest()


def _read_manifest(folder):
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False, default=str)
