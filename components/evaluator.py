"""Held-out evaluation: token perplexity and bits per character on the test split.

Bits per character divide the total negative log-likelihood (in bits) by the characters
the scored tokens spell, so they compare across tokenizers; perplexity is per token.
A unigram model of the training split's tokens (add-one smoothed) is scored on the same
tokens as the floor any trained model must beat.
"""

import collections
import json
import math
import time

import numpy as np
import tensorflow as tf

from components.common import PAD_ID
from components.transform import example_features

METRICS_FILE = "metrics.json"


def token_counts(dataset: tf.data.Dataset, vocab_size: int) -> np.ndarray:
    """How often each id occurs among the targets of a dataset of example features."""
    counts = np.zeros(vocab_size, np.int64)
    for features in dataset.as_numpy_iterator():
        np.add.at(counts, features["targets"], 1)
    return counts


def evaluate(model, tokenizer, examples_dir: str, output_dir: str, *, batch_size: int,
             max_prompt_tokens: int, max_story_tokens: int) -> dict:
    """Writes metrics.json ({"test": overall, "by_lang": {...}}) and returns it."""
    start = time.time()
    options = dict(max_prompt_tokens=max_prompt_tokens, max_story_tokens=max_story_tokens)
    unigram = token_counts(example_features(examples_dir, "train", tokenizer, **options), model.vocab_size) + 1.0
    unigram_log_prob = np.log(unigram / unigram.sum())

    @tf.function(reduce_retracing=True)
    def score(encoder_ids, decoder_ids, targets):
        logits = model((encoder_ids, decoder_ids), training=False)
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        mask = tf.not_equal(targets, PAD_ID)
        # Characters spelled by the scored tokens (EOS spells none).
        chars = tf.strings.length(tokenizer.detokenize(tf.ragged.boolean_mask(targets, mask)), unit="UTF8_CHAR")
        return tf.reduce_sum(tf.where(mask, nll, 0.0), axis=1), chars

    totals = collections.defaultdict(lambda: np.zeros(4))  # nll, unigram nll, tokens, chars
    batches = example_features(examples_dir, "test", tokenizer, **options).padded_batch(batch_size)
    for batch in batches:
        nll, chars = score(batch["encoder_ids"], batch["decoder_ids"], batch["targets"])
        targets = batch["targets"].numpy()
        mask = targets != PAD_ID
        unigram_nll = -np.where(mask, unigram_log_prob[targets], 0.0).sum(axis=1)
        for row, lang in enumerate(batch["lang"].numpy()):
            stats = np.array([nll[row], unigram_nll[row], mask[row].sum(), chars[row]])
            totals["all"] += stats
            totals[lang.decode()] += stats
    metrics = {"test": _summary(totals.pop("all")), "by_lang": {k: _summary(v) for k, v in sorted(totals.items())}}
    metrics["seconds"] = time.time() - start
    with tf.io.gfile.GFile(f"{output_dir}/{METRICS_FILE}", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _summary(totals) -> dict:
    nll, unigram_nll, tokens, chars = totals
    return {
        "perplexity": math.exp(nll / tokens),
        "bits_per_char": nll / math.log(2) / chars,
        "unigram_perplexity": math.exp(unigram_nll / tokens),
        "unigram_bits_per_char": unigram_nll / math.log(2) / chars,
        "tokens": int(tokens),
        "chars": int(chars),
    }
