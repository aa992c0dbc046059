"""Evaluator: how good the trained model is on the test split, and whether it may be pushed.

Likelihood: token perplexity and bits per character. Bits per character divide the total
negative log-likelihood (in bits) by the characters the scored tokens spell, so they compare
across tokenizers and with character models. Two baselines are trained on the training split
and scored on exactly the same text: a unigram model of the tokens (add-one smoothed; the floor
any trained model must beat) and a character 5-gram model with Kneser-Ney smoothing. On the
built-in corpus the grammar gives the exact log-probability of each continuation, so the
entropy gap (model bits per character minus the exact conditional entropy) says how far the
model is from perfect.

Generation: greedy continuations of test prompts, scored with BLEU, ROUGE-1/2/L, distinct-1/2,
repeated 4-grams and length ratio; on the built-in corpus also the share the grammar accepts and
the share that keep the prompt's hero. Everything is sliced by language and by tag, as TFMA does.

Blessing (as TFX's Evaluator): the candidate is compared with the newest pushed version of the
same model, scored through that SavedModel's `score` signature on the same test split; it is
blessed when its bits per character is at most the baseline's plus --max_bpc_regression and it
passes the absolute threshold --max_bits_per_char (a first model needs only the latter).
"""

import collections
import json
import math
import os
import time

import numpy as np
import tensorflow as tf

from components import corpus
from components.char_ngram import CharNGramModel
from components.config import EvaluationConfig
from components.records import iterate_split, read_split
from components.model.decoding import StoryGenerator
from components.text_metrics import generation_metrics
from components.transform import example_features, padding_values, spelled

METRICS_FILE = "metrics.json"
BLESSING_FILE = "blessing.json"
REPORT_FILE = "eval_report.md"
NGRAM_ORDER = 5
NGRAM_MAX_TRAIN_CHARS = 20_000_000  # the n-gram's counts live in Python dicts: bound its memory
SAMPLES_PER_LANG = 5


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


def evaluate(model, tokenizer, examples_dir: str, output_dir: str, config: EvaluationConfig, *,
             baseline_model: str | None) -> dict:
    """Writes metrics.json, blessing.json, eval_report.md and TensorBoard summaries; returns
    {"test", "by_lang", "by_tag", "generation", "blessing", "samples"}.

    baseline_model: the newest pushed SavedModel, which the blessing compares with (None: none).
    """
    start = time.time()
    window = model.max_story_tokens
    likelihood, scored = _likelihood(model, tokenizer, examples_dir, batch_size=config.batch_size,
                                     max_prompt_tokens=model.max_prompt_tokens, max_story_tokens=window)
    generator = StoryGenerator(model, tokenizer, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens_limit=window)
    generation, samples = _generation(generator, examples_dir, config.eval_generate_count, window, config.batch_size)
    metrics = {**likelihood, "generation": generation, "samples": samples}
    metrics["blessing"] = bless(metrics["test"]["bits_per_char"], baseline_model, scored,
                                max_bpc_regression=config.max_bpc_regression,
                                max_bits_per_char=config.max_bits_per_char)
    metrics["seconds"] = time.time() - start
    with open(os.path.join(output_dir, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, ensure_ascii=False)
    with open(os.path.join(output_dir, BLESSING_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics["blessing"], f, indent=2)
    report = render_report(metrics)
    with open(os.path.join(output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(report)
    write_summaries(metrics, report, os.path.join(output_dir, "logs"))
    return metrics


def describe(m: dict) -> str:
    """The pipeline's one-line summary of the evaluator step."""
    test, generation = m["test"], m["generation"]["all"]
    text = (f"test perplexity {test['perplexity']:.2f} (unigram {test['unigram_perplexity']:.1f}), "
            f"{test['bits_per_char']:.3f} bits/char (char 5-gram {test['char_5gram_bits_per_char']:.3f}")
    if "exact_bits_per_char" in test:
        text += f", exact {test['exact_bits_per_char']:.3f}"
    text += f"), BLEU {generation['bleu']:.3f}, ROUGE-L {generation['rouge_l']:.3f}"
    if "grammar_acceptance_rate" in generation:
        text += f", {generation['grammar_acceptance_rate']:.0%} accepted by the grammar"
    return text + f"; {'blessed' if m['blessing']['blessed'] else 'NOT blessed: ' + m['blessing']['reason']}"


# ------------------------------------------------------------------ likelihood


def _likelihood(model, tokenizer, examples_dir, *, batch_size, max_prompt_tokens, max_story_tokens):
    """Likelihood metrics overall and per language and tag, and the scored (prompt, story) pairs."""
    options = dict(max_prompt_tokens=max_prompt_tokens, max_story_tokens=max_story_tokens)
    unigram = token_counts(example_features(examples_dir, "train", tokenizer, **options), model.vocab_size) + 1.0
    unigram_log_prob = np.log(unigram / unigram.sum())
    ngram = train_char_ngram(examples_dir)
    special = tokenizer.special

    @tf.function(reduce_retracing=True)
    def score(encoder_ids, decoder_ids, targets):
        logits = model((encoder_ids, decoder_ids), training=False)
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        mask = tf.not_equal(targets, special.pad)
        # The text the scored tokens spell (EOS spells none).
        text = tokenizer.detokenize(spelled(targets, special))
        return tf.reduce_sum(tf.where(mask, nll, 0.0), axis=1), text

    # Per slice: nll, unigram nll, n-gram nll, tokens, chars; and for the stories the grammar
    # knows: their model nll, exact nll and chars.
    totals = collections.defaultdict(lambda: np.zeros(8))
    scored = []
    features = example_features(examples_dir, "test", tokenizer, **options).padded_batch(
        batch_size, padding_values=dict(padding_values(special), lang=tf.constant("")))
    raw = read_split(examples_dir, "test").padded_batch(batch_size)  # tags vary in number: pad with ""
    for batch, records in tf.data.Dataset.zip(features, raw):
        nll, texts = score(batch["encoder_ids"], batch["decoder_ids"], batch["targets"])
        targets = batch["targets"].numpy()
        mask = targets != special.pad
        unigram_nll = -np.where(mask, unigram_log_prob[targets], 0.0).sum(axis=1)
        for row in range(len(targets)):
            prompt, story, lang = (records[k][row].numpy().decode("utf-8") for k in ("prompt", "story", "lang"))
            tags = [t.decode("utf-8") for t in records["tags"][row].numpy() if t]
            text = texts[row].numpy().decode("utf-8")
            # The window fit the decoder whole; and if it ends its story, its EOS was scored too.
            whole = len(text) == len(story) and int(records["ends_story"][row]) == 1
            ngram_nll = -ngram.log_prob(text, context=prompt, with_end=whole)
            stats = np.array([nll[row], unigram_nll[row], ngram_nll, mask[row].sum(), len(text), 0, 0, 0])
            accepted = corpus.accept(prompt, story, lang) if whole and lang in corpus.LANGS else None
            if accepted is not None and accepted.accepted:
                exact_nll = -(accepted.log_prob - accepted.prompt_log_prob)
                stats[5:] = nll[row], exact_nll, len(text)
            scored.append((prompt, story))
            for key in ["all", f"lang:{lang}"] + [f"tag:{t}" for t in tags]:
                totals[key] += stats
    slices = {key: _summary(value) for key, value in sorted(totals.items())}
    return {"test": slices.pop("all"),
            "by_lang": {k[5:]: v for k, v in slices.items() if k.startswith("lang:")},
            "by_tag": {k[4:]: v for k, v in slices.items() if k.startswith("tag:")}}, scored


def _summary(totals) -> dict:
    nll, unigram_nll, ngram_nll, tokens, chars, known_nll, exact_nll, known_chars = map(float, totals)
    bits = 1 / math.log(2)
    summary = {
        "perplexity": math.exp(nll / tokens),
        "bits_per_char": nll * bits / chars,
        "unigram_perplexity": math.exp(unigram_nll / tokens),
        "unigram_bits_per_char": unigram_nll * bits / chars,
        f"char_{NGRAM_ORDER}gram_bits_per_char": ngram_nll * bits / chars,
        "tokens": int(tokens),
        "chars": int(chars),
    }
    if known_chars:
        summary["exact_bits_per_char"] = exact_nll * bits / known_chars
        summary["entropy_gap_bits_per_char"] = (known_nll - exact_nll) * bits / known_chars
    return summary


# ------------------------------------------------------------------ generation


def _generation(generator, examples_dir, count, max_new_tokens, batch_size):
    """Greedy continuations of the first `count` test prompts: metrics per slice, and samples."""
    records = []
    for record in iterate_split(examples_dir, "test"):
        records.append(record)
        if len(records) == count:
            break
    stories = []
    for i in range(0, len(records), batch_size):
        prompts = tf.constant([r["prompt"] for r in records[i:i + batch_size]])
        out = generator.generate(prompts, tf.constant(max_new_tokens), tf.constant(0.0), tf.constant(0),
                                 tf.constant(1.0), tf.constant(0, tf.int64))
        stories += [s.decode("utf-8", errors="replace") for s in out["story"].numpy()]
    slices = collections.defaultdict(list)
    for record, story in zip(records, stories):
        for key in ["all", f"lang:{record['lang']}"] + [f"tag:{t}" for t in record["tags"]]:
            slices[key].append((record, story))
    generation = {key: _generation_slice(pairs) for key, pairs in sorted(slices.items())}
    samples = {}
    for record, story in zip(records, stories):
        samples.setdefault(record["lang"], [])
        if len(samples[record["lang"]]) < SAMPLES_PER_LANG:
            samples[record["lang"]].append({"prompt": record["prompt"], "story": story, "reference": record["story"]})
    return generation, samples


def _generation_slice(pairs) -> dict:
    records, stories = [r for r, _ in pairs], [s for _, s in pairs]
    metrics = generation_metrics([r["prompt"] for r in records], [r["story"] for r in records], stories,
                                 [r["lang"] for r in records])
    builtin = [(r, s) for r, s in pairs if r["lang"] in corpus.LANGS and corpus.protagonist(r["prompt"])]
    if builtin:
        metrics["grammar_acceptance_rate"] = sum(
            corpus.accept(r["prompt"], s, r["lang"]).accepted for r, s in builtin) / len(builtin)
        metrics["protagonist_kept_rate"] = sum(
            corpus.protagonist(r["prompt"]) in s for r, s in builtin) / len(builtin)
    return metrics


# ------------------------------------------------------------------ blessing


def baseline_bits_per_char(saved_model_path: str, pairs, batch_size: int = 32) -> float:
    """Bits per character of (prompt, story) pairs under a pushed SavedModel's `score` signature."""
    score = tf.saved_model.load(saved_model_path).signatures["score"]
    nats = chars = 0.0
    for i in range(0, len(pairs), batch_size):
        prompts, stories = zip(*pairs[i:i + batch_size])
        out = score(prompt=tf.constant(prompts), story=tf.constant(stories))
        nll = -out["log_likelihood"].numpy()
        nats += nll.sum()
        # The signature reports bits per character of what it scored; its characters follow.
        chars += (nll / math.log(2) / out["bits_per_char"].numpy()).sum()
    return float(nats / math.log(2) / chars)


def bless(candidate_bpc: float, baseline_model: str | None, pairs, *, max_bpc_regression: float,
          max_bits_per_char: float) -> dict:
    """The push decision and the numbers behind it."""
    decision = {"candidate_bits_per_char": float(candidate_bpc), "max_bits_per_char": max_bits_per_char,
                "baseline_model": baseline_model, "baseline_bits_per_char": None,
                "max_bpc_regression": max_bpc_regression}
    reasons = []
    if candidate_bpc > max_bits_per_char:
        reasons.append(f"bits per character {candidate_bpc:.4f} is over --max_bits_per_char={max_bits_per_char}")
    if baseline_model:
        baseline = baseline_bits_per_char(baseline_model, pairs)
        decision["baseline_bits_per_char"] = baseline
        if candidate_bpc > baseline + max_bpc_regression:
            reasons.append(f"bits per character {candidate_bpc:.4f} is worse than the pushed model's {baseline:.4f} "
                           f"by more than --max_bpc_regression={max_bpc_regression}")
    decision["blessed"] = not reasons
    decision["reason"] = "; ".join(reasons) or (
        "passes the absolute threshold" + (" and is not worse than the pushed model" if baseline_model else
                                           " (no pushed model to compare with)"))
    return decision


# ------------------------------------------------------------------ reports


def render_report(metrics: dict) -> str:
    """eval_report.md: the metric tables, the slices and sample stories per language."""
    lines = ["# Evaluation report", "", f"Blessed: **{metrics['blessing']['blessed']}** — {metrics['blessing']['reason']}", ""]
    likelihood_keys = ["perplexity", "bits_per_char", f"char_{NGRAM_ORDER}gram_bits_per_char", "unigram_bits_per_char",
                       "exact_bits_per_char", "entropy_gap_bits_per_char", "tokens", "chars"]
    slices = {"all": metrics["test"], **{f"lang:{k}": v for k, v in metrics["by_lang"].items()},
              **{f"tag:{k}": v for k, v in metrics["by_tag"].items()}}
    lines += _table("Likelihood on the test split", likelihood_keys, slices)
    generation_keys = ["bleu", "rouge_1", "rouge_2", "rouge_l", "distinct_1", "distinct_2", "repeated_4gram_rate",
                       "length_ratio", "grammar_acceptance_rate", "protagonist_kept_rate", "count"]
    lines += _table("Greedy continuations of test prompts", generation_keys, metrics["generation"])
    for lang, samples in sorted(metrics["samples"].items()):
        lines += [f"## Samples ({lang})", ""]
        for sample in samples:
            lines += [f"**Prompt:** {sample['prompt']}", "", f"**Model:** {sample['story']}", "",
                      f"**Reference:** {sample['reference']}", ""]
    return "\n".join(lines) + "\n"


def _table(title, keys, slices):
    keys = [k for k in keys if any(k in v for v in slices.values())]
    lines = [f"## {title}", "", "| slice | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in slices.items():
        cells = [_format(values.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _format(value):
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summaries(metrics: dict, report: str, logdir: str):
    """The same numbers in TensorBoard: scalars per slice, the report and samples as text."""
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default(step=0):
        for name, values in [("test", metrics["test"])] + [(f"lang_{k}", v) for k, v in metrics["by_lang"].items()]:
            for key, value in values.items():
                tf.summary.scalar(f"evaluator/{name}/{key}", value)
        for key, value in metrics["generation"].get("all", {}).items():
            tf.summary.scalar(f"evaluator/generation/{key}", value)
        tf.summary.text("evaluator/report", report)
    writer.close()
