"""The suite's two workers (tests/conftest.py): a test marked `alone` runs beside no other test,
while the others run side by side."""

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
        f.write(f"{name} {start} {time.time()}\\n")
"""
FIRST_MODULE = RECORD + """
def test_first():
    spend("first", 1.0)

@pytest.mark.alone
def test_alone():
    spend("alone", 1.0)
"""
SECOND_MODULE = RECORD + "".join(f"\ndef test_{k}():\n    spend('{k}', 0.4)\n" for k in range(8))


def test_an_alone_test_overlaps_no_other_and_the_others_overlap(tmp_path):
    for name, text in [("conftest.py", CONFTEST), ("one_test.py", FIRST_MODULE), ("two_test.py", SECOND_MODULE),
                       ("pytest.ini", "[pytest]\npython_files = *_test.py\nmarkers =\n    alone: alone\n")]:
        (tmp_path / name).write_text(text)
    intervals, temp = tmp_path / "intervals.txt", tmp_path / "temp"  # the workers' lock files go in temp
    temp.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                             str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, INTERVALS=str(intervals), PYTHONPATH=REPO, TMPDIR=str(temp)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spans = {name: (float(start), float(end))
             for name, start, end in (line.split() for line in intervals.read_text().splitlines())}
    assert len(spans) == 10

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert not any(overlap("alone", name) for name in spans if name != "alone"), spans
    assert any(overlap("first", str(k)) for k in range(8)), spans  # two workers did run at once
    assert [name for name in os.listdir(temp) if name.startswith("storygen-tests-")] == []  # removed at the end
