"""Decoding speed: the exported SavedModel against peers, greedy on random weights.

Section `decoding` of `python -m benchmarks.run`. Every peer decodes with the training section's
model (`training.MODEL`: 4+4 layers, d_model 256, feed-forward 1024, vocab 8000), greedy, 256
new tokens (--quick: 32) after an 8-token prompt, at batch 1, 16 and 64:
- storygen: the exported `generate` signature (a tf.while_loop over a key/value cache written
  in place, plain TensorFlow ops per token, no XLA), loaded back with tf.saved_model.load as
  TF Serving would (measured as fast as the same generator called in process);
- recompute: the same Keras model, a tf.function that re-runs the decoder over the whole
  prefix at every step (no cache);
- keras-hub: `BartSeq2SeqLM.generate()` (its cached sampler in a tf.function; `compile`'s
  default jit_compile="auto" turns XLA off on a machine without accelerators), built without
  presets;
- torch: the PyTorch model of the same size, greedy with a key/value cache, eager, fp32
  (benchmarks/torch_peers.py), with OMP_WAIT_POLICY=PASSIVE and unset, the faster kept.
The TensorFlow peers share one worker process, each torch setting has its own; each peer is
warmed up once (tracing, XLA compilation), then timed in turns with the others.

Sections `decoding_t5` and `decoding_t5gemma` decode a pretrained architecture instead, with
random weights, saved as a keras-hub preset and loaded back with `presets.load`, greedy, 128 new
tokens (--quick: 16, on a tiny shape), batch 1 and 16 (PRETRAINED_BATCH_SIZES):
- `decoding_t5`: a T5 v1.0 of keras-hub's `t5_small_multi` shape (6+6 layers, d_model 512, 8
  heads of 64, ReLU feed-forward 2048, tied embeddings, vocab 32128);
- `decoding_t5gemma`: a T5Gemma of `t5gemma_s_s`'s shape (8+8 layers, d_model 512, 8 heads of
  64, GELU-gated feed-forward 1024, sliding window 4096 on every other layer, attention and
  final logit soft-caps 50 and 30, tied embeddings, vocab 256000: 312,517,632 parameters, as
  keras-hub's preset list gives them; the values are those of the published T5Gemma configs);
- storygen: the exported `generate` signature of the architecture's adapter (components/model/);
- keras-hub: `Seq2SeqLM.generate()` on the same preset, greedy, in a tf.function without XLA
  (jit_compile=False, `compile`'s default on CPU) and with it (jit_compile=True).
keras-hub never stops at EOS (stop_token_ids=None) and writes exactly 128 tokens per row;
storygen's rate counts only the tokens a row wrote before EOS (a note says when one stopped
early), so storygen is never credited with work it did not do.
"""

import dataclasses
import io
import tempfile

from benchmarks import training
from benchmarks.harness import (INTRA_OP_SETTINGS, OMP_SETTINGS, alternate, best_setting, setting_name, setting_of,
                               settings, timed)
from components.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from components.config import ExportConfig, ModelConfig

PROMPT_TOKENS = 8
# The prompt of recompute, keras-hub and torch: this ordinary piece (not a special id), repeated.
PROMPT_TOKEN_ID = 5
BATCH_SIZES = (1, 16, 64)
TARGETS = {"keras-hub": 1.0, "recompute": 5.0}
# storygen's prompt, as text: the exported signature tokenizes it.
PROMPT_TEXT = "abc defg hij klmno pq"

# A pretrained architecture's decoding section: its keras-hub classes, its shape (and --quick's), and
# its tokenizer's special pieces (SentencePiece trainer arguments).
@dataclasses.dataclass(frozen=True)
class Pretrained:
    name: str  # in the rows' names
    preset_name: str  # whose shape it has
    description: str  # the shape, in the section's note
    classes: str  # keras_hub.models.<classes>Backbone, ...Tokenizer, ...Seq2SeqLMPreprocessor, ...Seq2SeqLM
    shape: dict
    quick_shape: dict
    special_ids: dict


PRETRAINED = {
    "decoding_t5": Pretrained(
        "T5", "t5_small_multi", "T5 v1.0: 6+6 layers, d_model 512, 8 heads of 64, ReLU ff 2048, tied embeddings, "
        "vocab 32128", "T5",
        dict(vocabulary_size=32128, num_layers=6, num_heads=8, hidden_dim=512, intermediate_dim=2048,
             key_value_dim=64, activation="relu", use_gated_activation=False, tie_embedding_weights=True, dropout=0.0),
        dict(vocabulary_size=512, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, key_value_dim=16,
             activation="relu", use_gated_activation=False, tie_embedding_weights=True, dropout=0.0),
        # T5's: pad (also the decoder's start), EOS, unknown, no BOS.
        dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)),
    "decoding_t5gemma": Pretrained(
        "T5Gemma", "t5gemma_s_s", "T5Gemma: 8+8 layers, d_model 512, 8 heads of 64 (8 key/value heads), GELU-gated ff "
        "1024, sliding window 4096 on every other layer, soft-caps 50/30, tied embeddings, vocab 256000", "T5Gemma",
        {f"{side}_{key}": value for side in ("encoder", "decoder") for key, value in dict(
            hidden_dim=512, intermediate_dim=1024, num_layers=8, num_attention_heads=8, num_key_value_heads=8,
            head_dim=64, layer_types=["sliding_attention", "full_attention"] * 4).items()}
        | dict(vocabulary_size=256000, query_pre_attn_scalar=64, sliding_window=4096, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, tie_word_embeddings=True),
        {f"{side}_{key}": value for side in ("encoder", "decoder") for key, value in dict(
            hidden_dim=32, intermediate_dim=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, layer_types=["sliding_attention", "full_attention"]).items()}
        | dict(vocabulary_size=512, query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=50.0,
               final_logit_softcapping=30.0, tie_word_embeddings=True),
        # Gemma's: pad, EOS, BOS (the decoder's start), unknown, with the names keras-hub's tokenizer looks for.
        dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
             unk_piece="<unk>")),
}
PRETRAINED_PROMPT_WINDOW = 16
PRETRAINED_PEERS = {"keras-hub graph": False, "keras-hub XLA": True}  # peer -> keras-hub's jit_compile
PRETRAINED_TARGET = 1.5
PRETRAINED_BATCH_SIZES = (1, 16)
# SentencePiece pieces trained for a pretrained shape's tokenizer; a larger vocabulary gets
# made-up pieces added to reach the model's size (see `sized_tokenizer_proto`).
TRAINED_PIECES = 32128

def model_config(new_tokens: int) -> ModelConfig:
    """The decoded model: the training section's, with a decoder window of the new tokens after BOS."""
    return dataclasses.replace(training.MODEL, max_story_tokens=new_tokens + 1)


def make_tokenizer_proto(vocab_size: int, num_sentences: int = 30000, **special_ids) -> bytes:
    """A SentencePiece model of the wanted size, trained on `num_sentences` of synthetic words
    (the benchmark times decoding, not text quality); `special_ids` (pad_id, unk_id, bos_id,
    eos_id) default to storygen's. A large vocabulary gets more distinct words, so that there
    are enough pieces."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    num_words = max(20000, 2 * vocab_size)
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(num_words)]
    sentences = (" ".join(rng.choice(words) for _ in range(30)) for _ in range(num_sentences))
    ids = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, **special_ids}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
                                   byte_fallback=True, minloglevel=2, **ids)
    return model.getvalue()


def greedy_generate(generate, new_tokens: int):
    """`run(batch) -> tokens generated` of an exported `generate` signature: greedy, PROMPT_TEXT
    in every row; the tokens counted are those before each row's EOS."""
    import tensorflow as tf

    def run(batch):
        out = generate(prompt=tf.constant([PROMPT_TEXT] * batch), max_new_tokens=tf.constant(new_tokens),
                       temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                       seed=tf.constant(0, tf.int64))
        return int(tf.reduce_sum(out["num_tokens"]))

    return run


def storygen_peers(new_tokens: int) -> dict:
    """{'storygen': the exported generate signature, 'recompute': the cacheless loop}, each
    `run(batch) -> tokens decoded`."""
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the SentencePiece ops of the SavedModel

    from components import exporter
    from components.tokenizer import make_tokenizer
    from components.model import build_model

    config = model_config(new_tokens)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    tokenizer = make_tokenizer(make_tokenizer_proto(config.vocab_size))
    # serving_default's sampling settings do not matter: the benchmark calls `generate`, greedy.
    path = exporter.export(model, tokenizer, tempfile.mkdtemp(), ExportConfig(max_new_tokens_limit=new_tokens))
    run_storygen = greedy_generate(tf.saved_model.load(path).signatures["generate"], new_tokens)

    @tf.function(reduce_retracing=True)
    def recompute(encoder_ids):
        batch = tf.shape(encoder_ids)[0]
        states, mask = model.encode(encoder_ids)
        tokens = tf.concat([tf.fill([batch, 1], BOS_ID), tf.fill([batch, new_tokens], PAD_ID)], axis=1)

        def step(t, tokens):
            logits = model.decode(tokens[:, : t + 1], states, mask)[:, -1, :]
            next_token = tf.argmax(logits, axis=-1, output_type=tf.int32)
            update = tf.stack([tf.range(batch), tf.fill([batch], t + 1)], axis=1)
            return t + 1, tf.tensor_scatter_nd_update(tokens, update, next_token)

        return tf.while_loop(lambda t, _: t < new_tokens, step, (tf.constant(0), tokens))[1]

    def run_recompute(batch):
        recompute(tf.fill([batch, PROMPT_TOKENS], PROMPT_TOKEN_ID))
        return batch * new_tokens

    return {"storygen": run_storygen, "recompute": run_recompute}


def keras_hub_peer(new_tokens: int):
    """keras-hub's BartSeq2SeqLM of the same size, greedy: `run(batch) -> tokens decoded`."""
    import keras
    import keras_hub
    import numpy as np

    config = model_config(new_tokens)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(vocabulary_size=config.vocab_size, num_layers=config.num_layers,
                                             num_heads=config.num_heads, hidden_dim=config.d_model,
                                             intermediate_dim=config.ff_dim,
                                             max_sequence_length=new_tokens + PROMPT_TOKENS + 2)
    lm = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")

    def run(batch):
        decoder_ids = np.full((batch, new_tokens + 1), PAD_ID, "int32")
        decoder_ids[:, 0] = BOS_ID
        inputs = {"encoder_token_ids": np.full((batch, PROMPT_TOKENS), PROMPT_TOKEN_ID, "int32"),
                  "encoder_padding_mask": np.ones((batch, PROMPT_TOKENS), bool),
                  "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_ids != PAD_ID}
        lm.generate(inputs, stop_token_ids=None)
        return batch * new_tokens

    return run


def tf_decoding_worker(new_tokens: int):
    """Worker: storygen, recompute and keras-hub; `run(peer, batch)` times one batch."""
    peers = dict(storygen_peers(new_tokens), **{"keras-hub": keras_hub_peer(new_tokens)})
    return {"run": timed(lambda peer, batch: {"tokens": peers[peer](batch)}), "peers": lambda: list(peers)}


def torch_decoding_worker(new_tokens: int):
    """Worker: the PyTorch model of the same size, greedy with a KV cache, eager, fp32."""
    import torch

    from benchmarks import torch_peers

    torch.manual_seed(0)
    decoder = torch_peers.CachedDecoder(torch_peers.make_model(dataclasses.asdict(model_config(new_tokens))))

    def run(peer: str, batch: int):
        encoder_ids = torch.full((batch, PROMPT_TOKENS), PROMPT_TOKEN_ID, dtype=torch.long)
        return {"tokens": int(decoder.generate(encoder_ids, new_tokens).numel())}

    return {"run": timed(run), "peers": lambda: ["torch"]}


def run_section(h):
    new_tokens = 32 if h.quick else 256
    config = model_config(new_tokens)
    tf_worker = h.worker("decoding-tf", "benchmarks.decoding:tf_decoding_worker", new_tokens=new_tokens)
    peers = {name: tf_worker for name in tf_worker.call("peers")}
    for setting in settings(h, OMP_SETTINGS):
        peers[f"torch OMP {setting_name(setting)}"] = h.worker(
            f"decoding-torch-{setting_name(setting)}", "benchmarks.decoding:torch_decoding_worker",
            env={"OMP_WAIT_POLICY": setting}, new_tokens=new_tokens)
    h.note(f"decoding: greedy, {new_tokens} new tokens after an {PROMPT_TOKENS}-token prompt, random weights, "
           f"{config.num_layers}+{config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
           f"ff {config.ff_dim}, vocab {config.vocab_size}; storygen = the exported `generate` signature "
           "(SavedModel, tf.while_loop + KV cache, no XLA); keras-hub = BartSeq2SeqLM.generate (compile's default "
           "jit_compile: XLA only where there is an accelerator); "
           "torch = eager fp32 KV-cache decoder (benchmarks/torch_peers.py)")
    for batch in BATCH_SIZES:
        runs = {name: (lambda name=name, w=w: w.call("run", peer=name.split(" OMP ")[0], batch=batch))
                for name, w in peers.items()}
        for run in runs.values():
            run()  # warm-up: tracing, XLA compilation
        stats = alternate(runs, h.repeats)
        rates = {name: s.map(lambda r: r["tokens"] / r["seconds"]) for name, s in stats.items()}
        best_torch = best_setting(h, f"decoding batch {batch} torch", rates,
                                  [n for n in rates if n.startswith("torch")], "OMP_WAIT_POLICY")
        for peer, target in TARGETS.items():
            h.row(f"decoding batch {batch}: tokens/s vs {peer}", "tokens/s", rates["storygen"], peer, rates[peer],
                  target=target)
        h.row(f"decoding batch {batch}: tokens/s vs torch", "tokens/s", rates["storygen"],
              f"torch KV cache, eager fp32, OMP {setting_of(best_torch)}", rates[best_torch])
    for w in set(peers.values()):
        w.close()


# ---------------------------------------------------------------------- sections decoding_t5, decoding_t5gemma


def sized_tokenizer_proto(vocab_size: int, quick: bool, special_ids: dict) -> bytes:
    """A SentencePiece model with exactly `vocab_size` pieces: trained ones (at most
    TRAINED_PIECES; training 256k pieces would take longer than the benchmark) and made-up
    pieces after them that no prompt contains. The model's every id is then a piece, so that
    storygen (which decodes among the tokenizer's pieces only) and keras-hub (among all of the
    model's ids) compute the same output projection."""
    from components import spm_model

    trained = min(vocab_size, TRAINED_PIECES)
    proto = spm_model.ModelProto.FromString(
        make_tokenizer_proto(trained, num_sentences=3000 if quick else 30000, **special_ids))
    lowest = min(piece.score for piece in proto.pieces)
    for i in range(vocab_size - len(proto.pieces)):
        proto.pieces.add(piece=f"\u2581zz{i}", score=lowest - 1 - i, type=spm_model.NORMAL)
    return proto.SerializeToString()


def save_pretrained_preset(arch: Pretrained, directory: str, quick: bool, new_tokens: int) -> str:
    """A Seq2SeqLM of the architecture's shape (--quick: its tiny one) with random weights, saved as a keras-hub preset."""
    import keras
    import keras_hub

    shape = arch.quick_shape if quick else arch.shape
    keras.utils.set_random_seed(0)
    models = keras_hub.models
    tokenizer = getattr(models, f"{arch.classes}Tokenizer")(
        proto=sized_tokenizer_proto(shape["vocabulary_size"], quick, arch.special_ids))
    backbone = getattr(models, f"{arch.classes}Backbone")(**shape)
    preprocessor = getattr(models, f"{arch.classes}Seq2SeqLMPreprocessor")(
        tokenizer=tokenizer, encoder_sequence_length=PRETRAINED_PROMPT_WINDOW, decoder_sequence_length=new_tokens + 1)
    getattr(models, f"{arch.classes}Seq2SeqLM")(backbone=backbone, preprocessor=preprocessor).save_to_preset(directory)
    return directory


def pretrained_storygen_peer(preset_dir: str, new_tokens: int):
    """The preset through storygen: presets.load, exporter.export, the loaded `generate` signature."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the SentencePiece ops of the SavedModel

    from components import exporter
    from components.model import presets
    from components.tokenizer import Tokenizer

    model = presets.load(preset_dir, ModelConfig(init_from=preset_dir, max_prompt_tokens=PRETRAINED_PROMPT_WINDOW,
                                                 max_story_tokens=new_tokens + 1))
    tokenizer = Tokenizer(model.lm.preprocessor.tokenizer, model.special)
    path = exporter.export(model, tokenizer, tempfile.mkdtemp(), ExportConfig(max_new_tokens_limit=new_tokens))
    return greedy_generate(tf.saved_model.load(path).signatures["generate"], new_tokens)


def pretrained_keras_hub_peer(preset_dir: str, new_tokens: int, jit_compile: bool):
    """keras-hub's own Seq2SeqLM.generate on the preset, greedy, on the prompt ids storygen
    decodes from (PROMPT_TEXT framed as the architecture frames prompts), with the decoder's
    start id followed by room for exactly `new_tokens`."""
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from components.model import presets
    from components.tokenizer import Tokenizer
    from components.transform import encode_prompts

    lm = keras_hub.models.Seq2SeqLM.from_preset(preset_dir)
    special = presets.special_ids(lm.preprocessor.tokenizer)
    tokenizer = Tokenizer(lm.preprocessor.tokenizer, special)
    prompt_ids = encode_prompts(tokenizer, tf.constant([PROMPT_TEXT]), PRETRAINED_PROMPT_WINDOW)[0].numpy()
    lm.preprocessor = None  # generate() takes and returns token ids
    lm.compile(sampler="greedy", jit_compile=jit_compile)

    def run(batch):
        decoder_ids = np.full((batch, new_tokens + 1), special.pad, "int32")
        decoder_ids[:, 0] = special.start
        decoder_mask = np.zeros(decoder_ids.shape, bool)
        decoder_mask[:, 0] = True
        inputs = {"encoder_token_ids": np.tile(prompt_ids, (batch, 1)),
                  "encoder_padding_mask": np.ones((batch, len(prompt_ids)), bool),
                  "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_mask}
        lm.generate(inputs, stop_token_ids=None)
        return batch * new_tokens

    return run


def pretrained_decoding_worker(section: str, new_tokens: int, quick: bool):
    """Worker: storygen and keras-hub (tf.function, XLA) on one preset of the section's
    architecture; `run(peer, batch)` times one batch."""
    preset_dir = save_pretrained_preset(PRETRAINED[section], tempfile.mkdtemp(), quick, new_tokens)
    peers = {"storygen": pretrained_storygen_peer(preset_dir, new_tokens)}
    for name, jit_compile in PRETRAINED_PEERS.items():
        peers[name] = pretrained_keras_hub_peer(preset_dir, new_tokens, jit_compile)
    return {"run": timed(lambda peer, batch: {"tokens": peers[peer](batch)}), "peers": lambda: list(peers)}


def run_pretrained_section(h, section: str):
    """Section `decoding_t5` or `decoding_t5gemma`: storygen's exported `generate` on a preset
    against keras-hub's generate, each under the TensorFlow thread setting it is faster with
    (INTRA_OP_SETTINGS, a worker per setting)."""
    arch = PRETRAINED[section]
    new_tokens = 16 if h.quick else 128
    workers = {setting: h.worker(f"{section}-intra-op-{setting_name(setting)}".replace("_", "-"),
                                 "benchmarks.decoding:pretrained_decoding_worker",
                                 env={"TF_NUM_INTRAOP_THREADS": setting}, section=section, new_tokens=new_tokens,
                                 quick=h.quick)
               for setting in settings(h, INTRA_OP_SETTINGS)}
    h.note(f"{section}: greedy, {new_tokens} new tokens, random weights, "
           f"{'a tiny ' + arch.name if h.quick else arch.description + f' ({arch.preset_name} shape)'}; storygen = "
           f"the exported `generate` of presets.load(preset); keras-hub = {arch.classes}Seq2SeqLM.generate on the same "
           "preset, stop_token_ids=None, in a tf.function (graph: jit_compile=False) or XLA-compiled (jit_compile=True); "
           "each with TensorFlow's threads as it is faster (TF_NUM_INTRAOP_THREADS unset or 1)")
    peers = next(iter(workers.values())).call("peers")
    for batch in PRETRAINED_BATCH_SIZES:
        runs = {f"{name} intra-op {setting_name(setting)}": (lambda name=name, w=w: w.call("run", peer=name, batch=batch))
                for setting, w in workers.items() for name in peers}
        for run in runs.values():
            run()  # warm-up: tracing, XLA compilation
        stats = alternate(runs, h.repeats)
        rates = {name: s.map(lambda r: r["tokens"] / r["seconds"]) for name, s in stats.items()}
        best = {name: best_setting(h, f"{section} batch {batch} {name}", rates,
                                   [run for run in runs if run.startswith(f"{name} intra-op ")], "TF_NUM_INTRAOP_THREADS")
                for name in peers}
        generated = min(r["tokens"] for r in stats[best["storygen"]].values)
        if generated < batch * new_tokens:
            h.note(f"{section} batch {batch}: storygen stopped at EOS after {generated} of {batch * new_tokens} "
                   "tokens (its rate counts the tokens generated)")
        for peer in PRETRAINED_PEERS:
            h.row(f"{arch.name} batch {batch}: tokens/s vs {peer}", "tokens/s", rates[best["storygen"]],
                  f"{peer}, intra-op {setting_of(best[peer])}", rates[best[peer]], target=PRETRAINED_TARGET)
    for w in workers.values():
        w.close()
