import concurrent.futures
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from components import control_tags, exporter
from components.common import BOS_ID, EOS_ID
from components.config import ExportConfig
from components.contract import SIGNATURES, WARMUP_FILE
from components.model import decoding
from components.tokenizer import make_tokenizer

PROMPTS = ["从前有座山，", "Once upon a time", "一只狐狸", "The dragon", "", "老渔夫说：", "A tailor", "山里有座庙。"]
WINDOW = 24  # the tiny model's max_story_tokens
LIMIT = 2048  # far beyond the window: long stories slide it
SENTENCEPIECE_OPS = {"SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceDetokenizeOp"}


@pytest.fixture(scope="module")
def saved_model(tiny_model, spm_proto, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return exporter.export(tiny_model, make_tokenizer(spm_proto), str(out),
                           ExportConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens_limit=LIMIT))


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(saved_model)


def generate(loaded, prompts, max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=1):
    out = loaded.signatures["generate"](
        prompt=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens), temperature=tf.constant(temperature),
        top_k=tf.constant(top_k), top_p=tf.constant(top_p), seed=tf.constant(seed, tf.int64))
    return {key: value.numpy() for key, value in out.items()}


def test_signatures_are_the_serving_contract(loaded):
    assert set(loaded.signatures) == set(SIGNATURES)
    for name, signature in SIGNATURES.items():
        function = loaded.signatures[name]
        for specs, tensors in ((function.structured_input_signature[1], signature.inputs),
                               (function.structured_outputs, signature.outputs)):
            described = {key: (spec.dtype.name, tuple(spec.shape.as_list())) for key, spec in specs.items()}
            assert described == {t.name: (t.dtype, t.shape) for t in tensors}, name
    out = loaded.signatures["serving_default"](prompt=tf.constant(PROMPTS[:2]))
    assert out["story"].shape == (2,) and out["num_tokens"].dtype == tf.int32
    assert int(loaded.max_new_tokens_limit.numpy()) == LIMIT


def test_the_export_carries_a_warm_up_request_per_signature_that_it_answers(saved_model):
    from tensorflow_serving.apis import prediction_log_pb2

    from serving.model_manager import load_servable, warm_up

    records = tf.data.TFRecordDataset(f"{saved_model}/{WARMUP_FILE}")
    requests = [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request for r in records]
    assert sorted(r.model_spec.signature_name for r in requests) == sorted(SIGNATURES)
    assert warm_up(load_servable("storygen", 1, saved_model), saved_model) == len(SIGNATURES)


def test_outputs_are_consistent(loaded, spm_proto):
    out = generate(loaded, PROMPTS, max_new_tokens=10)
    assert out["token_ids"].shape == (8, 10)
    tok = make_tokenizer(spm_proto)
    for ids, n, story in zip(out["token_ids"], out["num_tokens"], out["story"]):
        assert EOS_ID not in ids[:n] and 0 not in ids[:n]
        assert n == 10 or ids[n] == EOS_ID
        assert story == tok.detokenize(tf.constant(ids[:n])).numpy()


def test_log_prob_matches_the_keras_model(loaded, tiny_model, spm_proto):
    """The reported log-probability equals teacher-forced scoring of the generated tokens."""
    out = generate(loaded, PROMPTS[:3], max_new_tokens=8)
    tok = make_tokenizer(spm_proto)
    for prompt, ids, n, log_prob in zip(PROMPTS, out["token_ids"], out["num_tokens"], out["log_prob"]):
        scored = list(ids[: min(n + 1, 8)])  # the story's tokens and its EOS, if one was written
        encoder_ids = np.array([[BOS_ID] + tok.tokenize(prompt).numpy().tolist()[-15:]], "int32")
        logits = tiny_model((encoder_ids, np.array([[BOS_ID] + scored[:-1]], "int32")))
        expected = tf.reduce_sum(tf.gather(tf.nn.log_softmax(logits[0]), scored, batch_dims=1)).numpy()
        np.testing.assert_allclose(log_prob, expected, rtol=1e-4, atol=1e-3)


def recompute_greedy(model, tok, prompt, steps):
    """Reference decoder: recomputes the whole prefix with the Keras model at every step, and
    slides the window as the export does: when the decoder is full, its newer half becomes
    the prefix and the text before it the prompt, after the prompt's control tags."""
    tags, text = control_tags.split_tags(prompt)
    control = tok.control_ids(tf.ragged.constant([[control_tags.piece(t) for t in tags]], tf.string)).to_list()[0]
    room = 15 - len(control)  # the tiny model reads 16 prompt tokens, BOS included
    encoder_ids = [BOS_ID] + control + tok.tokenize(text).numpy().tolist()[-room:]
    generated, start = [], 0
    for _ in range(steps):
        decoder_ids = [BOS_ID] + generated[start:]
        if len(decoder_ids) > WINDOW:
            start = len(generated) - WINDOW // 2
            encoder_ids = [BOS_ID] + control + generated[:start][-room:]
            decoder_ids = [BOS_ID] + generated[start:]
        logits = model((np.array([encoder_ids], "int32"), np.array([decoder_ids], "int32")))[0, -1]
        generated.append(int(np.argmax(logits)))
        if generated[-1] == EOS_ID:
            break
    return generated


def test_cached_decoding_equals_recomputing_the_prefix(loaded, tiny_model, spm_proto):
    tok = make_tokenizer(spm_proto)
    out = generate(loaded, PROMPTS[:3], max_new_tokens=WINDOW - 1, temperature=0.0)
    for prompt, ids in zip(PROMPTS, out["token_ids"]):
        expected = recompute_greedy(tiny_model, tok, prompt, WINDOW - 1)
        assert ids[: len(expected)].tolist() == expected


def test_sliding_window_equals_the_reference(loaded, tiny_model, spm_proto):
    """60 tokens from a 24-token decoder: the window slides three times, and the prompt's
    control tags lead the encoder's prompt each time."""
    tok = make_tokenizer(spm_proto)
    prompts = PROMPTS[:2] + ["<fable><zh> 从前有座山，", "<en><unknown> The dragon"]
    out = generate(loaded, prompts, max_new_tokens=60, temperature=0.0)
    for prompt, ids in zip(prompts, out["token_ids"]):
        expected = recompute_greedy(tiny_model, tok, prompt, 60)
        assert ids[: len(expected)].tolist() == expected


def test_a_2000_character_story_comes_out_whole(loaded):
    # Greedy decoding of these random weights never writes EOS, so the story runs to the limit.
    out = generate(loaded, ["从前有座山，"], max_new_tokens=LIMIT, temperature=0.0)
    assert out["num_tokens"][0] == LIMIT and out["token_ids"].shape == (1, LIMIT)
    assert len(out["story"][0].decode("utf-8")) >= 2000


def continue_story(loaded, prompts, token_ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=1):
    out = loaded.signatures["continue_story"](
        prompt=tf.constant(prompts), token_ids=tf.constant(token_ids, tf.int32),
        max_new_tokens=tf.constant(max_new_tokens), temperature=tf.constant(temperature), top_k=tf.constant(top_k),
        top_p=tf.constant(top_p), seed=tf.constant(seed, tf.int64))
    return {key: value.numpy() for key, value in out.items()}


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.9, 20)])
def test_continuing_a_story_in_pieces_writes_the_story_generate_writes(loaded, temperature, top_k):
    """70 tokens in pieces of 1 to 33 from a 24-token window: pieces start before, at and after
    its slides, and the rows that write EOS early stay ended."""
    whole = generate(loaded, PROMPTS, max_new_tokens=70, temperature=temperature, top_k=top_k, seed=3)
    token_ids, log_prob = np.zeros([len(PROMPTS), 0], np.int32), 0.0
    for size in (1, 4, 9, 23, 33):
        out = continue_story(loaded, PROMPTS, token_ids, size, temperature=temperature, top_k=top_k, seed=3)
        assert out["token_ids"].shape[1] <= token_ids.shape[1] + size
        token_ids, log_prob = out["token_ids"], log_prob + out["log_prob"]
    assert whole["token_ids"].shape[1] == 70 and max(whole["num_tokens"]) == 70  # some story is 70 tokens long
    np.testing.assert_array_equal(token_ids, whole["token_ids"])
    np.testing.assert_array_equal(out["num_tokens"], whole["num_tokens"])
    assert list(out["story"]) == list(whole["story"])
    np.testing.assert_allclose(log_prob, whole["log_prob"], rtol=1e-4, atol=1e-3)


def test_a_continued_story_stays_within_the_limit(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"max_new_tokens must be <= {LIMIT} less the length"):
        continue_story(loaded, PROMPTS[:1], np.zeros([1, 10], np.int32), LIMIT - 9)
    with pytest.raises(tf.errors.InvalidArgumentError, match="token_ids must have a row per prompt"):
        continue_story(loaded, PROMPTS[:2], np.zeros([1, 10], np.int32), 4)


def test_beam_search(loaded):
    beam = loaded.signatures["beam_search"]
    greedy = generate(loaded, PROMPTS[:3], max_new_tokens=10, temperature=0.0)
    one = beam(prompt=tf.constant(PROMPTS[:3]), max_new_tokens=tf.constant(10), num_beams=tf.constant(1))
    assert (one["story"].numpy() == greedy["story"]).all()
    np.testing.assert_allclose(one["log_prob"].numpy(), greedy["log_prob"], rtol=1e-4)
    four = beam(prompt=tf.constant(PROMPTS[:3]), max_new_tokens=tf.constant(10), num_beams=tf.constant(4))
    assert four["story"].shape == (3,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_beams must be >= 1"):
        beam(prompt=tf.constant(PROMPTS[:1]), max_new_tokens=tf.constant(5), num_beams=tf.constant(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_new_tokens must be <= 23"):
        beam(prompt=tf.constant(PROMPTS[:1]), max_new_tokens=tf.constant(24), num_beams=tf.constant(2))


def test_score_equals_teacher_forced_keras_model(loaded, tiny_model, spm_proto):
    """score() is the Keras model's log-likelihood of the story's tokens then EOS.
    (That it equals generate()'s log_prob for generated stories is checked on a trained model
    in pipeline_test, where generated ids retokenise; a random model's rarely do.)"""
    tok = make_tokenizer(spm_proto)
    stories = ["山里有座庙。", "Once upon a time there was a fox.", ""]
    scored = loaded.signatures["score"](prompt=tf.constant(PROMPTS[:3]), story=tf.constant(stories))
    for row, (prompt, story) in enumerate(zip(PROMPTS, stories)):
        targets = tok.tokenize(story).numpy().tolist() + [EOS_ID]
        encoder_ids = np.array([[BOS_ID] + tok.tokenize(prompt).numpy().tolist()[-15:]], "int32")
        logits = tiny_model((encoder_ids, np.array([[BOS_ID] + targets[:-1]], "int32")))[0]
        expected = tf.reduce_sum(tf.gather(tf.nn.log_softmax(logits), targets, batch_dims=1)).numpy()
        np.testing.assert_allclose(scored["log_likelihood"].numpy()[row], expected, rtol=1e-4)
        assert scored["num_tokens"].numpy()[row] == len(targets)


def test_score_bits_per_char(loaded):
    scored = loaded.signatures["score"](prompt=tf.constant(["", "从前"]), story=tf.constant(["Once upon a time.", "有座山。"]))
    chars = np.array([len("Once upon a time."), len("有座山。")])
    expected = -scored["log_likelihood"].numpy() / np.log(2) / chars
    np.testing.assert_allclose(scored["bits_per_char"].numpy(), expected, rtol=1e-5)


def test_sampling_is_seeded(loaded):
    a = generate(loaded, PROMPTS[:2], seed=5)
    assert (generate(loaded, PROMPTS[:2], seed=5)["token_ids"] == a["token_ids"]).all()
    assert (generate(loaded, PROMPTS[:2], seed=6)["token_ids"] != a["token_ids"]).any()


def test_greedy_equals_top_k_1_and_tiny_top_p(loaded):
    greedy = generate(loaded, PROMPTS, temperature=0.0, seed=1)["token_ids"]
    assert (generate(loaded, PROMPTS, temperature=0.0, seed=2)["token_ids"] == greedy).all()
    assert (generate(loaded, PROMPTS, top_k=1, seed=3)["token_ids"] == greedy).all()
    assert (generate(loaded, PROMPTS, top_p=1e-6, seed=4)["token_ids"] == greedy).all()


def test_story_does_not_depend_on_the_batch(loaded):
    alone = generate(loaded, ["一只狐狸"], seed=9)
    first = generate(loaded, ["一只狐狸"] + PROMPTS[:7], seed=9)
    last = generate(loaded, PROMPTS[:7] + ["一只狐狸"], seed=9)
    for batch, row in ((first, 0), (last, 7)):
        assert (batch["token_ids"][row] == alone["token_ids"][0]).all()
        assert batch["story"][row] == alone["story"][0]
        np.testing.assert_allclose(batch["log_prob"][row], alone["log_prob"][0], rtol=1e-4)


def test_steps_with_the_kernels_whole_write_the_stories_of_steps_in_halves(loaded, tiny_model, spm_proto, tmp_path,
                                                                          monkeypatch):
    """The tiny model's steps take the kernels in column halves at any batch here (see
    `decoding.halves_pay`); an export that never takes them writes the same stories, greedy and
    sampled, across a slide of the window."""
    assert bool(decoding.halves_pay(len(PROMPTS), tiny_model.decoding_weights()))
    monkeypatch.setattr(decoding, "HALVES_MAX_WORK", 0)
    whole = tf.saved_model.load(exporter.export(tiny_model, make_tokenizer(spm_proto), str(tmp_path),
                                                ExportConfig(max_new_tokens_limit=LIMIT)))
    for temperature in (0.0, 1.0):
        expected, got = (generate(m, PROMPTS, max_new_tokens=40, temperature=temperature) for m in (loaded, whole))
        np.testing.assert_array_equal(got["token_ids"], expected["token_ids"])
        np.testing.assert_allclose(got["log_prob"], expected["log_prob"], rtol=1e-4)


def test_concurrent_requests_do_not_share_caches(loaded):
    """The decoding loop writes its key/value caches in place: requests running at the same
    time (as TF Serving runs them) must each get the story they get alone."""
    requests = [(PROMPTS[i:i + 2], seed) for i in range(4) for seed in (1, 2)]
    alone = [generate(loaded, prompts, max_new_tokens=30, seed=seed)["token_ids"] for prompts, seed in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: generate(loaded, r[0], max_new_tokens=30, seed=r[1])["token_ids"], requests))
    for a, b in zip(alone, together):
        assert (a == b).all()


def test_different_prompts_draw_different_noise(loaded):
    """Two prompts in one batch do not share their random draws (noise is rotated per prompt)."""
    out = generate(loaded, ["一只狐狸", "一只狐狸。"], seed=2, max_new_tokens=20)
    assert (out["token_ids"][0] != out["token_ids"][1]).any()


@pytest.mark.parametrize("overrides, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=LIMIT + 1), f"max_new_tokens must be <= {LIMIT}"),
    (dict(prompts=np.array([], dtype=object)), "prompt must hold at least one string"),
])
def test_invalid_parameters_fail_in_the_graph(loaded, overrides, message):
    prompts = overrides.pop("prompts", PROMPTS[:1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        generate(loaded, prompts, **overrides)


def graph_ops(saved_model: str) -> dict:
    """The SavedModel's ops, and those a process that does not import tensorflow_text does not
    know (its registry holds only core ops): {"ops": [...], "unknown": [...]}."""
    script = f"""
import json, sys
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
proto = saved_model_pb2.SavedModel()
proto.ParseFromString(open({saved_model + '/saved_model.pb'!r}, 'rb').read())
graph = proto.meta_graphs[0].graph_def
ops = {{n.op for n in graph.node}} | {{n.op for f in graph.library.function for n in f.node_def}}
functions = {{f.signature.name for f in graph.library.function}}
print(json.dumps({{"ops": sorted(ops - functions), "unknown": sorted(o for o in ops - functions if op_def_registry.get(o) is None)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_graph_has_only_core_and_sentencepiece_ops(saved_model):
    """Stock TF Serving can run the graph: every op is a TensorFlow core op or one of
    tf-text's SentencePiece ops, and none is an XLA op."""
    report = graph_ops(saved_model)
    assert set(report["unknown"]) == SENTENCEPIECE_OPS
    assert not [op for op in report["ops"] if op.startswith("Xla")]
    assert "While" in report["ops"] or "StatelessWhile" in report["ops"]
