"""The suite's two workers (tests/conftest.py): a module's tests run in one worker, and a test
marked `alone` runs beside no other test."""

import os
import subprocess
import sys

from conftest import REPO

# A conftest that uses the suite's hooks, and two modules (so two groups, one per worker).
CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {os.path.join(REPO, "tests", "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_collection_modifyitems = suite.pytest_collection_modifyitems
pytest_runtest_protocol = suite.pytest_runtest_protocol
pytest_sessionfinish = suite.pytest_sessionfinish
"""
RECORD = """
import os, time
import pytest

def spend(name, seconds):
    start = time.time()
    time.sleep(seconds)
    with open(os.environ["INTERVALS"], "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']} {start} {time.time()}\\n")
"""
FIRST_MODULE = RECORD + """
def test_first():
    spend("first", 1.0)

@pytest.mark.alone
def test_alone():
    spend("alone", 1.0)
"""
# Longer than the first module, so that without the lock some of it would run while `alone` does.
SECOND_MODULE = RECORD + "".join(f"\ndef test_{k}():\n    spend('{k}', 0.3)\n" for k in range(10))


def test_each_module_runs_in_one_worker_and_an_alone_test_beside_no_other(tmp_path):
    for name, text in [("conftest.py", CONFTEST), ("one_test.py", FIRST_MODULE), ("two_test.py", SECOND_MODULE),
                       ("pytest.ini", "[pytest]\npython_files = *_test.py\nmarkers =\n    alone: alone\n")]:
        (tmp_path / name).write_text(text)
    intervals, temp = tmp_path / "intervals.txt", tmp_path / "temp"  # the workers' lock files go in temp
    temp.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                             str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, INTERVALS=str(intervals), PYTHONPATH=REPO, TMPDIR=str(temp)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers, spans = {}, {}
    for line in intervals.read_text().splitlines():
        name, worker, start, end = line.split()
        workers[name], spans[name] = worker, (float(start), float(end))
    assert len(spans) == 12
    second = [str(k) for k in range(10)]
    assert workers["first"] == workers["alone"] != workers["0"] and {workers[name] for name in second} == {workers["0"]}

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert not any(overlap("alone", name) for name in second), spans
    assert [name for name in os.listdir(temp) if name.startswith("storygen-tests-")] == []  # removed at the end
