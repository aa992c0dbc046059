"""Training throughput: storygen's trainer against the same model in PyTorch, eager and compiled.

Section `training` of `python -m benchmarks.run` (benchmarks/harness.py has the protocol).
Every peer trains on the same batches: one epoch of the pipeline's real bucketed batches of the
built-in corpus (`transform.training_batches`, shuffled and grouped by length as the trainer gets them)
is made once, and a few of them, picked evenly over the epoch's decoder lengths so that their
length mix is the epoch's, are saved as numpy arrays; each peer turns them into its own tensors
before anything is timed. A timed run is one optimizer step on each of those batches, fetching
the loss, token count and gradient norm after every step as `Trainer.fit` does.

- storygen: `components.trainer.Trainer.train_step` (the trainer's compiled step under the
  default strategy; `mixed_precision=True` for bf16; no XLA: `jit_compile` recompiles for every
  batch shape, and bucketed batches come in a hundred shapes per epoch);
- torch eager / torch.compile: `benchmarks.torch_peers.TrainStep` (nn.Transformer layers,
  AdamW fused, the same global-norm clipping; bf16: CPU autocast; compile: `dynamic=True`, the
  graph that default automatic-dynamic compilation ends up with after the second batch shape,
  compiled once instead of twice), each with OMP_WAIT_POLICY=PASSIVE and unset, the better kept.

Model FLOPs count every matmul of the model: attention projections, attention scores and
values, feed-forward, output projection, times 3 for forward and backward. MFU counts them on
each story's own lengths (useful FLOPs: padding does not count); the note beside it gives the
FLOP/s on the padded batch shapes, which is what both frameworks compute.
MFU divides achieved FLOP/s by the best large-matmul FLOP/s of this machine, measured in the same
run with tf.matmul and torch.mm (2048 and, in the full run, 4096 square; before and after the
training runs; the highest of all).

Where storygen's step spends its time, at each precision: one pass over the timed batches under
TensorFlow's profiler in a worker that runs one op at a time (inter-op parallelism 1, so the ops'
times add up to the pass's), its ops' time summed by part of the model (`step_parts`), in the
section's notes. CPU only: on a GPU the host's op times are launches, not the kernels.
"""

import collections
import dataclasses
import glob
import json
import os
import re
import time

from benchmarks.harness import OMP_SETTINGS, alternate, best_setting, setting_name, setting_of, settings, timed
from components.common import OUTPUT_LOSS_LOOP, PAD_ID
from components.config import IngestConfig, ModelConfig, TokenizerConfig, TrainingConfig

# The full run's model (the decoding section's too): d_model 256, 4+4 layers, feed-forward 1024,
# vocabulary 8000 (the built-in corpus's tokenizer stops at ~1700 pieces, so the ids use only part
# of it; the matmuls are full size), no dropout; heads and lengths are the pipeline's defaults.
MODEL = ModelConfig(d_model=256, num_layers=4, ff_dim=1024, vocab_size=8000, dropout=0.0)
# --quick's: tiny, with the trained tokenizer's vocabulary (0: take the tokenizer's size).
QUICK_MODEL = ModelConfig(d_model=64, num_layers=1, num_heads=2, ff_dim=256, vocab_size=0, dropout=0.0)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the section trains and on what; all else (batch size, seed, splits) is the pipeline's default."""

    model: ModelConfig
    ingest: IngestConfig
    tokenizer: TokenizerConfig
    timed_batches: int
    training: TrainingConfig = TrainingConfig()


def setup(quick: bool) -> Setup:
    if quick:
        return Setup(QUICK_MODEL, IngestConfig(builtin_count=1000), TokenizerConfig(vocab_size=2000), timed_batches=2)
    return Setup(MODEL, IngestConfig(), TokenizerConfig(vocab_size=8000), timed_batches=4)


# ---------------------------------------------------------------------- FLOPs


def forward_flops(batch: int, encoder_length: int, decoder_length: int, *, d_model: int, num_layers: int,
                  ff_dim: int, vocab_size: int, **_) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass on a [batch, S] x [batch, T] batch."""
    b, s, t, d = batch, encoder_length, decoder_length, d_model
    encoder_layer = (8 * b * s * d * d          # q, k, v and output projections
                     + 4 * b * s * s * d        # scores q.k and the weighted sum of values
                     + 4 * b * s * d * ff_dim)  # two feed-forward matmuls
    decoder_layer = (8 * b * t * d * d + 4 * b * t * t * d         # causal self-attention (full matrices)
                     + 4 * b * t * d * d + 4 * b * s * d * d       # cross-attention: q, output; k, v of the prompt
                     + 4 * b * t * s * d                           # cross-attention scores and values
                     + 4 * b * t * d * ff_dim)
    output = 2 * b * t * d * vocab_size  # tied output projection
    return num_layers * (encoder_layer + decoder_layer) + output


def training_flops(batch: int, encoder_length: int, decoder_length: int, **model_config) -> int:
    """Forward and backward (the backward pass does twice the forward's matmuls)."""
    return 3 * forward_flops(batch, encoder_length, decoder_length, **model_config)


# ---------------------------------------------------------------------- the batches


def representative(lengths: list[int], count: int) -> list[int]:
    """Indices of `count` batches picked evenly over the sorted lengths (the epoch's mix in small).

    >>> representative([50, 10, 40, 20, 30], 2)
    [3, 2]
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[min(len(order) - 1, int((k + 0.5) * len(order) / count))] for k in range(count)]


def padding_stats(batches) -> dict:
    """Padded share of the token slots of (encoder_ids, decoder_ids, targets) numpy batches."""
    import numpy as np

    slots = {"encoder": 0, "decoder": 0}
    real = {"encoder": 0, "decoder": 0}
    for encoder_ids, _, targets in batches:
        slots["encoder"] += encoder_ids.size
        real["encoder"] += int(np.count_nonzero(encoder_ids != PAD_ID))
        slots["decoder"] += targets.size
        real["decoder"] += int(np.count_nonzero(targets != PAD_ID))
    waste = {k: 1 - real[k] / max(slots[k], 1) for k in slots}
    waste["all"] = 1 - sum(real.values()) / max(sum(slots.values()), 1)
    return waste


def prepare(out_dir: str, quick: bool) -> dict:
    """Ingest the built-in corpus, train the tokenizer, make one epoch of training batches and
    save the representative ones to batches.npz. Returns what the peers and the report need."""
    import numpy as np

    from components import ingest, tokenizer, transform

    s = setup(quick)
    examples, tokenizer_dir = os.path.join(out_dir, "examples"), os.path.join(out_dir, "tokenizer")
    os.makedirs(examples, exist_ok=True)
    os.makedirs(tokenizer_dir, exist_ok=True)
    ingest.ingest(s.ingest, examples)
    report = tokenizer.train_tokenizer(examples, tokenizer_dir, s.tokenizer)
    tok = tokenizer.make_tokenizer(tokenizer.load_proto(tokenizer_dir))
    data = transform.training_batches(examples, "train", tok, batch_size=s.training.batch_size, shuffle=True,
                                      seed=s.training.seed, max_prompt_tokens=s.model.max_prompt_tokens,
                                      max_story_tokens=s.model.max_story_tokens)
    steps = transform.batches_per_epoch(examples, "train", s.training.batch_size)
    epoch = [(e.numpy(), d.numpy(), t.numpy()) for (e, d), t in data.take(steps)]
    chosen = representative([t.shape[1] for _, _, t in epoch], s.timed_batches)
    arrays = {}
    for i, index in enumerate(chosen):
        for name, array in zip(("encoder", "decoder", "targets"), epoch[index]):
            arrays[f"{name}_{i}"] = array
    np.savez(os.path.join(out_dir, "batches.npz"), **arrays)
    model_config = dataclasses.replace(s.model, vocab_size=max(s.model.vocab_size, report["vocab_size"]))
    return {"examples_dir": examples, "tokenizer_dir": tokenizer_dir, "batches": os.path.join(out_dir, "batches.npz"),
            "model_config": dataclasses.asdict(model_config), "tokenizer_vocab": report["vocab_size"],
            "epoch_batches": len(epoch), "epoch_examples": sum(t.shape[0] for _, _, t in epoch),
            "epoch_mean_decoder_length": float(np.mean([t.shape[1] for _, _, t in epoch])),
            "sample_decoder_lengths": [int(epoch[i][2].shape[1]) for i in chosen],
            "sample_encoder_lengths": [int(epoch[i][0].shape[1]) for i in chosen],
            "padding": padding_stats(epoch), "sample_padding": padding_stats([epoch[i] for i in chosen])}


def load_batches(path: str) -> list:
    import numpy as np

    with np.load(path) as arrays:
        count = sum(1 for name in arrays.files if name.startswith("targets_"))
        return [(arrays[f"encoder_{i}"], arrays[f"decoder_{i}"], arrays[f"targets_{i}"]) for i in range(count)]


def batches_work(batches, model_config) -> dict:
    """Examples, non-padding target tokens and training FLOPs of one pass over the batches:
    `flops` on the padded batch shapes (what both frameworks compute), `useful_flops` on each
    story's own prompt and story lengths (what MFU counts)."""
    import numpy as np

    useful = 0
    for encoder_ids, _, targets in batches:
        for s, t in zip(np.count_nonzero(encoder_ids != PAD_ID, axis=1), np.count_nonzero(targets != PAD_ID, axis=1)):
            useful += training_flops(1, int(s), int(t), **model_config)
    return {"examples": sum(int(t.shape[0]) for _, _, t in batches),
            "tokens": sum(int(np.count_nonzero(t != PAD_ID)) for _, _, t in batches),
            "flops": sum(training_flops(t.shape[0], e.shape[1], t.shape[1], **model_config) for e, _, t in batches),
            "useful_flops": useful}


# ---------------------------------------------------------------------- where the step's time goes


def traced_ops(log_dir: str) -> list:
    """(op name, op type, ms) of every TensorFlow op that ran on the host's compute threads in
    the newest profile under `log_dir` (TensorFlow's trace names an op's event "name:type")."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb")))[-1], "rb") as f:
        space.ParseFromString(f.read())
    op_event = re.compile(r"^([^ :]+):(\w+)$")
    ops = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):
                for event in line.events:
                    match = op_event.match(plane.event_metadata[event.metadata_id].name)
                    if match:
                        ops.append((match[1], match[2], event.duration_ps / 1e9))
    return ops


def step_part(name: str, op_type: str, optimizer: str) -> str:
    """The part of storygen's training step that an op (by its name and type) belongs to.

    >>> step_part("gradient_tape/decoder_0_1/self_attention_layer_norm_1/mul", "Mul", "adam_w")
    'layer norms'
    >>> step_part("decoder_1_1/self_attention_1/MatMul", "_MklBatchMatMulV2", "adam_w")
    'attention: scores and weighted values (matmuls)'
    """
    matmul = "MatMul" in op_type or "Einsum" in op_type
    if name.startswith((optimizer + "/", "clip_by_global_norm", "global_norm")):
        return "optimizer and gradient clipping"
    if re.search(f"(^|/){OUTPUT_LOSS_LOOP}/", name):  # the ops of the chunked output loss's loop
        return "output projection and loss: matmuls" if matmul else "output loss: softmax, casts, gradient"
    if re.search(r"_norm(_\d+)?/", name):  # the blocks' *_layer_norm, encoder_norm, decoder_norm
        return "layer norms"
    if "attention" in name:
        if "BatchMatMul" in op_type:
            return "attention: scores and weighted values (matmuls)"
        return "attention: query/key/value/output projections" if matmul else "attention: softmax, mask, casts"
    if "feedforward" in name:
        return "feed-forward: matmuls" if matmul else "feed-forward: bias, relu"
    return "matmuls elsewhere" if matmul else "other"


def step_parts(ops, optimizer: str) -> dict:
    """{part: ms} of `traced_ops`' list, by `step_part`."""
    parts = collections.Counter()
    for name, op_type, ms in ops:
        parts[step_part(name, op_type, optimizer)] += ms
    return dict(parts)


# ---------------------------------------------------------------------- the peers (worker processes)

STORYGEN_WORKER = "benchmarks.training:storygen_worker"
TORCH_WORKER = "benchmarks.training:torch_worker"
TORCH_MODES = {"eager": "torch eager", "compile": "torch.compile"}


def prepare_worker(out_dir: str, quick: bool):
    """Worker: one `prepare` op."""
    return {"prepare": lambda: prepare(out_dir, quick)}


def prepare_in_worker(h) -> dict:
    """The training data (ingest, tokenizer, batches), made in a worker process; see `prepare`."""
    w = h.worker("prepare", "benchmarks.training:prepare_worker", out_dir=h.work_dir, quick=h.quick)
    prepared = w.call("prepare")
    w.close()
    return prepared


def tf_matmul_peak(dtype: str, n: int = 2048, seconds: float = 1.0) -> float:
    import tensorflow as tf

    a = tf.cast(tf.random.normal([n, n]), dtype)
    b = tf.cast(tf.random.normal([n, n]), dtype)
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    matmul(a, b).numpy()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def storygen_worker(batches_path: str, model_config: dict, mixed_precision: bool, one_op_at_a_time: bool = False):
    """Worker: storygen's Trainer step on the saved batches, in order, one step per batch.
    `one_op_at_a_time`: inter-op parallelism 1, for `profile`."""
    import keras
    import tensorflow as tf

    from components.trainer import Trainer

    if one_op_at_a_time:
        tf.config.threading.set_inter_op_parallelism_threads(1)  # before the first op runs
    batches = load_batches(batches_path)
    keras.utils.set_random_seed(0)
    # The learning-rate schedule does not change a step's cost; this one never ends.
    trainer = Trainer(ModelConfig(**model_config), TrainingConfig(mixed_precision=mixed_precision),
                      total_steps=1_000_000)
    dataset = None
    for encoder_ids, decoder_ids, targets in batches:
        one = tf.data.Dataset.from_tensors(((encoder_ids, decoder_ids), targets))
        dataset = one if dataset is None else dataset.concatenate(one)
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset.repeat()))
    work = batches_work(batches, model_config)

    def run():
        tokens = 0.0
        for _ in batches:
            loss_sum, batch_tokens, norm = trainer.train_step(iterator)
            # As Trainer.fit does after every step.
            loss_sum, batch_tokens, norm = float(loss_sum), float(batch_tokens), float(norm)
            tokens += batch_tokens
        assert int(tokens) == work["tokens"], (tokens, work["tokens"])
        return work

    timed_run = timed(run)

    def profile(log_dir: str) -> dict:
        """One run under TensorFlow's profiler: its seconds and {part: ms} (`step_parts`)."""
        tf.profiler.experimental.start(log_dir)
        try:
            seconds = timed_run()["seconds"]
        finally:
            tf.profiler.experimental.stop()
        return {"seconds": seconds, "parts": step_parts(traced_ops(log_dir), trainer.optimizer.name)}

    return {"info": lambda: {"mixed_precision": trainer.mixed_precision,
                             "gpu": bool(tf.config.list_logical_devices("GPU")), **work},
            "run": timed_run, "peak": tf_matmul_peak, "profile": profile}


def torch_worker(batches_path: str, model_config: dict, compile: bool, bf16: bool):
    """Worker: the PyTorch peer's step on the saved batches (converted to torch tensors first)."""
    import torch

    from benchmarks import torch_peers

    torch.manual_seed(0)
    batches = load_batches(batches_path)
    tensors = [tuple(torch.from_numpy(a.astype("int64")) for a in batch) for batch in batches]
    step = torch_peers.TrainStep(torch_peers.make_model(model_config), compile=compile, bf16=bf16)
    work = batches_work(batches, model_config)

    def run():
        tokens = 0
        for encoder_ids, decoder_ids, targets in tensors:
            tokens += step(encoder_ids, decoder_ids, targets)[1]
        assert tokens == work["tokens"], (tokens, work["tokens"])
        return work

    def peak(dtype: str, n: int = 2048, seconds: float = 1.0):
        return torch_peers.matmul_flops_per_second(n, getattr(torch, dtype), seconds)

    return {"info": lambda: {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get(
                "OMP_WAIT_POLICY", "unset"), **work},
            "run": timed(run), "peak": peak}


# ---------------------------------------------------------------------- the section


class MatmulPeaks:
    """The machine's matmul peak, from both libraries, alternating; measured before and after the
    training runs (a busy shared host lowers it for a while), the best of all kept."""

    def __init__(self, h, prep: dict):
        self.h = h
        self.sizes = (2048,) if h.quick else (2048, 4096)
        common = dict(batches_path=prep["batches"], model_config=prep["model_config"])
        self.workers = {"tf": h.worker("peak-tf", STORYGEN_WORKER, mixed_precision=False, **common),
                        "torch": h.worker("peak-torch", TORCH_WORKER, env={"OMP_WAIT_POLICY": "PASSIVE"},
                                          compile=False, bf16=False, **common)}
        self.best = {"float32": {}, "bfloat16": {}}  # {dtype: {(framework, n): FLOP/s}}

    def measure(self):
        for dtype, runs in self.best.items():
            for n in self.sizes:
                stats = alternate({name: (lambda w=w: w.call("peak", dtype=dtype, n=n, seconds=1.0))
                                   for name, w in self.workers.items()}, repeats=2)
                for name, stat in stats.items():
                    runs[(name, n)] = max(runs.get((name, n), 0.0), stat.max)

    def close(self) -> dict:
        """Closes the workers; returns {dtype: peak FLOP/s} and notes who reached it."""
        for w in self.workers.values():
            w.close()
        peaks = {}
        for dtype, runs in self.best.items():
            (framework, n), peaks[dtype] = max(runs.items(), key=lambda item: item[1])
            self.h.note(f"matmul peak {dtype}: {peaks[dtype] / 1e9:.0f} GFLOP/s "
                        f"({'tf.matmul' if framework == 'tf' else 'torch.mm'} {n}x{n}); "
                        + ", ".join(f"{f} {m}: {v / 1e9:.0f}" for (f, m), v in sorted(runs.items()))
                        + " GFLOP/s (best of 2 x 1 s each, before and after the training runs)")
        return peaks


def time_peers(h, prep: dict, precision: str):
    """storygen and the torch peers (eager and compiled, each OMP setting) timed in turns at one
    precision: a Stat of run results per peer; None when this CPU has no bf16."""
    bf16 = precision == "bf16"
    common = dict(batches_path=prep["batches"], model_config=prep["model_config"])
    workers = {"storygen": h.worker(f"storygen-{precision}", STORYGEN_WORKER, mixed_precision=bf16, **common)}
    try:
        if bf16 and not workers["storygen"].call("info")["mixed_precision"]:
            h.note("training bf16: this CPU has no bf16 support; skipped")
            return None
        for mode in TORCH_MODES:
            for setting in settings(h, OMP_SETTINGS):
                workers[f"torch {mode} OMP {setting_name(setting)}"] = h.worker(
                    f"torch-{mode}-{precision}-{setting_name(setting)}", TORCH_WORKER, env={"OMP_WAIT_POLICY": setting},
                    compile=mode == "compile", bf16=bf16, **common)
        for w in workers.values():
            w.call("run")  # warm-up: tracing, torch.compile, oneDNN primitive caches
        return alternate({name: (lambda w=w: w.call("run")) for name, w in workers.items()}, repeats=h.repeats)
    finally:
        for w in workers.values():
            w.close()


def report(h, precision: str, results: dict, peak: float) -> float:
    """The rows of one precision (tokens/s and MFU against each torch peer, MFU against the
    peak); returns storygen's examples/s."""
    rates = {name: s.map(lambda r: r["tokens"] / r["seconds"]) for name, s in results.items()}
    flops = {name: s.map(lambda r: r["useful_flops"] / r["seconds"]) for name, s in results.items()}
    padded_flops = results["storygen"].map(lambda r: r["flops"] / r["seconds"])
    mfu = flops["storygen"].scale(100 / peak)
    for mode, label in TORCH_MODES.items():
        best = best_setting(h, f"training {precision} {label}", rates,
                            [n for n in rates if n.startswith(f"torch {mode} ")], "OMP_WAIT_POLICY")
        h.row(f"training {precision}: tokens/s vs {label}", "tokens/s", rates["storygen"],
              f"{label} {precision}, OMP {setting_of(best)}", rates[best], target=1.5)
        h.row(f"training {precision}: MFU vs {label}", "% of peak", mfu, label, flops[best].scale(100 / peak))
    h.row(f"training {precision}: MFU", "% of peak", mfu, f"{precision} matmul peak {peak / 1e9:.0f} GFLOP/s", 100.0,
          target=0.60 if precision == "bf16" else 0.70,
          note=f"storygen {flops['storygen'].median / 1e9:.0f} GFLOP/s useful, "
               f"{padded_flops.median / 1e9:.0f} GFLOP/s on the padded shapes")
    return results["storygen"].map(lambda r: r["examples"] / r["seconds"]).median


def run_section(h, prep: dict) -> dict:
    """Measures every peer; adds rows to the harness `h`; returns storygen's best examples/s
    (the input pipeline section compares with it)."""
    h.note(f"training: {prep['epoch_batches']} batches of {setup(h.quick).training.batch_size} per epoch "
           f"(built-in corpus, tokenizer {prep['tokenizer_vocab']} pieces); timed on "
           f"{len(prep['sample_decoder_lengths'])} of them, decoder lengths {prep['sample_decoder_lengths']} "
           f"(epoch mean {prep['epoch_mean_decoder_length']:.0f}); model {json.dumps(prep['model_config'])}")
    padding = prep["padding"]
    h.row("training: padding waste (one epoch)", "% real slots", 100 * (1 - padding["all"]), "no padding", 100.0,
          target=0.95, note=f"padded slots: {100 * padding['all']:.1f}% (targets {100 * padding['decoder']:.1f}%, "
                            f"prompts {100 * padding['encoder']:.1f}%)")
    peaks = MatmulPeaks(h, prep)
    peaks.measure()
    results = {precision: time_peers(h, prep, precision) for precision in ("fp32", "bf16")}
    peaks.measure()
    peak = peaks.close()
    examples = [report(h, precision, stats, peak["bfloat16" if precision == "bf16" else "float32"])
                for precision, stats in results.items() if stats is not None]
    for precision in (p for p, stats in results.items() if stats is not None):
        profile = profile_in_worker(h, prep, precision)
        if profile:
            h.note(profile_note(precision, profile))
    return {"examples_per_second": max(examples)}


def profile_in_worker(h, prep: dict, precision: str) -> dict | None:
    """storygen's step at one precision, profiled in a worker of its own (see `step_parts`):
    {"seconds", "parts"}; None on a GPU."""
    w = h.worker(f"profile-{precision}", STORYGEN_WORKER, batches_path=prep["batches"],
                 model_config=prep["model_config"], mixed_precision=precision == "bf16", one_op_at_a_time=True)
    try:
        if w.call("info")["gpu"]:
            h.note(f"training {precision}: no profile on a GPU (it reads the CPU's op times)")
            return None
        w.call("run")  # warm-up: tracing
        return w.call("profile", log_dir=os.path.join(h.work_dir, f"profile-{precision}"))
    finally:
        w.close()


def profile_note(precision: str, profile: dict) -> str:
    """The profile as one note line, the largest part first."""
    parts, total = profile["parts"], sum(profile["parts"].values())
    return (f"training {precision}: where storygen's step spends its time (op time, one op at a time; "
            f"{total:.0f} ms of the pass's {1000 * profile['seconds']:.0f}): "
            + ", ".join(f"{part} {ms:.0f} ms ({100 * ms / total:.0f}%)"
                        for part, ms in sorted(parts.items(), key=lambda item: -item[1])))
