"""The README's commands are the ones CI runs, and docstring examples run."""

import configparser
import doctest
import importlib
import os
import re
import sys

import pytest

from conftest import REPO

# Every module of these packages whose source holds a `>>>` example has its doctests run.
DOCTEST_PACKAGES = ("components", "pipeline", "serving", "benchmarks")
sys.path.insert(0, REPO)  # benchmarks/ is not an installed package


def readme_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    test_command = [block.strip() for block in readme_commands() if "pytest" in block][0]
    assert test_command in ci


def modules_with_examples():
    """Dotted names of the modules under DOCTEST_PACKAGES whose source has a `>>>` line, found
    by reading the files (importing every module would run import-time side effects such as
    absl flag definitions, and a new module needs no entry here)."""
    found = []
    for package in DOCTEST_PACKAGES:
        for folder, subfolders, files in os.walk(os.path.join(REPO, package)):
            subfolders[:] = sorted(d for d in subfolders if os.path.exists(os.path.join(folder, d, "__init__.py")))
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    if not re.search(r"^\s*>>> ", f.read(), re.M):
                        continue
                parts = os.path.relpath(os.path.join(folder, name[:-3]), REPO).split(os.sep)
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def optional_dependencies():
    """Top-level names of the extras in setup.cfg other than dev (torch, for the benchmarks)."""
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    extras = config["options.extras_require"]
    return {re.match(r"[A-Za-z0-9_.-]+", line).group().replace("-", "_")
            for key in extras if key != "dev" for line in extras[key].splitlines() if line.strip()}


MODULES_WITH_EXAMPLES = modules_with_examples()


def test_doctests_are_found():
    # These have examples; if discovery lost them, test_docstring_examples would pass vacuously.
    assert {"components.ingest", "components.layers", "components.model.transformer", "components.model.internals",
            "components.validate"} <= set(MODULES_WITH_EXAMPLES)


@pytest.mark.parametrize("module", MODULES_WITH_EXAMPLES)
def test_docstring_examples(module):
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in optional_dependencies():
            pytest.skip(f"{module} needs the optional {e.name}")
        raise
    result = doctest.testmod(imported)
    # attempted > 0: a `>>>` line that doctest does not collect (outside any docstring it finds) is a mistake too.
    assert result.attempted > 0 and result.failed == 0, result
