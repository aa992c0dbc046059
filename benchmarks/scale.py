"""Scale: time and peak memory of ingest + tokenizer as the corpus grows (10 MB, 100 MB, 1 GB).

Section `scale` of `python -m benchmarks.run`. Each size is a JSONL corpus of stories from the
built-in grammar (a pool of sampled stories, cycled, each record made distinct by a running
number so that the hash split spreads them), written before timing. Ingest in process, ingest
on Apache Beam (BEAM_ARGS: two local worker processes) and then the tokenizer, all with the
pipeline's defaults (`IngestConfig`, `TokenizerConfig`), each run in a fresh worker process, so
that each step's peak RSS is its own (a Beam run's launcher and its largest worker process are
reported apart); time is from the worker's own clock around the step (importing TensorFlow and
Beam is not data work; starting Beam's worker processes is). Each size's two ingests take turns
at going first, and every step starts with the files written before it on disk (os.sync).
Time is linear when the seconds per MB stay flat (ratio to the 10 MB run >= 0.8); memory is
flat when the peak RSS grows by at most 20% from one size to the next (ratio >= 1/1.2), and
Beam's MB/s against the in-process path's has a target of 1.7x (both the issue's targets).
"""

import collections
import json
import os
import shutil
import threading
import time

from benchmarks.harness import Stat, timed
from components.config import IngestConfig, TokenizerConfig

MB = 1_000_000
BEAM_ARGS = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"


def write_corpus(path: str, size_mb: float, pool_size: int = 4000, seed: int = 7) -> dict:
    """A JSONL corpus of at least `size_mb` MB; returns its bytes and records."""
    from components import corpus

    pool = corpus.sample(pool_size, seed=seed)
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * MB:
            story = pool[records % len(pool)]
            number = records // len(pool)
            suffix = f"（第{number}个故事）" if story["lang"] == "zh" else f" (Tale {number}.)"
            line = json.dumps({"prompt": story["prompt"], "story": story["story"] + suffix, "lang": story["lang"],
                               "tags": story["tags"]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            records += 1
    return {"bytes": written, "records": records}


def step_worker(step: str, data: str, out: str):
    """Worker: one `run` op, a pipeline step on `data` into `out`, timed, with the process's peak
    RSS after it (and its largest child's: Beam's workers). `step` is `ingest`, `ingest_beam`,
    `tokenizer` (on ingest's examples), or `imports` (none: the peak RSS of a process that only
    imports them)."""
    import resource

    from components import ingest, tokenizer  # imported before timing: importing TensorFlow is not data work

    if step == "ingest_beam":
        import apache_beam  # noqa: F401 - nor is importing Beam

    examples, tokenizer_dir = os.path.join(out, "examples"), os.path.join(out, "tokenizer")

    def run_step() -> dict:
        if step.startswith("ingest"):
            folder = examples if step == "ingest" else os.path.join(out, "examples_beam")
            os.makedirs(folder)
            config = IngestConfig(data=data, beam_pipeline_args=BEAM_ARGS if step == "ingest_beam" else None)
            return {"stories": ingest.ingest(config, folder).get("stories")}
        if step == "tokenizer":
            os.makedirs(tokenizer_dir)
            return {"vocab_size": tokenizer.train_tokenizer(examples, tokenizer_dir, TokenizerConfig())["vocab_size"]}
        return {}

    def run():
        with DescendantsPeakRss() as children:
            result = run_step()
        return dict(result, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
                    child_peak_rss_mb=children.peak_mb)

    return {"run": timed(run)}


class DescendantsPeakRss:
    """The largest resident memory that any one descendant of this process had, sampled from
    /proc every 0.1 s while the `with` block runs (Linux). RUSAGE_CHILDREN cannot tell it: a
    forked child's ru_maxrss starts at its parent's RSS and keeps that across exec."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval):
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
                except (OSError, IndexError, ValueError):  # it exited meanwhile
                    continue
                self.peak_mb = max(self.peak_mb, rss)


def _descendants(root: int) -> list[int]:
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
            except (OSError, IndexError, ValueError):
                continue
            children[parent].append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def measure(h, step: str, data: str = "", out: str = "", prefix: str = "") -> dict:
    """Runs `step` in a new worker process (named scale-`prefix``step`, as its log is); its result,
    with the process's wall time."""
    os.sync()  # the files written before (the corpus, the last step's output) reach the disk off this step's clock
    start = time.perf_counter()
    w = h.worker(f"scale-{prefix}{step}", "benchmarks.scale:step_worker", step=step, data=data, out=out)
    result = w.call("run")
    w.close()
    return dict(result, wall_seconds=time.perf_counter() - start)


def run_section(h, sizes_mb: list[float] | None = None):
    """Rows of time per MB and peak RSS at each corpus size (default 10, 100, 1000 MB; --quick: 10),
    each against the smallest."""
    sizes = sizes_mb or ([10.0] if h.quick else [10.0, 100.0, 1000.0])
    # The small sizes again after the largest: a drifting host shows up as a spread, not as nonlinearity.
    order = sizes + ([s for s in sizes if s < max(sizes)] if len(sizes) > 1 else sizes)
    baseline = measure(h, "imports")["peak_rss_mb"]
    h.note(f"scale: peak RSS of a child that only imports ingest and tokenizer: {baseline:.0f} MB")
    results = {size: [] for size in sizes}
    for run, size in enumerate(order):
        folder = os.path.join(h.work_dir, f"scale-{size:g}")
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(folder, "corpus.jsonl")
        corpus = write_corpus(data, size)
        out = os.path.join(folder, "out")
        prefix = f"{run}-{size:g}MB-"  # a log per run: the small sizes run twice
        # In-process and Beam take turns at going first, so that a drifting host favours neither.
        order = ("ingest", "ingest_beam") if run % 2 == 0 else ("ingest_beam", "ingest")
        ingests = {step: measure(h, step, data, out, prefix) for step in order}
        ingested, beamed = ingests["ingest"], ingests["ingest_beam"]
        tokenized = measure(h, "tokenizer", data, out, prefix)
        assert beamed["stories"] == ingested["stories"], (beamed, ingested)
        r = dict(corpus, stories=ingested["stories"], ingest_seconds=ingested["seconds"],
                 ingest_mb_per_s=corpus["bytes"] / MB / ingested["seconds"],
                 beam_mb_per_s=corpus["bytes"] / MB / beamed["seconds"], beam_seconds=beamed["seconds"],
                 beam_launcher_rss_mb=beamed["peak_rss_mb"], beam_worker_rss_mb=beamed["child_peak_rss_mb"],
                 tokenizer_seconds=tokenized["seconds"], wall_seconds=ingested["wall_seconds"] + tokenized["wall_seconds"],
                 ingest_rss_mb=ingested["peak_rss_mb"], tokenizer_rss_mb=tokenized["peak_rss_mb"],
                 peak_rss_mb=max(ingested["peak_rss_mb"], tokenized["peak_rss_mb"]),
                 seconds_per_mb=(ingested["seconds"] + tokenized["seconds"]) / (corpus["bytes"] / MB))
        results[size].append(r)
        h.progress(f"  {size:g} MB: {r['ingest_seconds']:.1f} s ingest + {r['tokenizer_seconds']:.1f} s tokenizer, "
                   f"{r['seconds_per_mb']:.3f} s/MB, peak RSS ingest {r['ingest_rss_mb']:.0f} MB, tokenizer "
                   f"{r['tokenizer_rss_mb']:.0f} MB; Beam ingest {r['beam_seconds']:.1f} s, peak RSS launcher "
                   f"{r['beam_launcher_rss_mb']:.0f} MB, largest worker {r['beam_worker_rss_mb']:.0f} MB")
        shutil.rmtree(folder)
    smallest = sizes[0]
    small_time = Stat([r["seconds_per_mb"] for r in results[smallest]])
    rss_steps = ("ingest", "tokenizer", "beam_launcher", "beam_worker")
    for size in sizes:
        t = Stat([r["seconds_per_mb"] for r in results[size]])
        r = results[size][0]
        note = (f"{r['records']} records, {r['stories']} stories; ingest {r['ingest_seconds']:.1f} s, tokenizer "
                f"{r['tokenizer_seconds']:.1f} s, children's wall {r['wall_seconds']:.1f} s")
        if size == smallest:
            h.row(f"scale {size:g} MB: ingest+tokenizer time", "s/MB", t, None, None, note=note)
        else:
            h.row(f"scale {size:g} MB: time per MB (linear?)", "s/MB", t, f"{smallest:g} MB corpus", small_time,
                  higher_is_better=False, target=0.8, note=note)
        h.row(f"scale {size:g} MB: ingest on Beam, 2 processes", "MB/s", Stat([r["beam_mb_per_s"] for r in results[size]]),
              "in process", Stat([r["ingest_mb_per_s"] for r in results[size]]), target=1.7,
              note=f"--beam_pipeline_args='{BEAM_ARGS}'")
        previous = sizes[sizes.index(size) - 1] if size != smallest else None
        for step in rss_steps:
            rss = Stat([r[f"{step}_rss_mb"] for r in results[size]])
            if previous is None:
                h.row(f"scale {size:g} MB: {step} peak RSS", "MB", rss, None, None)
            else:  # against the size before: the "flat from 100 MB to 1 GB" is the last row
                h.row(f"scale {size:g} MB: {step} peak RSS (flat?)", "MB", rss, f"{previous:g} MB corpus",
                      Stat([r[f"{step}_rss_mb"] for r in results[previous]]), higher_is_better=False, target=1 / 1.2)
