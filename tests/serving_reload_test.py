"""Versions: which directories count, version policies, labels, failed loads, warm-up,
retiring (the ModelManager in-process), then hot reload in a real server while 8 clients keep
asking: no request fails and the new version answers within two poll intervals."""

import gc
import os
import shutil
import sys
import threading
import time
import types
import weakref

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_status_pb2

from serving.errors import ServingError
from serving.model_manager import ModelManager, VersionPolicy, in_low_priority_thread
from serving_fixtures import (AVAILABLE, ServerProcess, clients_running, expected_story, predict_request,
                              publish_version, rest_story, stage_broken_version, stage_version, stories,
                              write_warmup_requests)

END = get_model_status_pb2.ModelVersionStatus.END
LOADING = get_model_status_pb2.ModelVersionStatus.LOADING
POLL_S = 1.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved stub models for versions 1-3, copied into each test's base path by `add`."""
    store = str(tmp_path_factory.mktemp("saved_versions"))
    return {v: stage_version(store, v) for v in (1, 2, 3)}


@pytest.fixture
def base(tmp_path, saved):
    """An empty model base path, and `add(version)` to push a saved version into it atomically."""
    path = str(tmp_path / "storygen")
    os.makedirs(path)

    def add(version):
        staging = os.path.join(path, f".tmp-{version}")
        shutil.copytree(saved[version], staging)
        return publish_version(staging, version)

    return path, add


def manager(path, policy="latest", labels=None, warmup=True):
    return ModelManager("storygen", path, VersionPolicy.parse(policy), labels or {}, warmup=warmup)


def call(servable, prompt="p"):
    return servable.signature("")({"prompt": [prompt.encode()]})["story"][0].decode()


def test_only_complete_integer_named_versions_are_loaded(base, saved):
    path, add = base
    add(1)
    add(2)
    shutil.copytree(saved[3], os.path.join(path, ".tmp-3"))  # a push in progress
    os.makedirs(os.path.join(path, "4", "variables"))  # a version without saved_model.pb (yet)
    shutil.copytree(saved[3], os.path.join(path, "backup"))  # not an integer name
    models = manager(path)
    models.poll()
    assert models.loaded_versions() == [2]
    assert call(models.resolve("storygen")) == expected_story("p", 2)


@pytest.mark.parametrize("policy, loaded", [("latest:2", [2, 3]), ("all", [1, 2, 3]), ("specific:1,3", [1, 3])])
def test_version_policy_picks_the_versions(base, policy, loaded):
    path, add = base
    for version in (1, 2, 3):
        add(version)
    models = manager(path, policy)
    models.poll()
    assert models.loaded_versions() == loaded
    assert [s.version for s in models.statuses("storygen")] == loaded


def test_a_version_that_fails_to_load_is_skipped_until_it_changes(base, saved):
    path, add = base
    add(1)
    broken = publish_version(stage_broken_version(path, 2), 2)
    models = manager(path)
    models.poll()
    assert models.loaded_versions() == [1]  # latest falls back to the newest loadable version
    status = {s.version: s for s in models.statuses("storygen")}
    assert status[1].state == AVAILABLE and status[2].state == END and "failed to load" in status[2].error
    shutil.copy(os.path.join(saved[2], "saved_model.pb"), os.path.join(broken, "saved_model.pb"))
    shutil.copytree(os.path.join(saved[2], "variables"), os.path.join(broken, "variables"))
    models.poll()
    assert models.loaded_versions() == [2]


def test_a_version_pushed_before_its_variables_loads_once_they_land(base, saved):
    path, add = base
    add(1)
    version = os.path.join(path, "2")
    os.makedirs(version)
    shutil.copy(os.path.join(saved[2], "saved_model.pb"), version)  # a copy that is not atomic, half-way
    models = manager(path)
    models.poll()
    assert models.loaded_versions() == [1]
    shutil.copytree(os.path.join(saved[2], "variables"), os.path.join(version, "variables"))
    models.poll()  # saved_model.pb is unchanged: the new files alone make the version worth loading again
    assert models.loaded_versions() == [2]


def test_failed_loads_are_retried_max_num_load_retries_times(base, monkeypatch):
    """A transient failure heals on a retry with no file changed; a broken version is tried
    1 + max_load_retries times, retry_interval_s apart, then left alone."""
    from serving import model_manager

    path, add = base
    add(1)
    add(2)
    publish_version(stage_broken_version(path, 3), 3)
    attempts = {2: 0, 3: 0}
    real_load = model_manager.load_servable

    def flaky_load(name, version, version_path, tags):
        attempts[version] = attempts.get(version, 0) + 1
        if version == 2 and attempts[2] == 1:
            raise OSError("the file system hiccupped")
        return real_load(name, version, version_path, tags)

    monkeypatch.setattr(model_manager, "load_servable", flaky_load)
    clock = [0.0]  # the manager's, so that however long a poll's loads take, no retry falls due within it
    monkeypatch.setattr(model_manager, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    models = ModelManager("storygen", path, VersionPolicy.parse("specific:1,2,3"), {}, max_load_retries=2,
                          retry_interval_s=0.3)
    models.poll()
    assert models.loaded_versions() == [1] and attempts == {1: 1, 2: 1, 3: 1}
    models.poll()  # too soon for a retry
    assert attempts == {1: 1, 2: 1, 3: 1}
    for expected in (2, 3, 3):
        clock[0] += 0.35
        models.poll()
        assert attempts[3] == expected
    assert models.loaded_versions() == [1, 2]


def test_saved_model_tags_pick_the_meta_graph(base):
    path, add = base
    add(1)
    models = ModelManager("storygen", path, VersionPolicy.parse("latest"), {}, tags=("serve", "gpu"))
    models.poll()
    assert models.loaded_versions() == []
    assert "no meta graph tagged serve,gpu" in models.statuses("storygen")[0].error


def test_a_new_version_retires_the_old_one_without_breaking_its_requests(base):
    path, add = base
    add(1)
    models = manager(path)
    models.poll()
    in_flight = models.resolve("storygen")  # what a request that started before the reload holds
    add(2)
    models.poll()
    assert models.loaded_versions() == [2]
    assert call(in_flight) == expected_story("p", 1)
    assert {s.version: s.state for s in models.statuses("storygen")} == {1: END, 2: AVAILABLE}


@pytest.mark.slow
def test_a_retired_version_is_freed_at_the_first_poll_after_its_last_request(tiny_pipeline, tmp_path):
    """The tiny pipeline's export: unlike the stub, a real SavedModel is full of reference cycles."""
    path = str(tmp_path / "storygen")
    os.makedirs(path)
    for version in (1, 2):
        shutil.copytree(os.path.join(tiny_pipeline.model_base_path, str(version)), os.path.join(path, f".tmp-{version}"))
    publish_version(os.path.join(path, ".tmp-1"), 1)
    models = manager(path, warmup=False)
    models.poll()
    in_flight = models.resolve("storygen")
    graph = weakref.ref(in_flight.signature("generate")._function.graph)  # its operations point back at it
    publish_version(os.path.join(path, ".tmp-2"), 2)
    gc.disable()  # so that only the manager's collections free it
    try:
        models.poll()
        assert models.loaded_versions() == [2] and graph() is not None
        del in_flight  # the request ends, but reference cycles keep the version's graphs...
        assert graph() is not None
        models.poll()  # ...until the next poll collects them
        assert graph() is None
    finally:
        gc.enable()


@pytest.mark.skipif(sys.platform != "linux", reason="niceness is per thread on Linux only")
def test_a_load_runs_at_the_lowest_priority_without_automatic_collections():
    def load():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), gc.isenabled()

    def broken_load():
        raise ValueError("not a SavedModel")

    assert in_low_priority_thread(load) == (19, False)
    assert gc.isenabled() and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    with pytest.raises(ValueError, match="not a SavedModel"):
        in_low_priority_thread(broken_load)
    assert gc.isenabled()


def slow_warmup(version_path, seconds=1.0, count=2):
    """Warm-up requests the stub answers in `seconds` each (its generate sleeps max_new_tokens ms)."""
    write_warmup_requests(version_path, [predict_request(["热身"], "generate", max_new_tokens=int(seconds * 1000),
                                                         temperature=0.0, top_k=0, top_p=1.0, seed=0)] * count)


def test_a_new_version_takes_traffic_only_after_its_warm_up(base):
    path, add = base
    add(1)
    models = manager(path)
    models.poll()
    slow_warmup(add(2))
    polling = threading.Thread(target=models.poll)
    started = time.monotonic()
    polling.start()
    time.sleep(0.5)
    # Mid warm-up: version 2 is loading and version 1 answers.
    assert {s.version: s.state for s in models.statuses("storygen")} == {1: AVAILABLE, 2: LOADING}
    assert call(models.resolve("storygen")) == expected_story("p", 1)
    polling.join()
    assert time.monotonic() - started >= 2.0  # both warm-up requests ran before the swap
    assert call(models.resolve("storygen")) == expected_story("p", 2)

    # Warm-up that would take 10 s: well apart from a load's own time, 2.4 s once in CI on 2 busy cores.
    slow_warmup(add(3), seconds=5.0)
    started = time.monotonic()
    manager(path, warmup=False).poll()  # --enable_model_warmup=false: the file is not read
    assert time.monotonic() - started < 5.0


def test_a_version_whose_warm_up_fails_is_not_served(base):
    path, add = base
    add(1)
    write_warmup_requests(add(2), [predict_request(["热身"], "no_such_signature")])
    models = manager(path)
    models.poll()
    assert models.loaded_versions() == [1]
    status = {s.version: s for s in models.statuses("storygen")}
    assert status[2].state == END and "no signature 'no_such_signature'" in status[2].error


def test_labels_and_versions_resolve_or_give_tf_servings_errors(base):
    path, add = base
    add(1)
    add(2)
    models = manager(path, "all", {"stable": 1, "next": 3})
    models.poll()
    assert models.resolve("storygen", label="stable").version == 1
    assert models.resolve("storygen", version=2).version == 2
    for kwargs, code, fragment in [({"label": "beta"}, "INVALID_ARGUMENT", "no version label 'beta'"),
                                   ({"label": "next"}, "NOT_FOUND", "not loaded"),
                                   ({"version": 5}, "NOT_FOUND", "Version 5"),
                                   ({"name": "poems"}, "NOT_FOUND", "not served here")]:
        with pytest.raises(ServingError) as error:
            models.resolve(kwargs.pop("name", "storygen"), **kwargs)
        assert error.value.code == getattr(grpc.StatusCode, code) and fragment in error.value.message


# ---------------------------------------------------------------------------------- hot reload

@pytest.mark.slow
@pytest.mark.alone  # times how soon a pushed version answers
def test_hot_reload_under_load_drops_no_request(tmp_path, saved):
    path = str(tmp_path / "storygen")
    os.makedirs(path)
    shutil.copytree(saved[1], os.path.join(path, "1"))
    server = ServerProcess(path, tmp_path / "server.log", f"--file_system_poll_wait_seconds={POLL_S}")
    try:
        server.wait_ready(1)
        answers = [[] for _ in range(8)]  # per client: (time, version)
        failures = []

        def client(i, stop):
            prompt = f"线程 {i}" if i % 2 else f"thread {i}"
            while not stop.is_set():
                try:
                    if i % 4 == 3:
                        story = rest_story(server, prompt)
                    else:
                        story = stories(server.predict([prompt], timeout=10))[0]
                except grpc.RpcError as e:
                    story = f"{e.code()}: {e.details()}"
                version = next((v for v in (1, 2) if story == expected_story(prompt, v)), None)
                if version is None:
                    failures.append(story)
                else:
                    answers[i].append((time.monotonic(), version))

        with clients_running(8, client):
            staged = os.path.join(path, ".tmp-2")
            shutil.copytree(saved[2], staged)  # the staging directory must be ignored while it is written
            time.sleep(1.5)
            pushed = time.monotonic()
            publish_version(staged, 2)
            deadline = pushed + 3 * POLL_S
            while time.monotonic() < deadline and not all(a and a[-1][1] == 2 for a in answers):
                time.sleep(0.05)
            publish_version(stage_broken_version(path, 3), 3)  # must be skipped while 2 keeps serving
            time.sleep(2.5 * POLL_S)
    finally:
        server.stop()

    assert failures == []
    first_v2 = min(t for a in answers for t, v in a if v == 2)
    assert first_v2 - pushed <= 2 * POLL_S, f"version 2 answered {first_v2 - pushed:.2f} s after the push"
    for client_answers in answers:
        versions = [v for _, v in client_answers]
        assert versions == sorted(versions) and versions[-1] == 2  # never back to version 1
    log = server.log()
    assert "Version 3 of model storygen failed to load" in log and "Unloaded version 1" in log


@pytest.mark.slow
def test_10_reloads_keep_rss_within_50_mb_of_the_first(tiny_pipeline, tmp_path):
    """Each load of the tiny export used to stay in memory for good (~80 MB: TensorFlow's global
    gradient registry held the loaded functions); now a retired version's memory is reused."""
    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    path = str(tmp_path / "storygen")
    os.makedirs(path)
    models = manager(path, warmup=False)  # warm-up adds time, not leaks: its memory went with the load's
    rss = []
    for version in range(1, 12):
        staged = os.path.join(path, f".tmp-{version}")
        shutil.copytree(os.path.join(tiny_pipeline.model_base_path, "1"), staged)
        publish_version(staged, version)
        models.poll()
        assert models.loaded_versions() == [version]
        rss.append(rss_mb())
    # Medians of five, five reloads apart: from one reload to the next RSS swings by up to ~50 MB
    # as the allocator reuses the retired version's memory, while a leak adds ~80 MB per reload
    # (400 MB between the medians).
    after_first, after_tenth = np.median(rss[1:6]), np.median(rss[6:11])
    assert after_tenth - after_first <= 50, [round(r) for r in rss]


@pytest.mark.slow
@pytest.mark.alone
def test_version_swaps_under_8_clients_keep_p99_within_2_5x_of_steady_state(tiny_pipeline, tmp_path):
    """The tiny pipeline's export, swapped three times (1 -> 2 -> 3 -> 4, copies of 1 and 2). A swap
    counts from the push until the old version is freed: its load, its warm-up (without warm-up,
    requests waited up to 8.1 s here) and the collection that frees the old version (~0.5 s holding
    every request). Steady state is before, between and after the swaps, about as long as they are:
    a p99 over a shorter stretch reads low (in-process clients with no swap at all: the middle 60 s
    measured 1.13-1.25x of the 8 s before and after). The 8 clients keep the 2 cores busy, so the warm-up's CPU work
    (~5 s) comes out of theirs: on 2026-12-05 this test measured 1.48-2.16x (5 runs), and the same
    warm-up run by another process at nice 19 or SCHED_IDLE raised in-process clients' p99 1.3-1.9x."""
    path = str(tmp_path / "storygen")
    shutil.copytree(os.path.join(tiny_pipeline.model_base_path, "1"), os.path.join(path, "1"))
    server = ServerProcess(path, tmp_path / "server.log", f"--file_system_poll_wait_seconds={POLL_S}")
    latencies, failures, swaps = [], [], []  # (start, seconds); (pushed, freed)
    try:
        server.wait_ready(1)

        def client(i, stop):
            prompt = f"从前有座山 {i}" if i % 2 else f"Once upon a time {i}"
            while not stop.is_set():
                started = time.monotonic()
                try:
                    server.predict([prompt], "generate", timeout=60, max_new_tokens=16, temperature=0.8, top_k=40,
                                   top_p=0.95, seed=1)
                    latencies.append((started, time.monotonic() - started))
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")

        # This process holds every earlier test's objects: its garbage collections would pause the
        # clients, and count as the server's latency.
        gc.disable()
        with clients_running(8, client):
            time.sleep(20)
            for version, source in ((2, "2"), (3, "1"), (4, "2")):
                pushed = time.monotonic()
                staged = os.path.join(path, f".tmp-{version}")
                shutil.copytree(os.path.join(tiny_pipeline.model_base_path, source), staged)
                publish_version(staged, version)
                server.wait_ready(version, timeout_s=60)
                freed = server.wait_log(f"Freed version(s) {version - 1} of model storygen")
                swaps.append((pushed, freed + 1))  # + the requests that waited for the collection
                time.sleep(15)
    finally:
        gc.enable()
        server.stop()
    during = [any(pushed <= started < end for pushed, end in swaps) for started, _ in latencies]
    steady = [s for (started, s), swapping in zip(latencies, during) if started > latencies[0][0] + 2 and not swapping]
    swap = [s for (_, s), swapping in zip(latencies, during) if swapping]
    assert failures == [] and len(steady) > 2000 and len(swap) > 2000
    assert np.percentile(swap, 99) <= 2.5 * np.percentile(steady, 99), (np.percentile(steady, 99),
                                                                        np.percentile(swap, 99))
    log = server.log()
    for version in (2, 3, 4):
        assert log.index(f"Warmed up version {version}") < log.index(f"Version {version} of model storygen is available")
