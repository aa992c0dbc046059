"""REST connections as a production HTTP server must take them, against a real server process:
chunked bodies, a request that carries both Content-Length and Transfer-Encoding, a body that
stops arriving, a burst of simultaneous connects, and hundreds of idle or trickling connections
that must not slow the clients that send real requests."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from serving_fixtures import expected_story, serve_stub_versions

EN = "Once upon a time"
PREDICT = "/v1/models/storygen:predict"
BODY = json.dumps({"instances": [EN, "从前有座山"]}).encode()
TIMEOUT_MS = 1500


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_stub_versions(tmp_path_factory.mktemp("serving_http"), [1], "--max_request_bytes=65536",
                             f"--rest_api_timeout_in_ms={TIMEOUT_MS}", "--file_system_poll_wait_seconds=0") as process:
        yield process


def raw_exchange(server, data: bytes, *, then_wait_s: float = 0.0, timeout_s: float = 10) -> tuple[bytes, float]:
    """Sends `data` on a new connection (waiting `then_wait_s` without closing it) and returns
    everything the server sends until it closes the connection, with the seconds that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=timeout_s) as connection:
        connection.sendall(data)
        time.sleep(then_wait_s)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def predict_once(server, connection=None) -> float:
    """Seconds for one good REST predict (on `connection`, or a new one)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    started = time.perf_counter()
    try:
        connection.request("POST", PREDICT, body=BODY, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        if own:
            connection.close()
    assert response.status == 200, answer
    assert answer["predictions"][0]["story"] == expected_story(EN, 1)
    return time.perf_counter() - started


def test_a_chunked_body_is_read_whole(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        connection.request("POST", PREDICT, body=iter([BODY[:10], BODY[10:25], BODY[25:]]),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert [p["story"] for p in answer["predictions"]] == [expected_story(EN, 1), expected_story("从前有座山", 1)]
        # Over the size limit in chunks (no Content-Length to check first): 413, and the connection closed.
        connection.request("POST", PREDICT, body=iter([b"x" * 40000, b"x" * 40000]), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "limit of 65536" in json.loads(response.read())["error"]
        assert response.getheader("Connection") == "close"
    finally:
        connection.close()
    predict_once(server)


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused(server):
    """Proxies and servers that disagree on which header frames the body let one request smuggle
    another (RFC 9112, section 6.1): such a request is refused and its connection closed."""
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    request = (b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (len(chunked), chunked))
    received, _ = raw_exchange(server, request)
    assert received.split(b" ", 2)[1] == b"400" and b"can't be present with Content-Length" in received, received
    assert received.count(b"HTTP/1.") == 1  # nothing after the refused request was answered
    predict_once(server)


def test_a_body_that_stops_arriving_gets_408_at_the_deadline(server):
    head = (b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY))
    received, seconds = raw_exchange(server, head + BODY[:10], timeout_s=TIMEOUT_MS / 1000 + 10)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b"did not arrive within 1.5 s" in received
    assert TIMEOUT_MS / 1000 - 0.1 <= seconds < TIMEOUT_MS / 1000 + 3
    assert "Traceback" not in server.log()
    predict_once(server)


def test_128_simultaneous_connects_are_all_served(server):
    barrier = threading.Barrier(128)
    errors = []

    def client():
        barrier.wait()
        try:
            predict_once(server)
        except Exception as e:  # collected, so that one failure does not hide the others
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(128)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and time.monotonic() - started < 20


# Holds 250 idle connections and 250 that send a header byte every 2 s, from a process of its own
# (so the measuring client shares no interpreter with it); prints "held" once all are open.
HOLDER = """
import socket, sys, time
port = int(sys.argv[1])
idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(250)]
trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(250)]
header = b"POST /v1/models/storygen:predict HTTP/1.1\\r\\nHost: x\\r\\n"
print("held", flush=True)
for position in range(10 ** 6):
    for connection in trickling:
        connection.send(header[position % len(header):position % len(header) + 1])
    time.sleep(2)
"""


@pytest.mark.slow
@pytest.mark.alone
def test_500_idle_or_trickling_connections_leave_real_clients_p99_within_2x(server):
    """A thread per connection used to cap REST at 64 connections: every other client got 503.
    A request takes ~1.5 ms, so a p99 needs a few seconds of them: with 300 (the 3rd slowest), one
    hiccup of the host decided it (2.13x in one CI run). The baseline brackets the held run."""
    def latencies(count):
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
        try:
            return [predict_once(server, connection) for _ in range(count)]
        finally:
            connection.close()

    latencies(30)  # warm
    free = latencies(1000)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(server.rest_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2.5)  # every trickling connection has started its request
        held = latencies(2000)
        new_connections = [predict_once(server) for _ in range(20)]
        assert holder.poll() is None  # no connection was refused or reset
    finally:
        holder.kill()
        holder.wait()
    free += latencies(1000)
    assert np.percentile(held, 99) <= 2 * np.percentile(free, 99), (np.percentile(free, 99), np.percentile(held, 99))
    assert max(new_connections) < 1.0, new_connections
