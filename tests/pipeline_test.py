"""End-to-end: the tiny configuration through every step, twice (see conftest.tiny_pipeline)."""

import json
import os
import re
import subprocess
import sys

import pytest

from components.cli import EXIT_NOT_PUSHED
from conftest import REPO, TINY_FLAGS, run_cli

ANDERSEN = os.path.join(REPO, "..", "shared", "corpora", "andersen_en.jsonl")

STEPS = ("ingest", "tokenizer", "trainer", "evaluator", "exporter", "pusher")


@pytest.mark.slow
def test_one_ingest_on_beam_serves_later_runs_through_examples_dir(tmp_path):
    """--stop_after=ingest writes the examples once (here on Beam); a run with --examples_dir
    (as every host of a multi-worker run) starts from them and never reads --data."""
    root = tmp_path / "runs"
    once = run_cli("pipeline.run", f"--pipeline_root={root}", "--run_id=ingest-once", "--stop_after=ingest",
                   "--builtin_count=120", "--beam_pipeline_args=--runner=DirectRunner", timeout=300)
    assert once.returncode == 0, once.stderr
    examples = root / "ingest-once" / "ingest"
    assert os.listdir(root / "ingest-once") == ["ingest"] and (examples / "manifest.json").exists()
    assert f"[pipeline] stopped after the ingest step (--stop_after): {examples}" in once.stdout
    host = run_cli("pipeline.run", f"--pipeline_root={root}", "--run_id=host-a", "--stop_after=tokenizer",
                   "--data=/no/such/corpus", f"--examples_dir={examples}", "--vocab_size=500", timeout=300)
    assert host.returncode == 0, host.stderr
    assert os.listdir(root / "host-a") == ["tokenizer"]
    assert f"[ingest] using {examples}: builtin:fairy_tales: 120 stories -> " in host.stdout
    manifest = json.loads((root / "host-a" / "tokenizer" / "manifest.json").read_text())
    assert manifest["inputs"]["examples"]["path"] == str(examples)


@pytest.mark.slow
def test_every_step_has_a_manifest(tiny_pipeline):
    for step in STEPS:
        manifest = tiny_pipeline.manifest("first", step)
        assert manifest["step"] == step and manifest["run_id"] == "first"
        assert set(manifest) >= {"inputs", "parameters", "outputs", "metrics", "wall_time_seconds", "library_versions"}
        for name, spec in manifest["inputs"].items():
            assert len(spec["fingerprint"]) == 64, (step, name)
    assert tiny_pipeline.manifest("first", "trainer")["parameters"]["ModelConfig"]["d_model"] == 64
    assert tiny_pipeline.manifest("first", "ingest")["inputs"]["data"]["path"] == "builtin:fairy_tales"


@pytest.mark.slow
def test_progress_lines(tiny_pipeline):
    out = tiny_pipeline.results["first"].stdout
    for step in STEPS:
        assert f"[{step}] " in out
    assert "stories ->" in out and "tokens/s" in out and "pushed version 1" in out
    # Training says every 10 s where it is and when it will end.
    assert re.search(r"\[trainer\] step \d+/\d+ \(epoch \d+/10\), loss [\d.]+, \d+ tokens/s, about [\w ]+ left", out)


# What tiny.flags measured on 2026-12-02 (2 CPU cores, float32; the same to every digit when
# rerun), and the tolerances the tests allow. Held out: perplexity 1.695 (unigram 296.9), 0.4076
# bits/char (char 5-gram 0.6354), trainer val_loss 0.4155 after 610 steps. With --seed=43
# (another corpus, initialisation and order) 1.585, 0.3923 and 0.4579; after one epoch instead of
# ten, 50.2, 3.026 and 3.883. Each tolerance covers the seed change and fails the one-epoch model.
TINY_PERPLEXITY, PERPLEXITY_TOLERANCE = 1.695, 0.25  # relative: 1.27 to 2.12
TINY_BITS_PER_CHAR, BITS_PER_CHAR_TOLERANCE = 0.4076, 0.15
TINY_VAL_LOSS, VAL_LOSS_TOLERANCE = 0.4155, 0.15


@pytest.mark.slow
def test_held_out_perplexity_and_bits_per_char_are_the_tiny_figures(tiny_pipeline):
    metrics = tiny_pipeline.manifest("first", "evaluator")["metrics"]["test"]
    with open(os.path.join(tiny_pipeline.step_dir("first", "evaluator"), "metrics.json")) as f:
        assert json.load(f)["test"] == metrics
    assert metrics["perplexity"] == pytest.approx(TINY_PERPLEXITY, rel=PERPLEXITY_TOLERANCE)
    assert metrics["bits_per_char"] == pytest.approx(TINY_BITS_PER_CHAR, abs=BITS_PER_CHAR_TOLERANCE)
    # The tiny model has learned more than the character 5-gram baseline knows.
    assert metrics["bits_per_char"] < metrics["char_5gram_bits_per_char"]
    trained = tiny_pipeline.manifest("first", "trainer")["metrics"]
    assert trained["val_loss"] == pytest.approx(TINY_VAL_LOSS, abs=VAL_LOSS_TOLERANCE)
    by_lang = tiny_pipeline.manifest("first", "evaluator")["metrics"]["by_lang"]
    assert set(by_lang) == {"zh", "en"}
    assert sum(v["tokens"] for v in by_lang.values()) == metrics["tokens"]


@pytest.mark.slow
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


PLAIN_TF_SCRIPT = """
import json, sys
import tensorflow as tf
import tensorflow_text
model = tf.saved_model.load(sys.argv[1])
prompts = tf.constant(["从前有座山，山里有座庙，庙里住着一个小和尚，名叫阿福。",
                       "Once upon a time, in a faraway kingdom, there lived a poor tailor named Hans."])
default = model.signatures["serving_default"](prompt=prompts)
generated = model.signatures["generate"](prompt=prompts, max_new_tokens=tf.constant(60), temperature=tf.constant(0.7),
                                         top_k=tf.constant(20), top_p=tf.constant(0.9), seed=tf.constant(1, tf.int64))
beams = model.signatures["beam_search"](prompt=prompts, max_new_tokens=tf.constant(30), num_beams=tf.constant(3))
scored = model.signatures["score"](prompt=prompts, story=generated["story"])
# Written in the corpus's style, not sampled: its score depends on the model alone.
written = model.signatures["score"](prompt=prompts, story=tf.constant([
    "阿福胆子很大，就是有点儿粗心。有一天早上，一只受伤的小鸟落在他的门前。阿福决定送小鸟回到它的家。",
    "Hans was honest and hard-working. One morning, the old oak on the hill fell sick and lost all its leaves."]))
own = sorted(m for m in sys.modules if m.split(".")[0] in ("components", "pipeline", "keras_hub"))
print(json.dumps({"stories": [s.decode() for s in default["story"].numpy()],
                  "num_tokens": default["num_tokens"].numpy().tolist(),
                  "generate": generated["num_tokens"].numpy().tolist(),
                  "beams": [s.decode() for s in beams["story"].numpy()],
                  "score": scored["bits_per_char"].numpy().tolist(),
                  "written": written["bits_per_char"].numpy().tolist(), "own": own}))
"""


@pytest.mark.slow
def test_pushed_model_runs_every_signature_with_only_tensorflow_and_tensorflow_text(tiny_pipeline):
    result = subprocess.run([sys.executable, "-c", PLAIN_TF_SCRIPT, os.path.join(tiny_pipeline.model_base_path, "2")],
                            capture_output=True, text=True, cwd="/", env=dict(os.environ, PYTHONPATH=""), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["own"] == []
    zh, en = out["stories"]
    assert all(n > 0 for n in out["num_tokens"] + out["generate"])
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > len(zh) / 3  # the model learned to continue in Chinese
    assert sum(c.isascii() for c in en) > 0.9 * len(en)  # ... and in English
    assert all(beam for beam in out["beams"])
    # The written stories' bits per character: 0.701 (zh) and 0.529 (en) measured, 1.008 and
    # 0.449 with --seed=43, 6.32 and 2.83 after one epoch.
    assert out["written"] == pytest.approx([0.701, 0.529], abs=0.4)
    # Sampled stories score 1.98 and 1.44 with this seed, but the sample itself moves with
    # rounding (the oneDNN-free model, whose written scores agree to 1e-3, drew an English one
    # scoring 2.99), hence ±2; a one-epoch model's Chinese one scored 5.24.
    assert all(bpc > 0 for bpc in out["score"]) and out["score"] == pytest.approx([1.98, 1.44], abs=2.0)


@pytest.mark.slow
def test_saved_model_cli_shows_the_signatures(tiny_pipeline):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--all", "--dir", os.path.join(tiny_pipeline.model_base_path, "1")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for signature in ("serving_default", "generate", "beam_search", "score"):
        assert f"signature_def['{signature}']" in result.stdout
    assert "inputs['max_new_tokens'] tensor_info:\n        dtype: DT_INT32" in result.stdout


@pytest.mark.slow
def test_generated_stories_retokenise_and_score_matches(tiny_pipeline):
    """score() of a generated story equals generate()'s log_prob when the story retokenises to
    the generated ids. Whitespace is kept as written, so what breaks the round trip is only a
    non-canonical segmentation (e.g. 一 + 个 where the tokenizer writes 一个), which a weak tiny
    model draws now and then, at a rate that moves with float rounding in training: two tiny
    models whose losses differed only in rounding gave 47 of 48 and 38 of 43 with this seed,
    and the second 10 of 13 on the first 32 prompts alone, so a rate over a few stories is too
    noisy to test. A broken round trip retokenises almost none. (The default model's rate is in
    the closing note of issue 7.)"""
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from components import corpus
    from components.tokenizer import load_proto, make_tokenizer

    model = tf.saved_model.load(os.path.join(tiny_pipeline.model_base_path, "2"))
    tok = make_tokenizer(load_proto(tiny_pipeline.step_dir("first", "tokenizer")))
    prompts = [s["prompt"] for s in corpus.sample(96, seed=123)]
    out = model.signatures["generate"](prompt=tf.constant(prompts), max_new_tokens=tf.constant(384),
                                       temperature=tf.constant(0.8), top_k=tf.constant(0), top_p=tf.constant(1.0),
                                       seed=tf.constant(5, tf.int64))
    scored = model.signatures["score"](prompt=tf.constant(prompts), story=out["story"])
    ended = same = 0
    for row, (ids, n) in enumerate(zip(out["token_ids"].numpy(), out["num_tokens"].numpy())):
        if n == 384 or ids[n] != 3:
            continue  # cut off before EOS: score would add an EOS that generate never drew
        ended += 1
        if tok.tokenize(out["story"][row]).numpy().tolist() == ids[:n].tolist():
            same += 1
            np.testing.assert_allclose(scored["log_likelihood"].numpy()[row], out["log_prob"].numpy()[row],
                                       rtol=1e-3, atol=1e-3)
    print(f"retokenisation rate: {same}/{ended}")
    assert ended >= 30 and same >= 0.6 * ended


@pytest.mark.slow
def test_generate_cli(tiny_pipeline):
    zh = "从前有座山，山里有座庙，庙里住着一个小和尚，名叫阿福。"
    en = "Once upon a time, in a faraway kingdom, there lived a poor tailor named Hans."
    args = ("pipeline.generate", f"--model_dir={tiny_pipeline.model_base_path}", f"--prompt={zh}", f"--prompt={en}",
            "--seed=3", "--max_new_tokens=30")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    stories = [s for s in result.stdout.split("\n\n") if s.strip()]
    assert len(stories) == 2
    assert stories[0].startswith(zh) and len(stories[0]) > len(zh)
    assert stories[1].startswith(en) and len(stories[1]) > len(en) + 1
    assert run_cli(*args).stdout == result.stdout  # the same seed writes the same stories
    # Control tags reach the model, --tag writes them before each prompt, and a tag the model does
    # not have is named with those it has. In process: a command line costs a TensorFlow start-up.
    import types

    import tensorflow as tf

    from components.common import UserError
    from pipeline.generate import generate, load, resolve_saved_model

    model = load(resolve_saved_model(tiny_pipeline.model_base_path))
    greedy = dict(max_new_tokens=30, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    inputs = {k: tf.constant(v, tf.int64 if k == "seed" else None) for k, v in greedy.items()}
    out = model.signatures["generate"](prompt=tf.constant([en, f"<en><fable> {en}"]), **inputs)
    untagged, tagged = out["log_prob"].numpy()
    assert abs(untagged - tagged) > 1e-3
    sent = []

    def recording_generate(**inputs):
        sent.append([p.decode() for p in inputs["prompt"].numpy()])
        return model.signatures["generate"](**inputs)

    recorder = types.SimpleNamespace(signatures={"generate": recording_generate}, control_tags=model.control_tags,
                                     max_new_tokens_limit=model.max_new_tokens_limit,
                                     decoder_window=model.decoder_window)
    generate(recorder, [en, zh], tags=["en", "fable"], **greedy)
    assert sent == [[f"<en><fable> {en}", f"<en><fable> {zh}"]]
    with pytest.raises(UserError, match="The model has no control tag poem; its tags are en, zh, "
                                        "(fable, fairy_tale|fairy_tale, fable)[.]"):
        generate(model, [en], tags=["fable", "poem"], **greedy)


def test_join_story():
    from pipeline.generate import join_story

    assert join_story("从前有座山，", "山里有座庙。") == "从前有座山，山里有座庙。"
    assert join_story("Once upon a time,", "there was a fox.") == "Once upon a time, there was a fox."
    assert join_story("Once upon a time, ", "there was a fox.") == "Once upon a time, there was a fox."
    assert join_story("", "A fox.") == "A fox."


@pytest.mark.parametrize("args, message", [
    (["--data=/nonexistent/stories.jsonl"], "error: No input found at '/nonexistent/stories.jsonl'"),
    (["--data={tmp}/empty.jsonl"], "has no usable stories"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--epochs=0"], "flag --epochs=0: 0 is not a positive integer"),
    (["--examples_dir={tmp}"], "is not an ingest output (it has no statistics.json): give --examples_dir"),
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
    assert result.stderr.splitlines() == [f"python -m pipeline.generate: error: No SavedModel or integer version "
                                          f"folder in '{tmp_path}': run the pipeline first or point --model_dir at "
                                          "saved_models/<model_name>."]


@pytest.mark.slow
def test_andersen_tales_ingest_cleanly_and_train(tmp_path):
    """156 real fairy tales through the tiny configuration (one epoch, to keep CI short)."""
    if not os.path.exists(ANDERSEN):
        pytest.skip("../shared/corpora/andersen_en.jsonl is not beside this checkout")
    result = run_cli("pipeline.run", f"--flagfile={TINY_FLAGS}", f"--data={ANDERSEN}", "--epochs=1",
                     f"--pipeline_root={tmp_path / 'runs'}", "--run_id=andersen", f"--serving_model_dir={tmp_path / 'saved'}")
    # One epoch does not beat the character 5-gram (about 2.0 bits/char), so the model is not pushed.
    assert result.returncode == EXIT_NOT_PUSHED, result.stderr[-3000:]
    assert "[pusher] not pushed: " in result.stdout
    with open(tmp_path / "runs" / "andersen" / "ingest" / "manifest.json") as f:
        ingested = json.load(f)["metrics"]
    assert ingested["stories"] == 156 and ingested["quarantined"] == 0
    assert sum(ingested["examples"].values()) > 1000  # long tales become many windows
    with open(tmp_path / "runs" / "andersen" / "evaluator" / "metrics.json") as f:
        test = json.load(f)["test"]
    # Measured on 2026-12-01: perplexity 141.8 (unigram 264.0), 2.548 bits/char (unigram 2.868);
    # without oneDNN 141.8 and 2.5485, with --seed=43 134.9 and 2.523. The tolerances cover the
    # seed change; a model no better than the unigram one (2.87 bits/char) fails.
    assert test["perplexity"] == pytest.approx(141.8, rel=0.15)
    assert test["bits_per_char"] == pytest.approx(2.548, abs=0.15)
