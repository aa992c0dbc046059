"""The benchmark harness: worker processes, timing in turns, result rows and the printed table.

Every section module (training, input_pipeline, decoding, serving, scale) imports this module;
it imports none of them, and `benchmarks/run.py`, the entry point, imports both.

How peers are measured: every peer lives in its own worker process (a child of this one), built
and warmed up once; a section then asks the peers in turn for one timed run each (`alternate`),
`repeats` times, rotating who goes first, and reports the median and the spread (min-max). A
worker that is not being timed is stopped (SIGSTOP), so that it takes no CPU while another peer
runs: no spinning OpenMP threads or background pools leak into someone else's time.

A row is {name, unit, ours, peer, peer_value, ratio, target}: `ours` is storygen's median,
`peer_value` the peer's, and `ratio` is oriented so that higher is better for storygen (ours /
peer for rates, peer / ours for times and latencies); `target` is the ratio the issue asks for
(None: none asked).
"""

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("name", "unit", "ours", "peer", "peer_value", "ratio", "target")
# The entry point a worker process runs: it hands `--worker` over to `worker_main`.
WORKER_ENTRY_POINT = "benchmarks.run"


def define_worker_flags():
    """The flags a worker process starts with; defined here, so that only --helpfull lists them."""
    flags.DEFINE_string("worker", None, "Internal: run as a worker process of this 'module:function'.")
    flags.DEFINE_string("worker_args", "{}", "Internal: the worker function's keyword arguments, as JSON.")


# ---------------------------------------------------------------------- statistics


@dataclasses.dataclass
class Stat:
    """Repeated measurements of one quantity."""

    values: list

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def map(self, f) -> "Stat":
        return Stat([f(v) for v in self.values])

    def scale(self, k: float) -> "Stat":
        return self.map(lambda v: v * k)

    def spread(self) -> str:
        return f"{fmt(self.min)}-{fmt(self.max)}" if len(self.values) > 1 else ""


def alternate(runs: dict, repeats: int) -> dict:
    """Calls each run `repeats` times, peers taking turns (who goes first rotates); a Stat per peer."""
    names = list(runs)
    values = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(runs[name]())
    return {name: Stat(v) for name, v in values.items()}


def make_row(name: str, unit: str, ours, peer, peer_value, *, higher_is_better: bool = True, target=None) -> dict:
    """One result row; `ratio` is oriented so that higher is better for storygen."""
    ours_value = ours.median if isinstance(ours, Stat) else ours
    peer_number = peer_value.median if isinstance(peer_value, Stat) else peer_value
    ratio = None
    if ours_value is not None and peer_number is not None:
        numerator, denominator = (ours_value, peer_number) if higher_is_better else (peer_number, ours_value)
        ratio = numerator / denominator if denominator else None
    return {"name": name, "unit": unit, "ours": ours_value, "peer": peer, "peer_value": peer_number,
            "ratio": ratio, "target": target}


def fmt(value) -> str:
    """A number with three significant figures or none after the point; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------- worker processes


class WorkerError(RuntimeError):
    pass


class Worker:
    """A peer in its own process: `target` is 'module:function'; the function, called with
    `args`, builds the peer and returns {op name: callable}; `call(op, **kwargs)` runs one op
    there and returns its (JSON) result. Between calls the process is stopped."""

    def __init__(self, name: str, target: str, args: dict, log_dir: str, env: dict | None = None):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name.replace(' ', '_')}.log")
        environment = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                           TF_CPP_MIN_LOG_LEVEL="2")
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = str(value)
        command = [sys.executable, "-m", WORKER_ENTRY_POINT, f"--worker={target}", f"--worker_args={json.dumps(args)}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=environment, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        self.running = True
        self.info = self._reply()
        self._pause()

    def _pause(self):
        if self.running and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.running = False

    def _resume(self):
        if not self.running:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.running = True

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"worker '{self.name}' exited with {self.proc.returncode}; its log "
                              f"({self.log_path}) ends:\n{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"worker '{self.name}' failed:\n{reply['error']}")
        return reply["result"]

    def call(self, op: str, **kwargs):
        self._resume()
        try:
            self.proc.stdin.write(json.dumps({"op": op, "kwargs": kwargs}) + "\n")
            self.proc.stdin.flush()
            return self._reply()
        finally:
            self._pause()

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def close(self):
        if self.proc.poll() is None:
            self._resume()
            try:
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def worker_main(target: str, args: dict):
    """The worker side: answers one JSON line per request on the original stdout; everything
    else printed (by us or by libraries, from Python or C) goes to stderr, the worker's log."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(**message):
        protocol.write(json.dumps(message, default=float) + "\n")

    try:
        module, function = target.split(":")
        ops = getattr(__import__(module, fromlist=[function]), function)(**args)
    except BaseException:  # noqa: BLE001 - reported to the harness, which stops the run
        answer(error=traceback.format_exc())
        return
    answer(result={"ops": sorted(ops)})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = ops[request["op"]](**request["kwargs"])
        except BaseException:  # noqa: BLE001
            answer(error=traceback.format_exc())
            continue
        answer(result=result)


def selftest_worker(scale: float):
    """A worker with no TensorFlow, for tests of the protocol (it chatters on stdout on purpose)."""
    print("chatter on stdout must not break the protocol")
    return {"times": lambda x: x * scale, "fail": lambda: 1 / 0}


def timed(run) -> dict:
    """A worker op that times one call of `run(**kwargs)`: its result (a dict) and `seconds`."""

    def op(**kwargs):
        start = time.perf_counter()
        result = run(**kwargs)
        return dict(result, seconds=time.perf_counter() - start)

    return op


# ---------------------------------------------------------------------- the harness


class Harness:
    """What a section gets: settings, worker processes, and where results go."""

    def __init__(self, quick: bool, repeats: int, work_dir: str, json_path: str | None = None):
        self.quick, self.repeats, self.work_dir, self.json_path = quick, repeats, work_dir, json_path
        self.rows, self.notes, self.section = [], [], ""
        self.log_dir = os.path.join(work_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self._workers = []

    def write_json(self):
        if self.json_path:
            with open(self.json_path, "w", encoding="utf-8") as f:
                json.dump([row for _, row, _, _ in self.rows], f, indent=2)

    def worker(self, name: str, target: str, env: dict | None = None, **args) -> Worker:
        start = time.perf_counter()
        w = Worker(name, target, args, self.log_dir, env)
        self._workers.append(w)
        self.progress(f"  started {name} ({time.perf_counter() - start:.0f} s)")
        return w

    def row(self, name, unit, ours, peer, peer_value, *, higher_is_better=True, target=None, note=None):
        row = make_row(name, unit, ours, peer, peer_value, higher_is_better=higher_is_better, target=target)
        spreads = [s.spread() if isinstance(s, Stat) else "" for s in (ours, peer_value)]
        self.rows.append((self.section, row, spreads, note))
        self.progress(f"  {format_row(row)}")

    def note(self, text: str):
        self.notes.append(text)
        self.progress(f"  {text}")

    def progress(self, text: str):
        print(text, file=sys.stderr, flush=True)

    def close(self):
        for w in self._workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing after a failure: do what can be done
                pass


def format_row(row: dict) -> str:
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    return (f"{row['name']}: {fmt(row['ours'])} {row['unit']} vs {row['peer']} {fmt(row['peer_value'])} "
            f"-> {ratio}" + ("" if row["target"] is None else f" (target {row['target']:g}x)"))


def met(row: dict):
    if row["target"] is None or row["ratio"] is None:
        return None
    return row["ratio"] >= row["target"]


def table(rows, notes) -> str:
    """The printed report: one line per row, then the notes (settings picked, spreads)."""
    header = (f"{'section':<14} {'comparison':<44} {'storygen':>10} {'spread':>13}  {'peer':<44} {'peer':>10} "
              f"{'spread':>13} {'unit':<13} {'ratio':>7} {'target':>7}  met")
    lines = [header, "-" * len(header)]
    for section, row, (ours_spread, peer_spread), _ in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        target = "-" if row["target"] is None else f">={row['target']:g}x"
        ok = {True: "yes", False: "NO", None: ""}[met(row)]
        lines.append(f"{section:<14} {row['name']:<44} {fmt(row['ours']):>10} {ours_spread:>13}  "
                     f"{fmt(row['peer']):<44} {fmt(row['peer_value']):>10} {peer_spread:>13} {row['unit']:<13} "
                     f"{ratio:>7} {target:>7}  {ok}")
    row_notes = [f"{row['name']}: {note}" for _, row, _, note in rows if note]
    if notes or row_notes:
        lines.append("")
        lines.extend(f"* {n}" for n in notes + row_notes)
    return "\n".join(lines)


# ---------------------------------------------------------------------- settings a peer runs under


# A peer runs under each of its settings in a worker of its own, and the faster is kept
# (--quick tries only the first). PyTorch's OMP_WAIT_POLICY: PASSIVE, or unset (libgomp's
# default: spin a while, then sleep). TensorFlow's TF_NUM_INTRAOP_THREADS: unset (a thread per
# core), or 1 (one thread per op, what serving's --tensorflow_intra_op_parallelism=1 sets).
OMP_SETTINGS = ("PASSIVE", None)
INTRA_OP_SETTINGS = (None, 1)


def settings(h: Harness, choices: tuple) -> tuple:
    return choices[:1] if h.quick else choices


def setting_name(setting) -> str:
    return "unset" if setting is None else str(setting)


def setting_of(peer_name: str) -> str:
    """The setting at the end of a peer's name ('torch eager OMP PASSIVE' -> 'PASSIVE')."""
    return peer_name.rsplit(" ", 1)[1]


def best_setting(h: Harness, label: str, rates: dict, names: list, variable: str) -> str:
    """Of the peers `names` (one per setting of the environment variable `variable`, named as
    `setting_of` reads them), the fastest by median rate; a note lists them all when there are several."""
    best = max(names, key=lambda n: rates[n].median)
    if len(names) > 1:
        h.note(f"{label}: " + ", ".join(f"{variable}={setting_of(n)} {fmt(rates[n].median)} tokens/s" for n in names)
               + f" -> {setting_of(best)}")
    return best
