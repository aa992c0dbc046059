"""Pushes an exported SavedModel to `<serving_model_dir>/<model_name>/<version>/`.

Versions are consecutive integers, as TF Serving expects. The copy is written under a
hidden temporary name in the same directory and then renamed, so a version directory is
either complete or absent: a server polling the base path never sees half a model.
"""

import os
import shutil

from components.config import PushConfig


def versions(model_base_path: str) -> list[int]:
    """The complete versions under a model base path, oldest first."""
    if not os.path.isdir(model_base_path):
        return []
    return sorted(int(name) for name in os.listdir(model_base_path) if name.isdigit())


def newest_version(model_base_path: str) -> str | None:
    """The newest version's folder under a model base path, or None when there is none."""
    pushed = versions(model_base_path)
    return os.path.join(model_base_path, str(pushed[-1])) if pushed else None


def push_if_blessed(saved_model_path: str, blessing: dict, config: PushConfig) -> dict:
    """The pusher step: pushes a blessed model (any model with `config.force_push`); returns
    {"pushed", and "version" and "path", or the "reason" it was not pushed}."""
    if blessing["blessed"] or config.force_push:
        return {"pushed": True, **push(saved_model_path, config.serving_model_dir, config.model_name)}
    return {"pushed": False, "reason": blessing["reason"]}


def describe(metrics: dict) -> str:
    """The pipeline's one-line summary of the pusher step."""
    return (f"pushed version {metrics['version']} to {metrics['path']}" if metrics["pushed"]
            else f"not pushed: {metrics['reason']}")


def push(saved_model_path: str, serving_model_dir: str, model_name: str) -> dict:
    """Copies the SavedModel to the next version and returns {"version", "path"}."""
    base = os.path.join(serving_model_dir, model_name)
    os.makedirs(base, exist_ok=True)
    while True:
        version = (versions(base) or [0])[-1] + 1
        staging = os.path.join(base, f".tmp-{version}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(saved_model_path, staging)
        target = os.path.join(base, str(version))
        try:
            os.rename(staging, target)  # atomic; fails if another push took this version
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.isdir(target):
                continue
            raise
        return {"version": version, "path": target}
