"""Pretrained keras-hub presets (T5 v1.0, T5 1.1 / Flan-T5, BART, T5Gemma) fine-tuned and exported:
exported greedy decoding writes exactly keras-hub's own greedy tokens, before and after
fine-tuning (all weights and LoRA), `score` is keras-hub's log-likelihood, and the preset
checks refuse what they must with one sentence."""

import os

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import preset_fixtures
from components import exporter, trainer, transform
from components.common import UserError
from components.config import ExportConfig, ModelConfig, TrainingConfig
from components.model import PRESET_DIR, build_model, decoding, load_model, presets, save_model
from components.tokenizer import Tokenizer

PROMPTS = ["从前有座山，山里有座庙，", "Once upon a time", "一只狐狸", "The dragon slept under the castle and",
           "小姑娘提着灯笼", "A tailor"]
STORIES = ["庙里住着一个小和尚。", "there lived a fox.", "走进了葡萄园。", " nobody dared to wake him.", "走进山洞。",
           " sewed all night."]
NEW_TOKENS = 12
PROMPT_TOKENS = 48  # every prompt fits whole: keras-hub cuts a long prompt's end, storygen its start
ARCHITECTURES = {
    "t5": lambda d: preset_fixtures.save_t5_preset(d, gated=False),
    "t5_gated": lambda d: preset_fixtures.save_t5_preset(d, gated=True),
    "bart": preset_fixtures.save_bart_preset,
    "t5gemma": preset_fixtures.save_t5gemma_preset,
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def preset(request, tmp_path_factory):
    return ARCHITECTURES[request.param](str(tmp_path_factory.mktemp(request.param)))


def model_config(preset, **overrides):
    return ModelConfig(init_from=preset, max_prompt_tokens=PROMPT_TOKENS, max_story_tokens=32, **overrides)


def tokenizer_of(model) -> Tokenizer:
    """The in-graph tokenizer of a preset model (the pipeline's tokenizer step records the same)."""
    return Tokenizer(model.lm.preprocessor.tokenizer, model.special)


def export(model, out) -> str:
    return exporter.export(model, tokenizer_of(model), str(out), ExportConfig(max_new_tokens_limit=64))


def exported_greedy(loaded):
    """The exported `generate`'s greedy (top_k=1) tokens for PROMPTS, up to EOS."""
    out = loaded.signatures["generate"](
        prompt=tf.constant(PROMPTS), max_new_tokens=tf.constant(NEW_TOKENS), temperature=tf.constant(1.0),
        top_k=tf.constant(1), top_p=tf.constant(1.0), seed=tf.constant(0, tf.int64))
    return [list(ids[:n]) for ids, n in zip(out["token_ids"].numpy(), out["num_tokens"].numpy())]


@pytest.fixture(scope="module")
def saved_model(preset, tmp_path_factory):
    """The untrained preset exported: its SavedModel's path (one export serves several tests)."""
    return export(build_model(model_config(preset)), tmp_path_factory.mktemp("export"))


def keras_hub_greedy(preset_dir):
    """keras-hub's own generate(sampler="greedy") on the preset, as token ids up to EOS."""
    lm = keras_hub.models.Seq2SeqLM.from_preset(preset_dir)
    prefix = len(presets.special_ids(lm.preprocessor.tokenizer).decoder_prefix)
    eos = lm.preprocessor.tokenizer.end_token_id
    inputs = lm.preprocessor.generate_preprocess(PROMPTS, sequence_length=prefix + NEW_TOKENS)
    # The prompts framed as keras-hub's training preprocessor frames them, as storygen does in
    # training and decoding alike (T5Gemma's generate_preprocess leaves out the <eos> its
    # training puts after a prompt; T5's and BART's frame both ways alike).
    lm.preprocessor.encoder_sequence_length = PROMPT_TOKENS
    x, _, _ = lm.preprocessor({"encoder_text": tf.constant(PROMPTS), "decoder_text": tf.constant([""] * len(PROMPTS))})
    inputs.update(encoder_token_ids=x["encoder_token_ids"], encoder_padding_mask=x["encoder_padding_mask"])
    lm.preprocessor = None  # generate on the ids, so the comparison is of tokens
    lm.compile(sampler="greedy")
    generated = np.asarray(lm.generate(inputs, stop_token_ids=[eos])["decoder_token_ids"])[:, prefix:]
    return [list(row[: list(row).index(eos)]) if eos in row else list(row) for row in generated]


def story_batches(model):
    """The Chinese and English prompts and stories as one training batch, repeated."""
    tok = tokenizer_of(model)
    prompts = transform.encode_prompts(tok, tf.constant(PROMPTS), PROMPT_TOKENS).to_tensor(model.special.pad)
    stories = [transform.encode_story(tok, tf.constant(s), 32) for s in STORIES]
    decoder_ids = tf.ragged.stack([d for d, _ in stories]).to_tensor(model.special.pad)
    targets = tf.ragged.stack([t for _, t in stories]).to_tensor(model.special.pad)
    return tf.data.Dataset.from_tensors(((prompts, decoder_ids), targets)).repeat()


# float32: bf16 (the default where the CPU has it) has a test of its own.
FINE_TUNING = TrainingConfig(learning_rate=1e-2, warmup_steps=0, mixed_precision=False)


def fine_tune(preset, out, steps=6, training=FINE_TUNING, **overrides):
    """A few training steps on the Chinese and English prompts and stories; returns the saved
    preset and the history."""
    config = model_config(preset, **overrides)
    model = build_model(config)
    batches = story_batches(model)
    run = trainer.Trainer(config, training, total_steps=steps, model=model)
    history = run.fit(batches, batches.take(1), steps_per_epoch=steps, epochs=1)
    save_model(run.float32_model, str(out))
    return str(out / PRESET_DIR), history


@pytest.mark.parametrize("block, halves", [(32, False), (4, False), (32, True)])
def test_cached_decoding_is_the_forward_pass(preset, monkeypatch, block, halves):
    """decode_step's logits, position by position, are those of the model's forward pass (T5's
    relative bias over a growing cache, T5Gemma's sliding window of 4 over 14 positions), with
    the cache in one block and in blocks of 4 positions (the window then starts blocks later),
    and with the steps' kernels in column halves (`decoding.in_column_halves`)."""
    monkeypatch.setattr(decoding, "CACHE_BLOCK", block)
    model = build_model(model_config(preset))
    encoder_ids = transform.encode_prompts(tokenizer_of(model), tf.constant(PROMPTS[:2]), PROMPT_TOKENS).to_tensor(
        model.special.pad)
    story_ids = tf.random.stateless_uniform([2, 13], seed=[1, 2], minval=3, maxval=model.vocab_size, dtype=tf.int32)
    decoder_ids = tf.concat([tf.fill([2, 1], model.special.start), story_ids], axis=1)
    expected = model((encoder_ids, decoder_ids)).numpy()
    states, mask = model.encode(encoder_ids)
    weights = decoding.in_column_halves(model.decoding_weights()) if halves else model.decoding_weights()
    logits, cache = model.prefill(decoder_ids[:, :1], states, mask, 32, weights)
    np.testing.assert_allclose(logits[:, 0], expected[:, 0], atol=5e-4)
    for t in range(1, 14):
        logits, cache = model.decode_step(decoder_ids[:, t], t, cache, weights)
        np.testing.assert_allclose(logits, expected[:, t], atol=5e-4)  # logits up to about 6


@pytest.mark.slow
def test_exported_greedy_decoding_is_keras_hubs_token_for_token(preset, saved_model):
    exported = exported_greedy(tf.saved_model.load(saved_model))
    expected = keras_hub_greedy(preset)
    assert exported == expected
    assert len({tuple(ids) for ids in expected}) > 1  # the prompts lead to different stories


@pytest.mark.slow
@pytest.mark.parametrize("min_rows", [1, 10 ** 6], ids=["16 blocks", "column halves"])
def test_t5gemma_decodes_keras_hubs_tokens_with_its_projection_in_blocks(tmp_path, monkeypatch, min_rows):
    """The output projection in blocks (`decoding.head_for_batch`, which 256k-piece vocabularies
    such as T5Gemma's take: column halves below 8 rows, 16 blocks from there on), with its
    thresholds set so that these prompts and the tiny vocabulary take each layout, still decodes
    keras-hub's greedy tokens."""
    monkeypatch.setattr(decoding, "BLOCKED_HEAD_MIN_ROWS", min_rows)
    monkeypatch.setattr(decoding, "BLOCKED_HEAD_MIN_VOCAB", decoding.HEAD_BLOCKS)
    preset = preset_fixtures.save_t5gemma_preset(str(tmp_path / "preset"))
    model = build_model(model_config(preset))
    assert model.vocab_size % decoding.HEAD_BLOCKS == 0
    assert exported_greedy(tf.saved_model.load(export(model, tmp_path / "export"))) == keras_hub_greedy(preset)


@pytest.mark.slow
def test_a_story_continued_in_pieces_is_the_one_generate_writes(saved_model):
    """60 tokens from a 32-token window, in pieces that start before, at and after its slides
    (each architecture's prefill and encoder re-read the story so far)."""
    loaded = tf.saved_model.load(saved_model)
    sampling = dict(temperature=tf.constant(1.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                    seed=tf.constant(4, tf.int64))
    whole = loaded.signatures["generate"](prompt=tf.constant(PROMPTS), max_new_tokens=tf.constant(60), **sampling)
    token_ids = tf.zeros([len(PROMPTS), 0], tf.int32)
    for size in (3, 17, 40):
        out = loaded.signatures["continue_story"](prompt=tf.constant(PROMPTS), token_ids=token_ids,
                                                  max_new_tokens=tf.constant(size), **sampling)
        token_ids = out["token_ids"]
    assert max(whole["num_tokens"].numpy()) > 33  # some story outgrew the window
    np.testing.assert_array_equal(token_ids.numpy(), whole["token_ids"].numpy())
    assert list(out["story"].numpy()) == list(whole["story"].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": False, "decoder_num_key_value_heads": 4}],
                         ids=["tied, grouped", "untied, a key per head"])
def test_t5gemma_decodes_keras_hubs_tokens_with_its_window_and_caps_in_play(tmp_path, changes):
    """The sliding window and the attention soft-cap change keras-hub's own greedy stories for
    these prompts (so the exact match covers them); with grouped-query attention and without
    (t5gemma_s_s has as many key/value heads as query heads), and with an untied output head."""
    expected = keras_hub_greedy(preset_fixtures.save_t5gemma_preset(str(tmp_path / "preset"), **changes))
    without_window = keras_hub_greedy(preset_fixtures.save_t5gemma_preset(
        str(tmp_path / "no_window"), decoder_layer_types=["full_attention"] * 2, **changes))
    without_cap = keras_hub_greedy(preset_fixtures.save_t5gemma_preset(
        str(tmp_path / "no_cap"), attn_logit_softcapping=None, **changes))
    assert without_window != expected and without_cap != expected
    model = build_model(model_config(str(tmp_path / "preset")))
    assert exported_greedy(tf.saved_model.load(export(model, tmp_path / "export"))) == expected


# Every architecture fine-tuned once; all weights on the ReLU T5 (tied output) and T5Gemma, LoRA on
# the gated T5 (both T5s have the same Dense projections), BART (keras's EinsumDense ones) and T5Gemma.
@pytest.mark.slow
@pytest.mark.parametrize("preset, lora_rank", [("bart", 4), ("t5", 0), ("t5_gated", 4), ("t5gemma", 0),
                                               ("t5gemma", 4)], indirect=["preset"])
def test_fine_tuned_preset_loads_in_keras_hub_and_exports_the_same_tokens(preset, tmp_path, lora_rank):
    before = build_model(model_config(preset)).get_weights()
    saved, history = fine_tune(preset, tmp_path, lora_rank=lora_rank)
    assert history["loss"][0] < 20 and history["steps"] == 6
    tuned = load_model(str(tmp_path), model_config(preset))
    changed = [not np.allclose(a, b) for a, b in zip(before, tuned.get_weights())]
    # Full fine-tuning changes most weights; LoRA only the attention projections it targets
    # (merged into the saved kernels).
    assert (sum(changed) > len(changed) / 2) if lora_rank == 0 else (0 < sum(changed) < len(changed) / 2)
    exported = exported_greedy(tf.saved_model.load(export(tuned, tmp_path / "export")))
    assert exported == keras_hub_greedy(saved)


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True])
def test_decoding_chooses_only_ids_the_tokenizer_has(tmp_path, gated):
    """Real T5 presets have more ids than tokenizer pieces (32128 and 32100); an id past the last
    piece cannot be detokenized, so decoding draws among the pieces alone."""
    preset = preset_fixtures.save_t5_preset(str(tmp_path / "preset"), gated=gated, extra_ids=40)
    model = build_model(model_config(preset))
    pieces = model.lm.preprocessor.tokenizer.vocabulary_size()
    assert model.backbone.vocabulary_size == pieces + 40
    out = tf.saved_model.load(export(model, tmp_path / "export")).signatures["generate"](
        prompt=tf.constant(PROMPTS), max_new_tokens=tf.constant(40), temperature=tf.constant(1.0),
        top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(1, tf.int64))
    assert out["token_ids"].numpy().max() < pieces and all(out["story"].numpy())


# The training loop treats the architectures alike; the two T5s differ only in their feed-forward
# layers, so the loop's own tests run on one of them.
LOOP_ARCHITECTURES = ["bart", "t5_gated", "t5gemma"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", LOOP_ARCHITECTURES, indirect=True)
def test_mixed_precision_fine_tunes_in_bf16_and_saves_float32(preset, tmp_path):
    if not trainer.bf16_supported():
        pytest.skip("this machine has no bf16")
    saved, history = fine_tune(preset, tmp_path, training=TrainingConfig(learning_rate=1e-2, warmup_steps=0,
                                                                         mixed_precision=True))
    assert history["loss"][0] < 20 and np.isfinite(history["val_loss"][0])
    lm = keras_hub.models.Seq2SeqLM.from_preset(saved)
    assert {w.dtype for w in lm.backbone.weights} == {"float32"}


@pytest.mark.slow
@pytest.mark.parametrize("preset", LOOP_ARCHITECTURES, indirect=True)
def test_a_killed_fine_tuning_resumes_to_the_same_weights(preset, tmp_path):
    """Three steps, a new process's worth of objects, three more: the weights of six at once
    (with LoRA, whose factors the checkpoints hold beside the frozen weights)."""
    config, training = model_config(preset, lora_rank=4), FINE_TUNING

    def train(out, epochs):
        keras.utils.set_random_seed(1)
        run = trainer.Trainer(config, training, total_steps=6)
        batches = story_batches(run.model)
        run.fit(batches, batches.take(1), steps_per_epoch=3, epochs=epochs, output_dir=str(out))
        return run.model.get_weights()

    whole = train(tmp_path / "whole", epochs=2)
    train(tmp_path / "resumed", epochs=1)  # stops at step 3, as a kill after its checkpoint would
    resumed = train(tmp_path / "resumed", epochs=2)
    for a, b in zip(whole, resumed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t5_gated"], indirect=True)
def test_mirrored_strategy_fine_tunes_like_the_default_one(preset):
    """The preset is built in the strategy's scope and trained through strategy.run, as
    `--distribution_strategy=mirrored` does (one replica on a CPU-only machine)."""
    config, training = model_config(preset), FINE_TUNING

    def fit(strategy=None):
        keras.utils.set_random_seed(1)
        run = trainer.Trainer(config, training, total_steps=3, strategy=strategy)
        batches = story_batches(run.model)
        return run, run.fit(batches, batches.take(1), steps_per_epoch=3, epochs=1)

    _, default = fit()
    run, mirrored = fit(trainer.make_strategy("mirrored"))
    assert isinstance(run.strategy, tf.distribute.MirroredStrategy)
    assert mirrored["loss"] == pytest.approx(default["loss"], rel=1e-5)
    assert mirrored["val_loss"] == pytest.approx(default["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_tuning_a_preset_searches_the_fine_tuning_space(small_examples, tmp_path):
    """One architecture: the search treats every preset alike."""
    from components import tokenizer, tuner
    from components.config import TokenizerConfig, TunerConfig

    preset = preset_fixtures.save_t5_preset(str(tmp_path / "preset"), gated=True)
    (tmp_path / "tokenizer").mkdir()
    tokenizer.train_tokenizer(small_examples, str(tmp_path / "tokenizer"), TokenizerConfig(init_from=preset))
    config = TunerConfig(tuner="random", max_trials=2, max_epochs_per_trial=1, tune_steps_per_epoch=2)
    result = tuner.tune(small_examples, str(tmp_path / "tokenizer"), str(tmp_path / "tuner"), config,
                        model_config(preset), TrainingConfig(batch_size=4, seed=1, mixed_precision=False))
    assert set(result["best_hparams"]) == set(tuner.FINE_TUNING_SPACE)
    assert result["best_hparams"]["lora_rank"] in tuner.FINE_TUNING_SPACE["lora_rank"]["values"]


def test_lora_trains_only_the_lora_factors(preset):
    model = build_model(model_config(preset, lora_rank=4))
    names = [v.path for v in model.trainable_variables]
    lora = [name for name in names if "lora_kernel" in name]
    # Keras's enable_lora freezes a layer's kernel and keeps its bias trainable (BART's projections have one).
    assert lora and all(name.endswith("/bias") and name.rsplit("/", 2)[1] in ("query", "value")
                        for name in set(names) - set(lora))


@pytest.mark.slow
def test_score_is_keras_hubs_log_likelihood(preset, saved_model):
    score = tf.saved_model.load(saved_model).signatures["score"]
    scored = score(prompt=tf.constant(PROMPTS), story=tf.constant(STORIES))
    lm = keras_hub.models.Seq2SeqLM.from_preset(preset)
    lm.preprocessor.encoder_sequence_length, lm.preprocessor.decoder_sequence_length = PROMPT_TOKENS, 34
    x, y, weights = lm.preprocessor({"encoder_text": tf.constant(PROMPTS), "decoder_text": tf.constant(STORIES)})
    log_probs = tf.nn.log_softmax(lm(x))
    expected = tf.reduce_sum(tf.gather(log_probs, y, batch_dims=2) * tf.cast(weights, tf.float32), axis=1)
    np.testing.assert_allclose(scored["log_likelihood"].numpy(), expected.numpy(), atol=1e-3, rtol=1e-5)


def test_private_keras_hub_reads_are_where_they_were():
    from components.model import internals

    block = keras_hub.layers.TransformerDecoder(intermediate_dim=8, num_heads=2)
    block(keras.ops.ones((1, 3, 4)), keras.ops.ones((1, 2, 4)))
    parts = internals.decoder_block_parts(block)
    assert isinstance(parts.self_attention, keras.layers.MultiHeadAttention) and parts.output.units == 4
    del block._feedforward_output_dense
    with pytest.raises(AttributeError, match="_feedforward_output_dense"):
        internals.decoder_block_parts(block)


def test_a_hub_handle_without_network_is_one_sentence():
    with pytest.raises(UserError) as raised:
        presets.resolve("t5_small_multi")
    message = str(raised.value)
    assert "'t5_small_multi'" in message and "--init_from=DIR" in message and "\n" not in message


def test_other_architectures_are_refused_with_the_supported_list(tmp_path):
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=8, max_sequence_length=8)
    backbone.save_to_preset(str(tmp_path))
    supported = r"T5 and Flan-T5 \(T5Backbone\), BART \(BartBackbone\), T5Gemma \(T5GemmaBackbone\)\."
    with pytest.raises(UserError, match=r"GPT2Backbone preset; storygen fine-tunes " + supported):
        presets.resolve(str(tmp_path))


def test_shape_flags_that_contradict_the_preset_are_refused(preset):
    presets.resolve(preset, model_config(preset, d_model=ModelConfig().d_model))  # a default is not a contradiction
    with pytest.raises(UserError, match=r"--d_model=48 contradicts the preset .*hidden_dim=16"):
        presets.resolve(preset, model_config(preset, d_model=48))
    with pytest.raises(UserError, match="--vocab_size=5000 contradicts"):
        presets.resolve(preset, model_config(preset, vocab_size=5000))


def test_a_missing_directory_is_refused():
    with pytest.raises(UserError, match="no such preset directory"):
        presets.resolve(os.path.join("no", "such", "preset"))


# tf-text's ops that a byte-level BPE tokenizer (keras-hub's BytePairTokenizer, BART's) adds.
BYTE_PAIR_OPS = {"RegexSplitWithOffsets"}


@pytest.mark.slow
def test_graph_has_only_core_and_tokenizer_ops(saved_model):
    from exporter_test import SENTENCEPIECE_OPS, graph_ops

    report = graph_ops(saved_model)
    assert set(report["unknown"]) <= SENTENCEPIECE_OPS | BYTE_PAIR_OPS and report["unknown"]
    assert not [op for op in report["ops"] if op.startswith("Xla")]
