"""Tests of the benchmarks (benchmarks/harness.py, the section modules, the `benchmarks.run`
command): the FLOP counter, the row format and ratio orientation, the worker protocol, the
command line, and the PyTorch peer's cached decoding. The PyTorch tests skip when torch is not
installed (CI installs '.[dev,beam]', without the [bench] extra)."""

import ast
import glob
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ is not an installed package

from benchmarks import harness, training  # noqa: E402


def test_forward_flops_hand_computed():
    # B=2, S=3, T=5, d=4, ff=8, V=10, one layer of each, counted by hand:
    # encoder: projections 8*2*3*4*4=768, attention 4*2*3*3*4=288, feed-forward 4*2*3*4*8=768 -> 1824
    # decoder: self projections 8*2*5*4*4=1280, self attention 4*2*5*5*4=800,
    #          cross q+out 4*2*5*4*4=640, cross k+v 4*2*3*4*4=384, cross attention 4*2*5*3*4=480,
    #          feed-forward 4*2*5*4*8=1280 -> 4864
    # output projection 2*2*5*4*10=800
    config = dict(d_model=4, num_layers=1, ff_dim=8, vocab_size=10, num_heads=2, max_prompt_tokens=9)
    assert training.forward_flops(2, 3, 5, **config) == 1824 + 4864 + 800
    assert training.training_flops(2, 3, 5, **config) == 3 * (1824 + 4864 + 800)
    # Layers add linearly; the output projection does not repeat.
    assert training.forward_flops(2, 3, 5, **dict(config, num_layers=3)) == 3 * (1824 + 4864) + 800


def test_representative_batches_and_padding():
    assert training.representative([50, 10, 40, 20, 30], 2) == [3, 2]
    assert sorted(training.representative(list(range(8)), 8)) == list(range(8))
    np = pytest.importorskip("numpy")
    batch = (np.array([[2, 5, 0, 0]]), np.array([[2, 7, 8, 0]]), np.array([[7, 8, 3, 0]]))
    waste = training.padding_stats([batch])
    assert waste == {"encoder": 0.5, "decoder": 0.25, "all": 3 / 8}


def test_useful_flops_count_each_story_at_its_own_lengths():
    np = pytest.importorskip("numpy")
    config = dict(d_model=4, num_layers=1, ff_dim=8, vocab_size=10)
    # Two stories padded to prompt 3 and story 4: (prompt 3, story 2) and (prompt 1, story 4).
    batch = (np.array([[2, 5, 6], [2, 0, 0]]), np.array([[2, 7, 0, 0], [2, 7, 8, 9]]),
             np.array([[7, 3, 0, 0], [7, 8, 9, 3]]))
    work = training.batches_work([batch], config)
    assert work["examples"] == 2 and work["tokens"] == 6
    assert work["flops"] == training.training_flops(2, 3, 4, **config)
    assert work["useful_flops"] == training.training_flops(1, 3, 2, **config) + training.training_flops(1, 1, 4, **config)
    assert work["useful_flops"] < work["flops"]


def test_step_part_of_ops_named_as_in_the_trainers_step():
    ops = {  # (name, type) as TensorFlow's trace names them in a training step: part
        ("output_loss/body/_1/output_loss/MatMul", "_MklMatMul"): "output projection and loss: matmuls",
        ("output_loss/body/_1/output_loss/Softmax", "_MklSoftmax"): "output loss: softmax, casts, gradient",
        ("decoder_0_1/self_attention_1/query_1/einsum/Einsum", "_MklEinsum"):
            "attention: query/key/value/output projections",
        ("gradient_tape/decoder_2_1/cross_attention_1/MatMul_1/MatMul", "_MklBatchMatMulV2"):
            "attention: scores and weighted values (matmuls)",
        ("decoder_1_1/self_attention_1/Softmax", "_MklSoftmax"): "attention: softmax, mask, casts",
        # A norm inside a block whose name says attention or feedforward is a norm.
        ("gradient_tape/decoder_0_1/self_attention_layer_norm_1/mul", "Mul"): "layer norms",
        ("encoder_1_1/feedforward_layer_norm_1/Rsqrt", "Rsqrt"): "layer norms",
        ("decoder_norm_1/moments/mean", "Mean"): "layer norms",
        ("decoder_3_1/feedforward_intermediate_dense_1/Tensordot/MatMul", "_MklMatMul"): "feed-forward: matmuls",
        ("gradient_tape/decoder_3_1/feedforward_intermediate_dense_1/ReluGrad", "ReluGrad"):
            "feed-forward: bias, relu",
        ("adam_w/Sub_733/ReadVariableOp", "ReadVariableOp"): "optimizer and gradient clipping",
        ("clip_by_global_norm/mul_2", "Mul"): "optimizer and gradient clipping",
        ("decoder_embedding_1/GatherV2", "GatherV2"): "other",
        # Another loop's ops are not the output loss's.
        ("while/body/_1/while/MatMul", "_MklMatMul"): "matmuls elsewhere",
    }
    for (name, op_type), part in ops.items():
        assert training.step_part(name, op_type, "adam_w") == part, name
    assert training.step_parts([("adam_w/Mul", "Mul", 1.5), ("global_norm/Sum", "Sum", 2.0),
                                ("output_loss/body/_1/output_loss/MatMul_2", "_MklMatMul", 4.0)], "adam_w") == {
        "optimizer and gradient clipping": 3.5, "output projection and loss: matmuls": 4.0}


@pytest.mark.slow
def test_quick_training_profile_adds_up_to_the_pass(tmp_path):
    """The training section's profile of storygen's step (--quick's model, fp32) in its worker: one
    op at a time, so the parts' op time is most of the profiled pass and never more."""
    h = harness.Harness(quick=True, repeats=1, work_dir=str(tmp_path))
    try:
        profile = training.profile_in_worker(h, training.prepare_in_worker(h), "fp32")
    finally:
        h.close()
    parts, total_ms = profile["parts"], sum(profile["parts"].values())
    assert 0.5 * 1000 * profile["seconds"] < total_ms <= 1000 * profile["seconds"]
    for part in ("output projection and loss: matmuls", "feed-forward: matmuls", "layer norms",
                 "attention: scores and weighted values (matmuls)", "optimizer and gradient clipping"):
        assert parts[part] > 0, part
    assert parts.get("matmuls elsewhere", 0) == 0 and parts["other"] < 0.25 * total_ms
    assert training.profile_note("fp32", profile).startswith("training fp32: where storygen's step spends its time")


def test_rows_are_oriented_so_that_higher_is_better():
    faster = harness.make_row("rate", "tokens/s", harness.Stat([90.0, 100.0, 120.0]), "peer",
                              harness.Stat([40.0, 50.0, 70.0]), target=1.5)
    assert list(faster) == list(harness.ROW_KEYS)
    assert (faster["ours"], faster["peer_value"], faster["ratio"], faster["target"]) == (100.0, 50.0, 2.0, 1.5)
    assert harness.met(faster) is True
    # A latency: lower is better, so the ratio is peer / ours.
    slower = harness.make_row("p50", "ms", 20.0, "peer", 10.0, higher_is_better=False)
    assert slower["ratio"] == 0.5 and slower["target"] is None and harness.met(slower) is None
    assert harness.make_row("alone", "s/MB", 1.0, None, None)["ratio"] is None


def test_alternate_rotates_who_goes_first():
    calls = []
    stats = harness.alternate({name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}, repeats=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert stats["a"].values == [1, 6, 8] and stats["a"].median == 6 and stats["a"].spread() == "1-8"


def process_state(pid, wanted, seconds=5.0):
    """The process's state letter from /proc, waiting up to `seconds` for `wanted` (signals land asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(") ", 1)[1][0]
        if state == wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def test_worker_protocol_and_json_for_a_fake_section(tmp_path):
    h = harness.Harness(quick=True, repeats=3, work_dir=str(tmp_path))
    try:
        ours = h.worker("ours", "benchmarks.harness:selftest_worker", scale=3.0)
        peer = h.worker("peer", "benchmarks.harness:selftest_worker", scale=2.0)
        assert ours.call("times", x=2) == 6.0
        # Between calls a worker is stopped, so it cannot take CPU from the peer being timed.
        assert process_state(ours.proc.pid, wanted="T") == "T"
        stats = harness.alternate({"ours": lambda: ours.call("times", x=10), "peer": lambda: peer.call("times", x=10)}, 3)
        h.section = "fake"
        h.row("fake: rate", "items/s", stats["ours"], "peer", stats["peer"], target=1.4)
        h.row("fake: latency", "ms", stats["ours"], "peer", stats["peer"], higher_is_better=False)
        with pytest.raises(harness.WorkerError, match="ZeroDivisionError"):
            ours.call("fail")
        assert ours.call("times", x=1) == 3.0  # a failed op leaves the worker usable
    finally:
        h.close()
    assert ours.proc.returncode == 0 and peer.proc.returncode == 0
    rows = [row for _, row, _, _ in h.rows]
    assert [(r["ours"], r["peer_value"], r["ratio"]) for r in rows] == [(30.0, 20.0, 1.5), (30.0, 20.0, 20.0 / 30.0)]
    assert json.loads(json.dumps(rows)) == rows
    printed = harness.table(h.rows, h.notes)
    assert "fake: rate" in printed and "1.50x" in printed and "yes" in printed


def test_best_setting_keeps_the_faster_and_notes_them_all(tmp_path):
    h = harness.Harness(quick=False, repeats=1, work_dir=str(tmp_path))
    rates = {"storygen": harness.Stat([9.0]), "torch OMP PASSIVE": harness.Stat([3.0]),
             "torch OMP unset": harness.Stat([4.0])}
    best = harness.best_setting(h, "decoding torch", rates, ["torch OMP PASSIVE", "torch OMP unset"], "OMP_WAIT_POLICY")
    assert best == "torch OMP unset" and harness.setting_of(best) == "unset"
    assert h.notes == ["decoding torch: OMP_WAIT_POLICY=PASSIVE 3 tokens/s, OMP_WAIT_POLICY=unset 4 tokens/s -> unset"]
    # One setting (--quick): nothing to choose, nothing to note.
    assert harness.best_setting(h, "quick", rates, ["torch OMP PASSIVE"], "OMP_WAIT_POLICY") == "torch OMP PASSIVE"
    assert len(h.notes) == 1
    assert harness.settings(h, harness.INTRA_OP_SETTINGS) == (None, 1)
    assert harness.settings(harness.Harness(quick=True, repeats=1, work_dir=str(tmp_path)),
                            harness.INTRA_OP_SETTINGS) == (None,)


def test_timed_adds_the_seconds_of_one_call():
    def sleep(seconds):
        time.sleep(seconds)
        return {"slept": seconds}

    result = harness.timed(sleep)(seconds=0.05)
    assert result["slept"] == 0.05 and 0.05 <= result["seconds"] < 5


def test_sections_import_the_harness_not_the_entry_point():
    """No import circle: only benchmarks/run.py imports the sections, and nothing imports it."""
    for path in glob.glob(os.path.join(REPO, "benchmarks", "*.py")):
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        assert "benchmarks.run" not in imported, path


def benchmarks_command(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_rejects_bad_flags_before_any_work():
    for args, message in ((["--only", "training,nonsense"], "unknown section(s) nonsense in --only"),
                          (["--scale_sizes_mb", "10,x"], "positive numbers"),
                          (["stray"], "unexpected arguments stray")):
        proc = benchmarks_command(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("python -m benchmarks.run: error: ") and message in proc.stderr
    usage = benchmarks_command("--help").stdout
    assert "--only" in usage and "input_pipeline" in usage and "--worker" not in usage  # internal: --helpfull
    assert "--worker_args" in benchmarks_command("--helpfull").stdout


def test_the_command_loads_no_tensorflow_or_torch():
    """`--help` and the harness process stay light: only worker processes import TensorFlow or torch."""
    code = "import sys, benchmarks.run; print(sorted({'tensorflow', 'torch', 'keras'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_torch_cached_greedy_equals_uncached():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_peers

    torch.manual_seed(0)
    model = torch_peers.TorchStoryTransformer(vocab_size=60, max_prompt_tokens=10, max_story_tokens=24, d_model=16,
                                              num_layers=2, num_heads=2, ff_dim=32).double()
    # Two prompts, one padded: the cache must respect the prompt's padding mask too.
    prompts = torch.tensor([[2, 5, 6, 7, 0, 0], [2, 8, 9, 10, 11, 12]])
    cached = torch_peers.CachedDecoder(model).generate(prompts, 20)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, torch_peers.greedy_recompute(model, prompts, 20))
    assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant sequence


def test_torch_train_step_matches_the_loss_definition():
    torch = pytest.importorskip("torch")
    from benchmarks import torch_peers

    torch.manual_seed(0)
    config = dict(vocab_size=40, max_prompt_tokens=8, max_story_tokens=8, d_model=16, num_layers=1, num_heads=2,
                  ff_dim=32)
    model = torch_peers.make_model(config)
    encoder_ids = torch.tensor([[2, 5, 6, 0], [2, 7, 8, 9]])
    decoder_ids = torch.tensor([[2, 10, 11, 12, 0], [2, 13, 14, 0, 0]])
    targets = torch.tensor([[10, 11, 12, 3, 0], [13, 14, 3, 0, 0]])
    with torch.no_grad():
        logits = model(encoder_ids, decoder_ids)
    expected = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0], reduction="sum")
    step = torch_peers.TrainStep(model, clip_norm=1e-6)
    loss_sum, tokens, norm = step(encoder_ids, decoder_ids, targets)
    assert tokens == 7 and loss_sum == pytest.approx(float(expected), rel=1e-5) and norm > 1e-6
    # Embeddings are not decayed, matrices are.
    groups = step.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert any(p is model.decoder_token.weight for p in groups[1]["params"])


def run_quick_section(tmp_path, section, *flags):
    """`python -m benchmarks.run --quick --only SECTION --repeats 1 --json`: the process and its rows."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", section,
                           "--repeats", "1", "--json", str(out), "--work_dir", str(tmp_path / "work"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_quick_input_pipeline_end_to_end(tmp_path):
    """The real thing, smallest: `--quick --only input_pipeline --json` (ingest, tokenizer, tf.data, trainer)."""
    proc, (row,) = run_quick_section(tmp_path, "input_pipeline")
    assert row["name"] == "input pipeline: examples/s vs trainer" and row["target"] == 10.0
    assert row["ours"] > 0 and row["peer_value"] > 0
    assert row["ratio"] == pytest.approx(row["ours"] / row["peer_value"])
    assert "input pipeline: examples/s vs trainer" in proc.stdout


@pytest.mark.slow
def test_quick_pretrained_decoding_rows(tmp_path):
    """`--quick --only decoding_t5gemma`: a tiny random preset, exported by storygen and decoded
    by keras-hub in a tf.function and with XLA; one row per keras-hub peer and batch size. Checks
    the rows' structure, not their speed (the export alone takes about 20 s on 2 CPUs).
    `decoding_t5` is the same code on another preset (benchmarks/decoding.py's PRETRAINED)."""
    section, name = "decoding_t5gemma", "T5Gemma"
    proc, rows = run_quick_section(tmp_path, section)
    peers = ("keras-hub graph", "keras-hub XLA")
    assert [row["name"] for row in rows] == [f"{name} batch {batch}: tokens/s vs {peer}" for batch in (1, 16)
                                             for peer in peers]
    for row in rows:
        # --quick runs TensorFlow's default threads only (TF_NUM_INTRAOP_THREADS unset).
        assert row["peer"] in [f"{peer}, intra-op unset" for peer in peers]
        assert row["unit"] == "tokens/s" and row["target"] == 1.5
        assert row["ours"] > 0 and row["peer_value"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["peer_value"])
    assert f"{section}: greedy, 16 new tokens" in proc.stdout and f"{name} batch 16: tokens/s vs keras-hub XLA" in proc.stdout


@pytest.mark.slow
def test_quick_streaming_rows(tmp_path):
    """`--quick --only streaming`: the default configuration's shape, exported and served; each
    prompt's story streamed and written in one call, which must be the same story."""
    proc, rows = run_quick_section(tmp_path, "streaming")
    prompts = ("从前有座山，", "Once upon a time")
    assert [row["name"] for row in rows] == [f"stream {prompt!r}: {what}" for prompt in prompts
                                             for what in ("first text", "whole story")]
    for row in rows:
        assert row["unit"] == "ms" and row["peer"] == "whole story, one call" and 0 < row["ours"] and 0 < row["peer_value"]
    assert all(row["ours"] < row["peer_value"] for row in rows[::2])  # the first text comes before the whole story
    assert "64 tokens in" in proc.stdout and "differed" not in proc.stdout


@pytest.mark.slow
def test_quick_scale_rows(tmp_path):
    """`--only scale` on a 1 MB corpus, measured twice: in-process and Beam ingest take turns
    at going first, both ingest every story, and each step's peak RSS is reported."""
    proc, rows = run_quick_section(tmp_path, "scale", "--scale_sizes_mb", "1")
    size = "scale 1 MB"
    assert [row["name"] for row in rows] == [f"{size}: ingest+tokenizer time", f"{size}: ingest on Beam, 2 processes",
                                             *(f"{size}: {step} peak RSS" for step in
                                               ("ingest", "tokenizer", "beam_launcher", "beam_worker"))]
    beam = rows[1]
    assert beam["unit"] == "MB/s" and beam["peer"] == "in process" and beam["target"] == 1.7
    assert beam["ours"] > 0 and beam["ratio"] == pytest.approx(beam["ours"] / beam["peer_value"])
    assert all(row["ours"] > 100 for row in rows[2:])  # MB: every process holds TensorFlow
    started = [line.split()[1] for line in proc.stderr.splitlines() if line.strip().startswith("started scale-")]
    assert started == ["scale-imports", "scale-0-1MB-ingest", "scale-0-1MB-ingest_beam", "scale-0-1MB-tokenizer",
                       "scale-1-1MB-ingest_beam", "scale-1-1MB-ingest", "scale-1-1MB-tokenizer"]
