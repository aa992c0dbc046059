"""A server's life: a 20 s soak with 16 clients (no errors, bounded memory, summary lines), and
SIGTERM while requests are in flight (they finish, new ones are refused, also on kept-alive REST
connections, and the exit code is 0; 1 when the drain ran out and requests were cut)."""

import ctypes
import http.client
import json
import os
import signal
import threading
import time

import grpc
import pytest

from serving_fixtures import (ServerProcess, clients_running, expected_generation, expected_story, rest_story,
                              save_version, stories)

SOAK_S = 20
WARM_UP_S = 4
# Measured growth after warm-up is a few MiB; a leak of even 1 KiB per request (about 10k
# requests) would cross this.
RSS_GROWTH_BOUND = 24 << 20
GENERATE = dict(temperature=0.5, top_k=40, top_p=0.9, seed=3)


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "storygen"
    path.mkdir()
    save_version(str(path), 1)
    return str(path)


@pytest.mark.slow
def test_soak_with_16_clients_has_no_errors_and_bounded_memory(tmp_path, base):
    server = ServerProcess(base, tmp_path / "server.log", "--enable_batching", "--summary_interval_seconds=5")
    try:
        server.wait_ready(1)
        counts = [0] * 16
        failures = []

        def client(i, stop):
            n = 0
            while not stop.is_set():
                n += 1
                prompt = f"第{i}个故事，第{n}次" if i % 2 else f"story {i}, try {n}"
                try:
                    if i % 4 == 2:  # generate: equal parameters, so these share batches
                        story = stories(server.predict([prompt], "generate", timeout=10, max_new_tokens=5,
                                                       **GENERATE))[0]
                        expected = expected_generation(prompt, 1, 5, 40, 3)
                    elif i % 4 == 3:
                        story = rest_story(server, prompt)
                        expected = expected_story(prompt, 1)
                    else:
                        story, expected = stories(server.predict([prompt], timeout=10))[0], expected_story(prompt, 1)
                except grpc.RpcError as e:
                    story, expected = f"{e.code()}: {e.details()}", None
                if story == expected:
                    counts[i] += 1
                else:
                    failures.append(story)

        with clients_running(16, client):
            time.sleep(WARM_UP_S)
            rss_after_warm_up = server.rss_bytes()
            time.sleep(SOAK_S - WARM_UP_S)
            rss_at_end = server.rss_bytes()
    finally:
        server.stop()

    assert failures == []
    assert min(counts) > 0 and sum(counts) > 1000, counts
    growth = rss_at_end - rss_after_warm_up
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth >> 20} MiB during the soak"
    summaries = [line for line in server.log().splitlines() if "last 5 s:" in line]
    assert len(summaries) >= 3 and all("(no errors)" in line for line in summaries), summaries


# Long enough that a busy 2-core machine starts draining while both requests are still running.
SLOW_MS = 3000


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path, base):
    server = ServerProcess(base, tmp_path / "server.log", "--max_new_tokens_limit=4000")
    try:
        server.wait_ready(1)
        results = {}

        def slow_grpc():
            results["grpc"] = stories(server.predict(["慢"], "generate", timeout=30, max_new_tokens=SLOW_MS,
                                                     **GENERATE))[0]

        def slow_rest():
            results["rest"] = server.rest("/v1/models/storygen:predict", {
                "signature_name": "generate", "inputs": {"prompt": ["slow"], "max_new_tokens": SLOW_MS, **GENERATE}})

        kept_alive = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        kept_alive.request("GET", "/v1/models/storygen")
        first = kept_alive.getresponse()
        assert first.status == 200 and first.read()
        threads = [threading.Thread(target=slow_grpc), threading.Thread(target=slow_rest)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while server.metric("storygen_requests_in_flight") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        # The server logs this once it refuses new requests; on a busy machine that takes a moment.
        deadline = time.monotonic() + 10
        while "SIGTERM received: draining" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:  # new requests are refused while draining
            server.predict(["new"], timeout=5)
        with pytest.raises(OSError):  # refused, or reset if it reached the closing listener
            server.rest("/v1/models/storygen")
        # A connection kept alive from before the signal: its next request is refused, and it is closed.
        kept_alive.request("POST", "/v1/models/storygen:predict", body=json.dumps({"instances": ["late"]}))
        late = kept_alive.getresponse()
        late_body = json.loads(late.read())
        kept_alive.close()
        for thread in threads:
            thread.join()
        exit_code = server.proc.wait(30)
    finally:
        server.stop()

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert results["grpc"] == expected_generation("慢", 1, SLOW_MS, 40, 3)
    status, body = results["rest"]
    assert (status, body["outputs"]["story"]) == (200, [expected_generation("slow", 1, SLOW_MS, 40, 3)])
    assert exit_code == 0
    assert (late.status, late.getheader("Connection")) == (503, "close") and "shutting down" in late_body["error"]
    log = server.log()
    assert "SIGTERM received: draining 2 in-flight requests" in log and "All requests answered" in log


@pytest.mark.slow
def test_sigterm_that_has_to_cut_requests_exits_1(tmp_path, base):
    server = ServerProcess(base, tmp_path / "server.log", "--max_new_tokens_limit=20000", "--drain_timeout_seconds=1")
    try:
        server.wait_ready(1)
        def slow_rest():
            try:
                server.rest("/v1/models/storygen:predict", {"signature_name": "generate", "inputs": {
                    "prompt": ["slow"], "max_new_tokens": 15000, **GENERATE}})
            except OSError:
                pass  # cut: the server exits under it

        threading.Thread(target=slow_rest, daemon=True).start()
        deadline = time.monotonic() + 10
        while server.metric("storygen_requests_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        exit_code = server.proc.wait(30)
    finally:
        server.stop()
    assert exit_code == 1
    assert "Exiting with 1 requests still in flight after 1 s of draining: they were cut." in server.log()


def test_sigterm_taken_by_another_thread_still_stops_the_server(tmp_path, base):
    # The kernel gives a process's signal to any of its threads; send it to one that is not the main thread.
    server = ServerProcess(base, tmp_path / "server.log")
    try:
        server.wait_ready(1)
        other_threads = [int(tid) for tid in os.listdir(f"/proc/{server.proc.pid}/task") if int(tid) != server.proc.pid]
        assert ctypes.CDLL(None, use_errno=True).tgkill(server.proc.pid, other_threads[-1], signal.SIGTERM) == 0
        exit_code = server.proc.wait(10)
    finally:
        server.stop()
    assert exit_code == 0
    assert "SIGTERM received: draining 0 in-flight requests" in server.log()
