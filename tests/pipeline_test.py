"""End-to-end: the tiny configuration through every step, twice (see conftest.tiny_pipeline)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli

STEPS = ("ingest", "tokenizer", "trainer", "evaluator", "exporter", "pusher")


def test_every_step_has_a_manifest(tiny_pipeline):
    for step in STEPS:
        manifest = tiny_pipeline.manifest("first", step)
        assert manifest["step"] == step and manifest["run_id"] == "first"
        assert set(manifest) >= {"inputs", "parameters", "outputs", "metrics", "wall_time_seconds", "library_versions"}
        for name, spec in manifest["inputs"].items():
            assert len(spec["fingerprint"]) == 64, (step, name)
    assert tiny_pipeline.manifest("first", "trainer")["parameters"]["d_model"] == 64
    assert tiny_pipeline.manifest("first", "ingest")["inputs"]["data"]["path"] == "builtin:fairy_tales"


def test_progress_lines(tiny_pipeline):
    out = tiny_pipeline.results["first"].stdout
    for step in STEPS:
        assert f"[{step}] " in out
    assert "stories ->" in out and "tokens/s" in out and "pushed version 1" in out


def test_held_out_perplexity_beats_unigram(tiny_pipeline):
    metrics = tiny_pipeline.manifest("first", "evaluator")["metrics"]["test"]
    with open(os.path.join(tiny_pipeline.step_dir("first", "evaluator"), "metrics.json")) as f:
        assert json.load(f)["test"] == metrics
    assert metrics["perplexity"] < 0.7 * metrics["unigram_perplexity"]
    assert 0 < metrics["bits_per_char"] < metrics["unigram_bits_per_char"]
    by_lang = tiny_pipeline.manifest("first", "evaluator")["metrics"]["by_lang"]
    assert set(by_lang) == {"zh", "en"}
    assert sum(v["tokens"] for v in by_lang.values()) == metrics["tokens"]


def test_second_run_reuses_steps_and_pushes_version_2(tiny_pipeline):
    assert sorted(os.listdir(tiny_pipeline.model_base_path)) == ["1", "2"]
    assert tiny_pipeline.manifest("second", "trainer")["reused_from"].endswith(os.path.join("first", "trainer"))
    assert tiny_pipeline.manifest("second", "pusher")["metrics"]["version"] == 2
    # Version 1 is left as it was: the same files as the first run's export.
    first = tiny_pipeline.manifest("first", "exporter")["outputs"]["path"]
    with open(os.path.join(first, "saved_model", "saved_model.pb"), "rb") as f:
        exported = f.read()
    with open(os.path.join(tiny_pipeline.model_base_path, "1", "saved_model.pb"), "rb") as f:
        assert f.read() == exported


def test_pushed_model_needs_only_tensorflow_and_tensorflow_text(tiny_pipeline):
    script = f"""
import json, sys
import tensorflow as tf
import tensorflow_text
model = tf.saved_model.load({os.path.join(tiny_pipeline.model_base_path, '2')!r})
out = model.signatures["serving_default"](prompt=tf.constant(["从前有座山，", "Once upon a time,"]))
own = sorted(m for m in sys.modules if m.split(".")[0] in ("components", "pipeline", "keras_hub"))
print(json.dumps({{"stories": [s.decode() for s in out["story"].numpy()], "num_tokens": out["num_tokens"].numpy().tolist(), "own": own}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/",
                            env=dict(os.environ, PYTHONPATH=""), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["own"] == []
    zh, en = out["stories"]
    assert all(n > 0 for n in out["num_tokens"])
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > len(zh) / 3  # the model learned to continue in Chinese
    assert sum(c.isascii() for c in en) > 0.9 * len(en)  # ... and in English


def test_generate_cli(tiny_pipeline):
    result = run_cli("pipeline.generate", f"--model_dir={tiny_pipeline.model_base_path}", "--prompt=从前有座山，",
                     "--prompt=Once upon a time,", "--seed=3", "--max_new_tokens=30")
    assert result.returncode == 0, result.stderr[-2000:]
    stories = [s for s in result.stdout.split("\n\n") if s.strip()]
    assert len(stories) == 2
    assert stories[0].startswith("从前有座山，") and len(stories[0]) > len("从前有座山，")
    assert stories[1].startswith("Once upon a time, ")
    again = run_cli("pipeline.generate", f"--model_dir={tiny_pipeline.model_base_path}", "--prompt=从前有座山，",
                    "--prompt=Once upon a time,", "--seed=3", "--max_new_tokens=30")
    assert again.stdout == result.stdout


@pytest.mark.parametrize("args, message", [
    (["--data=/nonexistent/stories.jsonl"], "error: No input found at '/nonexistent/stories.jsonl'"),
    (["--data={tmp}/empty.jsonl"], "has no usable stories"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--epochs=0"], "flag --epochs=0: 0 is not a positive integer"),
])
def test_bad_input_ends_with_one_clear_sentence(tmp_path, args, message):
    (tmp_path / "empty.jsonl").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("pipeline.run", f"--pipeline_root={tmp_path / 'runs'}", "--run_id=bad",
                     f"--serving_model_dir={tmp_path / 'saved'}", *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing half-written looks complete: no step folder with a manifest, no pushed version.
    run_dir = tmp_path / "runs" / "bad"
    assert not any((run_dir / step / "manifest.json").exists() for step in STEPS)
    assert not (tmp_path / "saved").exists()


def test_generate_without_a_model_is_one_sentence(tmp_path):
    result = run_cli("pipeline.generate", f"--model_dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: No SavedModel or integer version folder in")
