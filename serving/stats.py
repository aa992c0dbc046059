"""Request accounting: a debug log line per request, a summary line per interval, totals in
Prometheus' text format, and the in-flight count that a graceful shutdown waits on."""

import collections
import contextlib
import threading
import time

import grpc
from absl import logging

from serving.errors import ServingError


class RequestRecord:
    """What a request handler fills in while it works, for the log line."""

    def __init__(self, method: str):
        self.method = method
        self.target = ""  # e.g. "storygen/2/generate"
        self.code = grpc.StatusCode.OK


class Stats:
    def __init__(self):
        self._lock = threading.Condition()
        self._in_flight = 0
        self._requests = collections.Counter()  # (protocol, method, code name) -> count, since start
        self._model_calls = 0
        self._model_rows = 0
        # Since the last summary:
        self._window_codes = collections.Counter()
        self._window_latencies: list[float] = []
        self._window_calls = 0
        self._window_rows = 0

    @contextlib.contextmanager
    def request(self, protocol: str, method: str = ""):
        """Counts a request while it runs (the handler may fill in the record's method, target and
        code); a ServingError escaping it sets its code."""
        record = RequestRecord(method)
        start = time.monotonic()
        with self._lock:
            self._in_flight += 1
        try:
            yield record
        except ServingError as e:
            record.code = e.code
            raise
        except BaseException:
            if record.code == grpc.StatusCode.OK:
                record.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            elapsed = time.monotonic() - start
            with self._lock:
                self._in_flight -= 1
                self._requests[protocol, record.method, record.code.name] += 1
                self._window_codes[record.code.name] += 1
                self._window_latencies.append(elapsed)
                self._lock.notify_all()
            logging.debug("%s %s %s -> %s in %.1f ms", protocol, record.method, record.target, record.code.name,
                          elapsed * 1000)

    def record_model_call(self, rows: int) -> None:
        with self._lock:
            self._model_calls += 1
            self._model_rows += rows
            self._window_calls += 1
            self._window_rows += rows

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request is in flight; False if `timeout_s` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout_s)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def take_summary(self, interval_s: float) -> str:
        """One line about the requests since the last call, which starts a new window."""
        with self._lock:
            codes, latencies = self._window_codes, sorted(self._window_latencies)
            calls, rows = self._window_calls, self._window_rows
            self._window_codes, self._window_latencies = collections.Counter(), []
            self._window_calls = self._window_rows = 0
            in_flight = self._in_flight
        total = sum(codes.values())
        errors = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()) if code != "OK")
        line = f"last {interval_s:.0f} s: {total} requests ({errors or 'no errors'})"
        if calls:
            line += f", {calls} model calls of {rows / calls:.1f} rows on average"
        if latencies:
            p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            line += f", latency p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms"
        return line + f", {in_flight} in flight"

    def prometheus_text(self) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
            calls, rows, in_flight = self._model_calls, self._model_rows, self._in_flight
        lines = ["# TYPE storygen_requests_total counter"]
        lines += [f'storygen_requests_total{{protocol="{p}",method="{m}",code="{c}"}} {n}'
                  for (p, m, c), n in requests]
        lines += ["# TYPE storygen_model_calls_total counter", f"storygen_model_calls_total {calls}",
                  "# TYPE storygen_model_rows_total counter", f"storygen_model_rows_total {rows}",
                  "# TYPE storygen_requests_in_flight gauge", f"storygen_requests_in_flight {in_flight}"]
        return "\n".join(lines) + "\n"
