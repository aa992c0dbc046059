"""storygen against its peers, side by side: one command, one table of ratios.

    python -m benchmarks.run [--quick] [--only training,decoding] [--repeats N] [--json OUT]

Sections (all by default; `--only` picks some):
  training        tokens/s of storygen's trainer vs the same model in PyTorch (eager, torch.compile),
                  fp32 and bf16; model FLOPs utilisation; padding waste    (benchmarks/training.py)
  input_pipeline  examples/s of transform.training_batches vs what the trainer consumes
                                                                           (benchmarks/input_pipeline.py)
  decoding        the exported `generate` signature vs recompute, keras-hub's BartSeq2SeqLM.generate
                  (benchmarks/decoding.py's peers) and a PyTorch greedy decoder with a KV cache
  serving         benchmarks/serving_bench.py's servers: throughput, p50/p99, batching on vs off
  scale           ingest + tokenizer time and peak memory for 10 MB, 100 MB and 1 GB corpora
                                                                           (benchmarks/scale.py)

How peers are measured: every peer lives in its own worker process (a child of this one, in its
process group), built and warmed up once; the harness then asks the peers in turn for one timed
run each, `--repeats` times, rotating who goes first, and reports the median and the spread
(min-max). A worker that is not being timed is stopped (SIGSTOP), so that it takes no CPU while
another peer runs: no spinning OpenMP threads or background pools leak into someone else's
time. PyTorch peers run with OMP_WAIT_POLICY=PASSIVE and unset, and the faster one is kept.

`--json OUT` writes a list of rows {name, unit, ours, peer, peer_value, ratio, target}: `ours` is
storygen's median, `peer_value` the peer's, and `ratio` is oriented so that higher is better for
storygen (ours / peer for rates, peer / ours for times and latencies); `target` is the ratio the
issue asks for (null: none asked).
"""

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("training", "input_pipeline", "decoding", "serving", "scale")
ROW_KEYS = ("name", "unit", "ours", "peer", "peer_value", "ratio", "target")


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
        return f"{_fmt(self.min)}-{_fmt(self.max)}" if len(self.values) > 1 else ""


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


def _fmt(value) -> str:
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

    def __init__(self, name: str, target: str, args: dict, log_dir: str, env: dict | None = None,
                 timeout: float = 1800):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name.replace(' ', '_')}.log")
        environment = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                           TF_CPP_MIN_LOG_LEVEL="2")
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = str(value)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.run", "--worker", target, "--worker_args", json.dumps(args)],
                cwd=REPO, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
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


# ---------------------------------------------------------------------- the harness


class Harness:
    """What a section gets: settings, worker processes, and where results go."""

    def __init__(self, quick: bool, repeats: int, work_dir: str, args=None):
        self.quick, self.repeats, self.work_dir, self.args = quick, repeats, work_dir, args
        self.rows, self.notes, self.section = [], [], ""
        self.log_dir = os.path.join(work_dir, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self._workers = []
        self._prepared = None
        self.json_path = None

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

    def prepared(self) -> dict:
        """The training data (ingest, tokenizer, batches), made once per run."""
        if self._prepared is None:
            w = self.worker("prepare", "benchmarks.training:prepare_worker", out_dir=self.work_dir, quick=self.quick)
            self._prepared = w.call("prepare")
            w.close()
        return self._prepared

    def close(self):
        for w in self._workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing after a failure: do what can be done
                pass


def format_row(row: dict) -> str:
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    return (f"{row['name']}: {_fmt(row['ours'])} {row['unit']} vs {row['peer']} {_fmt(row['peer_value'])} "
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
        lines.append(f"{section:<14} {row['name']:<44} {_fmt(row['ours']):>10} {ours_spread:>13}  "
                     f"{_fmt(row['peer']):<44} {_fmt(row['peer_value']):>10} {peer_spread:>13} {row['unit']:<13} "
                     f"{ratio:>7} {target:>7}  {ok}")
    row_notes = [f"{row['name']}: {note}" for _, row, _, note in rows if note]
    if notes or row_notes:
        lines.append("")
        lines.extend(f"* {n}" for n in notes + row_notes)
    return "\n".join(lines)


def run_sections(h: Harness, sections) -> None:
    consumption = None
    for section in sections:
        h.section = section
        start = time.perf_counter()
        h.progress(f"[{section}]")
        if section == "training":
            from benchmarks import training

            consumption = training.run_section(h, h.prepared())
        elif section == "input_pipeline":
            from benchmarks import input_pipeline

            input_pipeline.run_section(h, h.prepared(), consumption)
        elif section == "decoding":
            decoding_section(h)
        elif section == "serving":
            serving_section(h)
        elif section == "scale":
            from benchmarks import scale

            scale.run_section(h)
        h.progress(f"[{section}] {time.perf_counter() - start:.0f} s")
        h.write_json()  # after every section: a long run that fails later keeps what it measured


# ---------------------------------------------------------------------- decoding


def decoding_sizes():
    """The model size of benchmarks/decoding.py (read from it, so the torch peer stays matched)."""
    from benchmarks import decoding

    return {"vocab_size": getattr(decoding, "VOCAB", 8000), "d_model": getattr(decoding, "D_MODEL", 256),
            "num_layers": getattr(decoding, "LAYERS", 4), "num_heads": getattr(decoding, "HEADS", 4),
            "ff_dim": getattr(decoding, "FF", 1024), "prompt_tokens": getattr(decoding, "PROMPT_TOKENS", 8)}


def tf_decoding_worker(new_tokens: int):
    """Worker: benchmarks/decoding.py's peers, each `run(batch) -> tokens decoded`."""
    from benchmarks import decoding

    made = decoding.storygen_peer(new_tokens)
    if isinstance(made, dict):
        peers = dict(made)
    else:
        peers = dict(zip(("storygen", "recompute"), made))
    peers["keras-hub"] = decoding.keras_hub_peer(new_tokens)

    def run(peer: str, batch: int):
        start = time.perf_counter()
        tokens = peers[peer](batch)
        return {"tokens": int(tokens), "seconds": time.perf_counter() - start}

    return {"run": run, "peers": lambda: list(peers)}


def torch_decoding_worker(new_tokens: int):
    """Worker: the PyTorch model of decoding.py's size, greedy with a KV cache, eager, fp32."""
    import torch

    from benchmarks import torch_peers

    sizes = decoding_sizes()
    torch.manual_seed(0)
    model = torch_peers.TorchStoryTransformer(
        sizes["vocab_size"], 64, new_tokens + 1, sizes["d_model"], sizes["num_layers"], sizes["num_heads"],
        sizes["ff_dim"])
    decoder = torch_peers.CachedDecoder(model)

    def run(peer: str, batch: int):
        encoder_ids = torch.full((batch, sizes["prompt_tokens"]), 5, dtype=torch.long)
        start = time.perf_counter()
        out = decoder.generate(encoder_ids, new_tokens)
        return {"tokens": int(out.numel()), "seconds": time.perf_counter() - start}

    return {"run": run, "peers": lambda: ["torch"]}


def decoding_section(h: Harness):
    new_tokens = 32 if h.quick else 256
    sizes = decoding_sizes()
    tf_worker = h.worker("decoding-tf", "benchmarks.run:tf_decoding_worker", new_tokens=new_tokens)
    peers = {name: tf_worker for name in tf_worker.call("peers")}
    omp_settings = ("PASSIVE",) if h.quick else ("PASSIVE", None)
    for setting in omp_settings:
        peers[f"torch OMP {setting or 'unset'}"] = h.worker(
            f"decoding-torch-{setting or 'unset'}", "benchmarks.run:torch_decoding_worker",
            env={"OMP_WAIT_POLICY": setting}, new_tokens=new_tokens)
    h.note(f"decoding: greedy, {new_tokens} new tokens after an {sizes['prompt_tokens']}-token prompt, random "
           f"weights, {sizes['num_layers']}+{sizes['num_layers']} layers, d_model {sizes['d_model']}, "
           f"{sizes['num_heads']} heads, ff {sizes['ff_dim']}, vocab {sizes['vocab_size']}; storygen = the exported "
           "`generate` signature (SavedModel, tf.while_loop + KV cache, no XLA); keras-hub = "
           "BartSeq2SeqLM.generate (XLA, its default); torch = eager fp32 KV-cache decoder (benchmarks/torch_peers.py)")
    for batch in (1, 16):
        runs = {name: (lambda name=name, w=w: w.call("run", peer=name.split(" OMP ")[0], batch=batch))
                for name, w in peers.items()}
        for run in runs.values():
            run()  # warm-up: tracing, XLA compilation
        stats = alternate(runs, h.repeats)
        rates = {name: s.map(lambda r: r["tokens"] / r["seconds"]) for name, s in stats.items()}
        ours = rates["storygen"]
        torch_names = [n for n in rates if n.startswith("torch")]
        best_torch = max(torch_names, key=lambda n: rates[n].median)
        if len(torch_names) > 1:
            h.note(f"decoding batch {batch} torch: " + ", ".join(
                f"OMP_WAIT_POLICY={n.split(' OMP ')[1]} {rates[n].median:.0f} tokens/s" for n in torch_names)
                + f" -> {best_torch.split(' OMP ')[1]}")
        for peer, target in (("keras-hub", 1.0), ("recompute", 5.0)):
            if peer in rates:
                h.row(f"decoding batch {batch}: tokens/s vs {peer}", "tokens/s", ours, peer, rates[peer],
                      target=target)
        h.row(f"decoding batch {batch}: tokens/s vs torch", "tokens/s", ours,
              f"torch KV cache, eager fp32, OMP {best_torch.split(' OMP ')[1]}", rates[best_torch])
    for w in set(peers.values()):
        w.close()


# ---------------------------------------------------------------------- serving


def serving_worker(quick: bool, seconds: float, repeats: int, model_base_path: str | None = None):
    """Worker: serving_bench's two servers (batching on, off) on one model, measured in turns."""
    from absl import flags

    from benchmarks import serving_bench

    flags.FLAGS(["serving_bench"] + (["--quick"] if quick else []), known_only=True)

    def run():
        clients = [int(c) for c in flags.FLAGS.clients]
        with tempfile.TemporaryDirectory() as tmp:
            base_path = model_base_path
            if base_path is None:
                base_path = os.path.join(tmp, "synthetic")
                os.makedirs(base_path)
                serving_bench.save_synthetic_model(base_path, flags.FLAGS.steps)
            servers = {"batching": serving_bench.Server(base_path, "--enable_batching"),
                       "no batching": serving_bench.Server(base_path)}
            try:
                for server in servers.values():
                    server.wait_ready()
                    serving_bench.measure(server, max(clients), 1)  # warm-up
                results = {side: {c: [] for c in clients} for side in servers}
                for r in range(repeats):
                    for c in clients:
                        sides = list(servers)[r % 2:] + list(servers)[:r % 2]
                        for side in sides:
                            results[side][c].append(serving_bench.measure(servers[side], c, seconds))
            finally:
                for server in servers.values():
                    server.stop()
        what = model_base_path or (f"synthetic ({flags.FLAGS.steps} sequential [B, {serving_bench.WIDTH}] x "
                                   f"[{serving_bench.WIDTH}, {serving_bench.WIDTH}] matmuls per call)")
        return {"results": {side: {str(c): v for c, v in r.items()} for side, r in results.items()}, "model": what}

    return {"run": run}


def serving_section(h: Harness):
    seconds = 2.0 if h.quick else 4.0
    w = h.worker("serving", "benchmarks.run:serving_worker", quick=h.quick, seconds=seconds, repeats=h.repeats,
                 model_base_path=getattr(h.args, "serving_model_base_path", None))
    out = w.call("run")
    w.close()
    h.note(f"serving: model {out['model']}; {seconds:g} s per point; servers with default flags "
           "(--max_batch_size=32 --batch_timeout_micros=1000); one-prompt gRPC Predict requests back to back")
    on, off = out["results"]["batching"], out["results"]["no batching"]
    for c in on:
        b, n = Stat(on[c]), Stat(off[c])
        h.row(f"serving {c} clients: throughput", "requests/s", b.map(lambda r: r["rps"]), "batching off",
              n.map(lambda r: r["rps"]))
        for p in ("p50", "p99"):
            h.row(f"serving {c} clients: {p} latency", "ms", b.map(lambda r, p=p: r[p]), "batching off",
                  n.map(lambda r, p=p: r[p]), higher_is_better=False)
        errors = sum(r["errors"] for r in on[c] + off[c])
        if errors:
            h.note(f"serving {c} clients: {errors} failed requests (not counted)")


# ---------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps and repeats: a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per peer (default 3; --quick 2)")
    parser.add_argument("--json", metavar="OUT", help="write the rows to this JSON file")
    parser.add_argument("--serving_model_base_path", help="serve this model in the serving section "
                                                          "(default: serving_bench's synthetic model)")
    parser.add_argument("--scale_sizes_mb", default=None, help="corpus sizes of the scale section "
                                                               "(default 10,100,1000; --quick 10)")
    parser.add_argument("--work_dir", help="keep data and worker logs here (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} in --only: use {', '.join(SECTIONS)}")
    args.sections = sections
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.worker_args))
        return 0
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="storygen-bench-")
    h = Harness(args.quick, args.repeats, work_dir, args)
    start = time.perf_counter()
    if args.json:
        h.json_path = args.json
    try:
        run_sections(h, args.sections)
    except WorkerError as e:
        print(f"benchmarks.run: {e}", file=sys.stderr)
        return 1
    finally:
        h.close()
        h.write_json()
    print(f"\nstorygen benchmarks ({'quick' if args.quick else 'full'}, {args.repeats} repeats, median and "
          f"min-max; {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s; worker logs in {h.log_dir})\n")
    print(table(h.rows, h.notes))
    return 0


if __name__ == "__main__":
    # Run as `python -m benchmarks.run`: hand over to the importable module, so that the
    # sections, which import benchmarks.run, share its one copy.
    from benchmarks import run as _run

    sys.exit(_run.main())
