"""The README's commands are the ones CI runs, and docstring examples run."""

import doctest
import importlib
import os
import re

import pytest

from conftest import REPO


def readme_commands():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    test_command = [block.strip() for block in readme_commands() if "pytest" in block][0]
    assert test_command in ci


@pytest.mark.parametrize("module", ["components.ingest", "components.layers", "components.model", "components.validate"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
