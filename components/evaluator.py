"""Held-out evaluation on the test split: perplexity and bits per character, beside baselines.

Bits per character divide the total negative log-likelihood (in bits) by the characters
the scored tokens spell, so they compare across tokenizers and with character models;
perplexity is per token. Two baselines are trained on the training split and scored on
exactly the same text: a unigram model of the tokens (add-one smoothed; the floor any
trained model must beat) and a character 5-gram model with Kneser-Ney smoothing.
Everything is reported overall and per language.
"""

import collections
import json
import math
import time

import numpy as np
import tensorflow as tf

from components.char_ngram import CharNGramModel
from components.common import PAD_ID, iterate_split, read_split
from components.transform import example_features

METRICS_FILE = "metrics.json"
NGRAM_ORDER = 5
NGRAM_MAX_TRAIN_CHARS = 20_000_000  # the n-gram's counts live in Python dicts: bound its memory


def token_counts(dataset: tf.data.Dataset, vocab_size: int) -> np.ndarray:
    """How often each id occurs among the targets of a dataset of example features."""
    counts = np.zeros(vocab_size, np.int64)
    for features in dataset.as_numpy_iterator():
        np.add.at(counts, features["targets"], 1)
    return counts


def train_char_ngram(examples_dir: str) -> CharNGramModel:
    """The n-gram baseline on the training split's prompts and stories."""
    def texts():
        chars = 0
        for record in iterate_split(examples_dir, "train"):
            chars += len(record["prompt"]) + len(record["story"])
            if chars > NGRAM_MAX_TRAIN_CHARS:
                return
            yield record["prompt"] + record["story"]
    return CharNGramModel(order=NGRAM_ORDER).fit(texts())


def evaluate(model, tokenizer, examples_dir: str, output_dir: str, *, batch_size: int,
             max_prompt_tokens: int, max_story_tokens: int) -> dict:
    """Writes metrics.json ({"test": overall, "by_lang": {...}}) and returns it."""
    start = time.time()
    options = dict(max_prompt_tokens=max_prompt_tokens, max_story_tokens=max_story_tokens)
    unigram = token_counts(example_features(examples_dir, "train", tokenizer, **options), model.vocab_size) + 1.0
    unigram_log_prob = np.log(unigram / unigram.sum())
    ngram = train_char_ngram(examples_dir)

    @tf.function(reduce_retracing=True)
    def score(encoder_ids, decoder_ids, targets):
        logits = model((encoder_ids, decoder_ids), training=False)
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        mask = tf.not_equal(targets, PAD_ID)
        # The text the scored tokens spell (EOS spells none).
        text = tokenizer.detokenize(tf.ragged.boolean_mask(targets, mask))
        return tf.reduce_sum(tf.where(mask, nll, 0.0), axis=1), text

    totals = collections.defaultdict(lambda: np.zeros(5))  # nll, unigram nll, n-gram nll, tokens, chars
    test = example_features(examples_dir, "test", tokenizer, **options).padded_batch(batch_size)
    stories = tf.data.Dataset.zip(test, _raw_batches(examples_dir, batch_size))
    for batch, raw in stories:
        nll, texts = score(batch["encoder_ids"], batch["decoder_ids"], batch["targets"])
        targets = batch["targets"].numpy()
        mask = targets != PAD_ID
        unigram_nll = -np.where(mask, unigram_log_prob[targets], 0.0).sum(axis=1)
        for row, lang in enumerate(batch["lang"].numpy()):
            text = texts[row].numpy().decode("utf-8")
            story = raw["story"][row].numpy().decode("utf-8")
            # The n-gram scores the same text; its end only when the model scored EOS too.
            ngram_nll = -ngram.log_prob(text, context=raw["prompt"][row].numpy().decode("utf-8"),
                                        with_end=len(text) == len(story))
            stats = np.array([nll[row], unigram_nll[row], ngram_nll, mask[row].sum(), len(text)])
            totals["all"] += stats
            totals[lang.decode()] += stats
    metrics = {"test": _summary(totals.pop("all")), "by_lang": {k: _summary(v) for k, v in sorted(totals.items())}}
    metrics["seconds"] = time.time() - start
    with tf.io.gfile.GFile(f"{output_dir}/{METRICS_FILE}", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def _raw_batches(examples_dir, batch_size):
    """The test split's prompt and story strings, in the same order as example_features."""
    return read_split(examples_dir, "test").map(lambda e: {"prompt": e["prompt"], "story": e["story"]}).batch(batch_size)


def _summary(totals) -> dict:
    nll, unigram_nll, ngram_nll, tokens, chars = totals
    bits = 1 / math.log(2) / chars
    return {
        "perplexity": math.exp(nll / tokens),
        "bits_per_char": nll * bits,
        "unigram_perplexity": math.exp(unigram_nll / tokens),
        "unigram_bits_per_char": unigram_nll * bits,
        f"char_{NGRAM_ORDER}gram_bits_per_char": ngram_nll * bits,
        "tokens": int(tokens),
        "chars": int(chars),
    }
