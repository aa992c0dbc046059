"""Scale: time and peak memory of ingest + tokenizer as the corpus grows (10 MB, 100 MB, 1 GB).

Section `scale` of `python -m benchmarks.run`. Each size is a JSONL corpus of stories from the
built-in grammar (a pool of sampled stories, cycled, each record made distinct by a running
number so that the hash split spreads them), written before timing. Ingest and then the
tokenizer, both with the pipeline's defaults (`IngestConfig`, `TokenizerConfig`), each run in a
fresh worker process, so that each step's peak RSS is its own; time per MB is from the worker's
own clock around the step (importing TensorFlow is not data work).
Time is linear when the seconds per MB stay flat (ratio to the 10 MB run >= 0.8) and memory is
flat when the peak RSS grows by less than 25% (ratio >= 0.8); these are this benchmark's
thresholds, not the issue's.
"""

import json
import os
import shutil
import time

from benchmarks.harness import Stat, timed
from components.config import IngestConfig, TokenizerConfig

MB = 1_000_000


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
    RSS after it. `step` is `ingest`, `tokenizer` (on ingest's examples), or `imports` (none: the
    peak RSS of a process that only imports them)."""
    import resource

    from components import ingest, tokenizer  # imported before timing: importing TensorFlow is not data work

    examples, tokenizer_dir = os.path.join(out, "examples"), os.path.join(out, "tokenizer")

    def run_step() -> dict:
        if step == "ingest":
            os.makedirs(examples)
            return {"stories": ingest.ingest(IngestConfig(data=data), examples).get("stories")}
        if step == "tokenizer":
            os.makedirs(tokenizer_dir)
            return {"vocab_size": tokenizer.train_tokenizer(examples, tokenizer_dir, TokenizerConfig())["vocab_size"]}
        return {}

    def run():
        result = run_step()
        return dict(result, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB)

    return {"run": timed(run)}


def measure(h, step: str, data: str = "", out: str = "", prefix: str = "") -> dict:
    """Runs `step` in a new worker process (named scale-`prefix``step`, as its log is); its result,
    with the process's wall time."""
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
        ingested, tokenized = measure(h, "ingest", data, out, prefix), measure(h, "tokenizer", data, out, prefix)
        r = dict(corpus, stories=ingested["stories"], ingest_seconds=ingested["seconds"],
                 tokenizer_seconds=tokenized["seconds"], wall_seconds=ingested["wall_seconds"] + tokenized["wall_seconds"],
                 ingest_rss_mb=ingested["peak_rss_mb"], tokenizer_rss_mb=tokenized["peak_rss_mb"],
                 peak_rss_mb=max(ingested["peak_rss_mb"], tokenized["peak_rss_mb"]),
                 seconds_per_mb=(ingested["seconds"] + tokenized["seconds"]) / (corpus["bytes"] / MB))
        results[size].append(r)
        h.progress(f"  {size:g} MB: {r['ingest_seconds']:.1f} s ingest + {r['tokenizer_seconds']:.1f} s tokenizer, "
                   f"{r['seconds_per_mb']:.3f} s/MB, peak RSS ingest {r['ingest_rss_mb']:.0f} MB, tokenizer "
                   f"{r['tokenizer_rss_mb']:.0f} MB")
        shutil.rmtree(folder)
    smallest = sizes[0]
    small_time = Stat([r["seconds_per_mb"] for r in results[smallest]])
    small_rss = {step: Stat([r[f"{step}_rss_mb"] for r in results[smallest]]) for step in ("ingest", "tokenizer")}
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
        for step in ("ingest", "tokenizer"):
            rss = Stat([r[f"{step}_rss_mb"] for r in results[size]])
            if size == smallest:
                h.row(f"scale {size:g} MB: {step} peak RSS", "MB", rss, None, None)
            else:
                h.row(f"scale {size:g} MB: {step} peak RSS (flat?)", "MB", rss, f"{smallest:g} MB corpus",
                      small_rss[step], higher_is_better=False, target=0.8)
