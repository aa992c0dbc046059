"""Decoding speed: the exported SavedModel against peers, greedy on random weights.

Section `decoding` of `python -m benchmarks.run`. Every peer decodes with the training section's
model (`training.MODEL`: 4+4 layers, d_model 256, feed-forward 1024, vocab 8000), greedy, 256
new tokens (--quick: 32) after an 8-token prompt, at batch 1 and 16:
- storygen: the exported `generate` signature (a tf.while_loop over a key/value cache written
  in place, plain TensorFlow ops per token, no XLA), loaded back with tf.saved_model.load as
  TF Serving would (measured as fast as the same generator called in process);
- recompute: the same Keras model, a tf.function that re-runs the decoder over the whole
  prefix at every step (no cache);
- keras-hub: `BartSeq2SeqLM.generate()` (its cached sampler, XLA-compiled as keras-hub does
  by default on the TensorFlow backend), built without presets;
- torch: the PyTorch model of the same size, greedy with a key/value cache, eager, fp32
  (benchmarks/torch_peers.py), with OMP_WAIT_POLICY=PASSIVE and unset, the faster kept.
The TensorFlow peers share one worker process, each torch setting has its own; each peer is
warmed up once (tracing, XLA compilation), then timed in turns with the others.
"""

import dataclasses
import io
import tempfile

from benchmarks import training
from benchmarks.harness import alternate, best_by_omp, omp_name, omp_of, omp_settings, timed
from components.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from components.config import ExportConfig, ModelConfig

PROMPT_TOKENS = 8
# The prompt of recompute, keras-hub and torch: this ordinary piece (not a special id), repeated.
PROMPT_TOKEN_ID = 5
BATCH_SIZES = (1, 16)
TARGETS = {"keras-hub": 1.0, "recompute": 5.0}


def model_config(new_tokens: int) -> ModelConfig:
    """The decoded model: the training section's, with a decoder window of the new tokens after BOS."""
    return dataclasses.replace(training.MODEL, max_story_tokens=new_tokens + 1)


def make_tokenizer_proto(vocab_size: int) -> bytes:
    """A SentencePiece model of the wanted size, trained on synthetic words (the benchmark
    times decoding, not text quality)."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    sentences = (" ".join(rng.choice(words) for _ in range(30)) for _ in range(30000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
                                   byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                                   minloglevel=2)
    return model.getvalue()


def storygen_peers(new_tokens: int) -> dict:
    """{'storygen': the exported generate signature, 'recompute': the cacheless loop}, each
    `run(batch) -> tokens decoded`."""
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the SentencePiece ops of the SavedModel

    from components import exporter
    from components.tokenizer import make_tokenizer
    from components.trainer import build_model

    config = model_config(new_tokens)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    tokenizer = make_tokenizer(make_tokenizer_proto(config.vocab_size))
    # serving_default's sampling settings do not matter: the benchmark calls `generate`, greedy.
    path = exporter.export(model, tokenizer, tempfile.mkdtemp(), ExportConfig(max_new_tokens_limit=new_tokens))
    generate = tf.saved_model.load(path).signatures["generate"]
    prompt = "abc defg hij klmno pq"

    def run_storygen(batch):
        out = generate(prompt=tf.constant([prompt] * batch), max_new_tokens=tf.constant(new_tokens),
                       temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                       seed=tf.constant(0, tf.int64))
        return int(tf.reduce_sum(out["num_tokens"]))

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
    for setting in omp_settings(h):
        peers[f"torch OMP {omp_name(setting)}"] = h.worker(
            f"decoding-torch-{omp_name(setting)}", "benchmarks.decoding:torch_decoding_worker",
            env={"OMP_WAIT_POLICY": setting}, new_tokens=new_tokens)
    h.note(f"decoding: greedy, {new_tokens} new tokens after an {PROMPT_TOKENS}-token prompt, random weights, "
           f"{config.num_layers}+{config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
           f"ff {config.ff_dim}, vocab {config.vocab_size}; storygen = the exported `generate` signature "
           "(SavedModel, tf.while_loop + KV cache, no XLA); keras-hub = BartSeq2SeqLM.generate (XLA, its default); "
           "torch = eager fp32 KV-cache decoder (benchmarks/torch_peers.py)")
    for batch in BATCH_SIZES:
        runs = {name: (lambda name=name, w=w: w.call("run", peer=name.split(" OMP ")[0], batch=batch))
                for name, w in peers.items()}
        for run in runs.values():
            run()  # warm-up: tracing, XLA compilation
        stats = alternate(runs, h.repeats)
        rates = {name: s.map(lambda r: r["tokens"] / r["seconds"]) for name, s in stats.items()}
        best_torch = best_by_omp(h, f"decoding batch {batch} torch", rates,
                                 [n for n in rates if n.startswith("torch")])
        for peer, target in TARGETS.items():
            h.row(f"decoding batch {batch}: tokens/s vs {peer}", "tokens/s", rates["storygen"], peer, rates[peer],
                  target=target)
        h.row(f"decoding batch {batch}: tokens/s vs torch", "tokens/s", rates["storygen"],
              f"torch KV cache, eager fp32, OMP {omp_of(best_torch)}", rates[best_torch])
    for w in set(peers.values()):
        w.close()
