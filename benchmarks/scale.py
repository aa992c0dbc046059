"""Scale: time and peak memory of ingest + tokenizer as the corpus grows (10 MB, 100 MB, 1 GB).

Part of `python -m benchmarks.run` (section `scale`). Each size is a JSONL corpus of stories from
the built-in grammar (a pool of sampled stories, cycled, each record made distinct by a running
number so that the hash split spreads them), written before timing. Ingest (pipeline defaults:
2 shards, 1024-byte windows) and then the tokenizer (4000 pieces, the pipeline default) each run
in a fresh child process, so that each step's peak RSS is its own (os.wait4 gives the child's
rusage); time per MB is from the child's own clock around the step (importing TensorFlow is
not data work).
Time is linear when the seconds per MB stay flat (ratio to the 10 MB run >= 0.8) and memory is
flat when the peak RSS grows by less than 25% (ratio >= 0.8); these are this benchmark's
thresholds, not the issue's.
"""

import json
import os
import shutil
import subprocess
import sys
import time

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


def child(step: str, data: str, out: str) -> dict:
    """In the measured process: one step (`ingest` or `tokenizer`), timed."""
    from components import ingest, tokenizer

    examples, tokenizer_dir = os.path.join(out, "examples"), os.path.join(out, "tokenizer")
    start = time.perf_counter()
    if step == "ingest":
        os.makedirs(examples)
        summary = ingest.ingest(data, examples, seed=42, eval_fraction=0.05, test_fraction=0.05, num_shards=2,
                                window_bytes=1024, max_chars=1_000_000, max_bad_fraction=0.01, builtin_count=0,
                                builtin_langs=["zh", "en"])
        return {"seconds": time.perf_counter() - start, "stories": summary.get("stories")}
    os.makedirs(tokenizer_dir)
    report = tokenizer.train_tokenizer(examples, tokenizer_dir, vocab_size=4000, seed=42)
    return {"seconds": time.perf_counter() - start, "vocab_size": report["vocab_size"]}


def measure(step: str, data: str, out: str) -> dict:
    """Runs `child` in a new process; its result, wall time and peak RSS (MB)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    start = time.perf_counter()
    args = [sys.executable, "-m", "benchmarks.scale", step, data, out] if step else [
        sys.executable, "-c", "import components.ingest, components.tokenizer; print('{}')"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"scale: the {step} child failed (status {status}); run "
                           f"`python -m benchmarks.scale {step} {data} OUT` to see why.")
    result = json.loads(output.strip().splitlines()[-1])
    return dict(result, wall_seconds=wall, peak_rss_mb=usage.ru_maxrss * 1024 / MB)


def run_section(h):
    from benchmarks.run import Stat

    sizes = [float(s) for s in (h.args.scale_sizes_mb if h.args and h.args.scale_sizes_mb else
                                ("10" if h.quick else "10,100,1000")).split(",")]
    # The small sizes again after the largest: a drifting host shows up as a spread, not as nonlinearity.
    order = sizes + ([s for s in sizes if s < max(sizes)] if len(sizes) > 1 else sizes)
    baseline = measure("", "", "")["peak_rss_mb"]
    h.note(f"scale: peak RSS of a child that only imports ingest and tokenizer: {baseline:.0f} MB")
    results = {size: [] for size in sizes}
    for size in order:
        folder = os.path.join(h.work_dir, f"scale-{size:g}")
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(folder, "corpus.jsonl")
        corpus = write_corpus(data, size)
        out = os.path.join(folder, "out")
        ingested, tokenized = measure("ingest", data, out), measure("tokenizer", data, out)
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


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:4])))
