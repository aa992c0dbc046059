"""Evaluator: how good the trained model is on the test split, and whether it may be pushed.

Likelihood: token perplexity and bits per character. Bits per character divide the total
negative log-likelihood (in bits) by the characters the scored tokens spell, so they compare
across tokenizers and with character models. Two baselines are trained on the training split
and scored on exactly the same text: a unigram model of the tokens (add-one smoothed; the floor
any trained model must beat) and a character 5-gram model with Kneser-Ney smoothing. On the
built-in corpus the grammar gives the exact log-probability of each continuation, so the
entropy gap (model bits per character minus the exact conditional entropy) says how far the
model is from perfect.

Generation: continuations of test prompts, decoded twice: greedily, and with the exported
serving_default's sampling (its temperature, top-k and top-p, with the pipeline's seed, so
reruns give the same stories). Each is scored with BLEU, ROUGE-1/2/L, distinct-1/2, repeated
4-grams (beside the reference stories' own rate) and length ratio; on the built-in corpus also
the share the grammar accepts, the share that keep the prompt's hero and, of those accepted,
the share whose genre is the one their prompt's control tag asked for; and for memorisation
(copyright), the share of the continuations' 50-character spans found verbatim in the
training split and the longest span copied from it (text_metrics.CopyIndex). Everything is
sliced by language and by tag, as TFMA does. Test prompts carry their records' control tags.

Blessing (as TFX's Evaluator), on bits per character of the test split: a first model (none
pushed yet) must beat the character 5-gram baseline by --min_gain_over_ngram; a later one is
compared with the newest pushed version of the same model, scored through that SavedModel's
`score` signature on the same test split, and must not be worse by more than
--max_bpc_regression. --max_bits_per_char, an absolute threshold, is off unless set.
"""

import collections
import json
import math
import os
import time

import numpy as np
import tensorflow as tf

from components import control_tags, corpus
from components.char_ngram import CharNGramModel
from components.config import BUILTIN_PREFIX, EvaluationConfig, ExportConfig
from components.corpus.grammar import GENRES
from components.records import iterate_split, read_split, split_size
from components.model.decoding import StoryGenerator
from components.progress import Progress
from components.text_metrics import SPAN_CHARS, CopyIndex, copy_metrics, generation_metrics
from components.transform import example_features, padding_values, spelled

METRICS_FILE = "metrics.json"
BLESSING_FILE = "blessing.json"
REPORT_FILE = "eval_report.md"
NGRAM_ORDER = 5
# The n-gram's counts live in Python dicts, and CopyIndex holds 20 bytes per character: bound their memory.
NGRAM_MAX_TRAIN_CHARS = 20_000_000
SAMPLES_PER_LANG = 5
DECODINGS = ("greedy", "sampled")


def token_counts(dataset: tf.data.Dataset, vocab_size: int) -> np.ndarray:
    """How often each id occurs among the targets of a dataset of example features."""
    counts = np.zeros(vocab_size, np.int64)
    for features in dataset.as_numpy_iterator():
        np.add.at(counts, features["targets"], 1)
    return counts


def training_texts(examples_dir: str) -> list[str]:
    """The training split's prompt + story texts, the first NGRAM_MAX_TRAIN_CHARS characters'
    worth: what the n-gram baseline learns from and what copying is measured against."""
    texts, chars = [], 0
    for record in iterate_split(examples_dir, "train"):
        chars += len(record["prompt"]) + len(record["story"])
        if chars > NGRAM_MAX_TRAIN_CHARS:
            break
        texts.append(record["prompt"] + record["story"])
    return texts


def evaluate(model, tokenizer, examples_dir: str, output_dir: str, config: EvaluationConfig, *,
             baseline_model: str | None, sampling: ExportConfig) -> dict:
    """Writes metrics.json, blessing.json, eval_report.md and TensorBoard summaries; returns
    {"test", "by_lang", "by_tag", "generation", "sampling", "blessing", "samples"}.

    baseline_model: the newest pushed SavedModel, which the blessing compares with (None: none).
    sampling: the export's config, whose serving_default sampling the sampled continuations use.
    """
    start = time.time()
    window = model.max_story_tokens
    train_texts = training_texts(examples_dir)
    likelihood, scored = _likelihood(model, tokenizer, examples_dir, CharNGramModel(NGRAM_ORDER).fit(train_texts),
                                     batch_size=config.batch_size, max_prompt_tokens=model.max_prompt_tokens,
                                     max_story_tokens=window)
    settings = {"greedy": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0},
                "sampled": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                            "seed": config.seed}}
    generator = StoryGenerator(model, tokenizer, temperature=sampling.temperature, top_k=sampling.top_k,
                               top_p=sampling.top_p, max_new_tokens_limit=window)
    generation, samples = _generation(generator, _first_test_records(examples_dir, config.eval_generate_count),
                                      CopyIndex(train_texts), settings, max_new_tokens=window,
                                      batch_size=config.batch_size)
    metrics = {**likelihood, "generation": generation, "sampling": settings["sampled"], "samples": samples}
    metrics["blessing"] = bless(metrics["test"]["bits_per_char"], baseline_model, scored,
                                ngram_bpc=metrics["test"][f"char_{NGRAM_ORDER}gram_bits_per_char"],
                                min_gain_over_ngram=config.min_gain_over_ngram,
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
    test = m["test"]
    text = (f"test perplexity {test['perplexity']:.2f} (unigram {test['unigram_perplexity']:.1f}), "
            f"{test['bits_per_char']:.3f} bits/char (char 5-gram {test['char_5gram_bits_per_char']:.3f}")
    if "exact_bits_per_char" in test:
        text += f", exact {test['exact_bits_per_char']:.3f}"
    text += ")"
    for decoding in DECODINGS:
        generation = m["generation"][decoding]["all"]
        text += f"; {decoding}: BLEU {generation['bleu']:.3f}, ROUGE-L {generation['rouge_l']:.3f}"
        if "grammar_acceptance_rate" in generation:
            text += f", {generation['grammar_acceptance_rate']:.0%} accepted by the grammar"
        if "tag_followed_rate" in generation:
            text += f" ({generation['tag_followed_rate']:.0%} of them in the genre their tag asked for)"
        text += f", longest copy {generation['longest_copied_span_chars']} chars"
    blessing = m["blessing"]
    return text + (f"; blessed ({blessing['reason']})" if blessing["blessed"]
                   else f"; NOT blessed: {blessing['reason']}")


# ------------------------------------------------------------------ likelihood


def _scorer(model, tokenizer):
    """A tf.function of (encoder ids, decoder ids, targets) [B, T] int32 batches -> each row's
    summed negative log-likelihood and the text its targets spell. Its input signature leaves
    batch and lengths open, so it is traced once, not once per batch shape."""
    special = tokenizer.special
    ids = tf.TensorSpec([None, None], tf.int32)

    @tf.function(input_signature=[ids, ids, ids])
    def score(encoder_ids, decoder_ids, targets):
        logits = model((encoder_ids, decoder_ids), training=False)
        nll = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        mask = tf.not_equal(targets, special.pad)
        # The text the scored tokens spell (EOS spells none).
        text = tokenizer.detokenize(spelled(targets, special))
        return tf.reduce_sum(tf.where(mask, nll, 0.0), axis=1), text

    return score


def _likelihood(model, tokenizer, examples_dir, ngram, *, batch_size, max_prompt_tokens, max_story_tokens):
    """Likelihood metrics overall and per language and tag (`ngram`: the character n-gram
    baseline), and the scored (prompt, story) pairs."""
    options = dict(max_prompt_tokens=max_prompt_tokens, max_story_tokens=max_story_tokens)
    unigram = token_counts(example_features(examples_dir, "train", tokenizer, **options), model.vocab_size) + 1.0
    unigram_log_prob = np.log(unigram / unigram.sum())
    special = tokenizer.special
    score = _scorer(model, tokenizer)
    # Per slice: nll, unigram nll, n-gram nll, tokens, chars; and for the stories the grammar
    # knows: their model nll, exact nll and chars.
    totals = collections.defaultdict(lambda: np.zeros(8))
    scored = []
    features = example_features(examples_dir, "test", tokenizer, **options).padded_batch(
        batch_size, padding_values=dict(padding_values(special), lang=tf.constant("")))
    raw = read_split(examples_dir, "test").padded_batch(batch_size)  # tags vary in number: pad with ""
    progress = Progress("evaluator", "scored test windows", split_size(examples_dir, "test"))
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
            grammar = _from_grammar(records["source"][row].numpy().decode("utf-8"), lang)
            accepted = corpus.accept(prompt, story, lang) if whole and grammar else None
            if accepted is not None and accepted.accepted:
                # Given the prompt and the tags it was given: a genre tag tells its ending's genre.
                told = [t for t in accepted.tags if control_tags.piece(t) in tokenizer.control_pieces]
                exact_nll = -(accepted.log_prob - accepted.prompt_log_prob) + sum(math.log(GENRES[t]) for t in told)
                stats[5:] = nll[row], exact_nll, len(text)
            scored.append((_tagged_prompt(tokenizer, prompt, lang, tags), story))
            for key in ["all", f"lang:{lang}"] + [f"tag:{t}" for t in tags]:
                totals[key] += stats
        progress.update(len(scored))
    slices = {key: _summary(value) for key, value in sorted(totals.items())}
    return {"test": slices.pop("all"),
            "by_lang": {k[5:]: v for k, v in slices.items() if k.startswith("lang:")},
            "by_tag": {k[4:]: v for k, v in slices.items() if k.startswith("tag:")}}, scored


def _tagged_prompt(tokenizer, prompt: str, lang: str, tags: list[str]) -> str:
    """A test record's prompt with its language and tags written before it, those the tokenizer
    has a control piece for (see control_tags)."""
    return control_tags.tagged(prompt, [t for t in [lang] + tags if control_tags.piece(t) in tokenizer.control_pieces])


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


def _first_test_records(examples_dir, count) -> list[dict]:
    """The first `count` records of the test split, whose prompts the model continues."""
    records = []
    for record in iterate_split(examples_dir, "test"):
        records.append(record)
        if len(records) == count:
            break
    return records


def _generation(generator, records, copy_index, settings, *, max_new_tokens, batch_size):
    """Continuations of the records' prompts with each of DECODINGS' `settings` (temperature,
    top_k, top_p, seed): {decoding: metrics per slice}, and sample stories per language."""
    prompts = [_tagged_prompt(generator.tokenizer, r["prompt"], r["lang"], r["tags"]) for r in records]
    progress = Progress("evaluator", "continued test prompts", len(DECODINGS) * len(prompts))
    stories = {}
    for decoding in DECODINGS:
        done_before = len(prompts) * len(stories)
        stories[decoding] = _continue(generator, prompts, settings[decoding], max_new_tokens, batch_size,
                                      on_batch=lambda done: progress.update(done_before + done))
    generation = {decoding: _sliced_metrics(records, stories[decoding], copy_index) for decoding in DECODINGS}
    samples = {}
    for i, record in enumerate(records):
        kept = samples.setdefault(record["lang"], [])
        if len(kept) < SAMPLES_PER_LANG:
            kept.append({"prompt": prompts[i], **{d: stories[d][i] for d in DECODINGS},
                         "reference": record["story"]})
    return generation, samples


def _continue(generator, prompts, setting, max_new_tokens, batch_size, on_batch=lambda done: None) -> list[str]:
    """The generator's stories for `prompts` with one sampling setting. A prompt's story
    depends on the seed and not on the rest of its batch. `on_batch(stories so far)` follows each batch."""
    stories = []
    for i in range(0, len(prompts), batch_size):
        out = generator.generate(tf.constant(prompts[i:i + batch_size]), tf.constant(max_new_tokens),
                                 tf.constant(setting["temperature"], tf.float32), tf.constant(setting["top_k"]),
                                 tf.constant(setting["top_p"], tf.float32), tf.constant(setting["seed"], tf.int64))
        stories += [s.decode("utf-8", errors="replace") for s in out["story"].numpy()]
        on_batch(len(stories))
    return stories


def _sliced_metrics(records, stories, copy_index) -> dict:
    """Generation metrics of the stories per slice: all, lang:LANG and tag:TAG."""
    slices = collections.defaultdict(list)
    for record, story in zip(records, stories):
        copies = copy_index.copies(story)
        for key in ["all", f"lang:{record['lang']}"] + [f"tag:{t}" for t in record["tags"]]:
            slices[key].append((record, story, copies))
    return {key: _generation_slice(triples) for key, triples in sorted(slices.items())}


def _from_grammar(source: str, lang: str) -> bool:
    """Whether a record is a story of the built-in grammar, which its exact metrics apply to."""
    return source.startswith(BUILTIN_PREFIX) and lang in corpus.LANGS


def _generation_slice(triples) -> dict:
    """The metrics of one slice's (record, generated story, its Copies) triples."""
    records, stories, copies = zip(*triples)
    metrics = generation_metrics([r["prompt"] for r in records], [r["story"] for r in records], stories,
                                 [r["lang"] for r in records])
    metrics.update(copy_metrics(copies))
    builtin = [(r, s) for r, s, _ in triples if _from_grammar(r["source"], r["lang"]) and corpus.protagonist(r["prompt"])]
    if builtin:  # only stories the built-in grammar wrote have its acceptance, genre and a hero to keep
        parses = [(r, corpus.accept(r["prompt"], s, r["lang"])) for r, s in builtin]
        accepted = [(r, parse) for r, parse in parses if parse.accepted]
        metrics["grammar_acceptance_rate"] = len(accepted) / len(builtin)
        metrics["protagonist_kept_rate"] = sum(
            corpus.protagonist(r["prompt"]) in s for r, s in builtin) / len(builtin)
        if accepted:
            metrics["tag_followed_rate"] = sum(parse.tags == r["tags"] for r, parse in accepted) / len(accepted)
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


def bless(candidate_bpc: float, baseline_model: str | None, pairs, *, ngram_bpc: float, min_gain_over_ngram: float,
          max_bpc_regression: float, max_bits_per_char: float) -> dict:
    """The push decision and the numbers behind it, on test bits per character.

    A first model (no `baseline_model`) must beat the character n-gram baseline's `ngram_bpc`:
    candidate <= ngram_bpc * (1 - min_gain_over_ngram). A later one must not be worse than the
    pushed model (scored on `pairs`) by more than max_bpc_regression. max_bits_per_char, when
    above 0, is an absolute ceiling besides. The reason names each rule with its numbers: the
    failed ones, or when none failed, the passed ones.
    """
    decision = {"candidate_bits_per_char": float(candidate_bpc), "ngram_bits_per_char": float(ngram_bpc),
                "min_gain_over_ngram": min_gain_over_ngram, "baseline_model": baseline_model,
                "baseline_bits_per_char": None, "max_bpc_regression": max_bpc_regression,
                "max_bits_per_char": max_bits_per_char}
    rules = []  # (passed, what the rule found)
    if baseline_model:
        baseline = baseline_bits_per_char(baseline_model, pairs)
        decision["baseline_bits_per_char"] = baseline
        if candidate_bpc <= baseline + max_bpc_regression:
            rules.append((True, f"bits per character {candidate_bpc:.4f} is within --max_bpc_regression="
                                f"{max_bpc_regression} of the pushed model's {baseline:.4f}"))
        else:
            rules.append((False, f"bits per character {candidate_bpc:.4f} is worse than the pushed model's "
                                 f"{baseline:.4f} by more than --max_bpc_regression={max_bpc_regression}"))
    else:
        limit = ngram_bpc * (1 - min_gain_over_ngram)
        passed = candidate_bpc <= limit
        rules.append((passed, f"first model: bits per character {candidate_bpc:.4f} is "
                              f"{'at most' if passed else 'over'} the char {NGRAM_ORDER}-gram's {ngram_bpc:.4f} x "
                              f"(1 - --min_gain_over_ngram={min_gain_over_ngram}) = {limit:.4f}"))
    if max_bits_per_char > 0:
        passed = candidate_bpc <= max_bits_per_char
        rules.append((passed, f"bits per character {candidate_bpc:.4f} is {'at most' if passed else 'over'} "
                              f"--max_bits_per_char={max_bits_per_char}"))
    failed = [text for passed, text in rules if not passed]
    decision["blessed"] = not failed
    decision["reason"] = "; ".join(failed or [text for _, text in rules])
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
                       "reference_repeated_4gram_rate", "length_ratio", "grammar_acceptance_rate",
                       "protagonist_kept_rate", "tag_followed_rate", f"copied_{SPAN_CHARS}char_span_rate",
                       "longest_copied_span_chars", "count"]
    sampling = metrics["sampling"]
    titles = {"greedy": "Greedy continuations of test prompts",
              "sampled": f"Sampled continuations of test prompts (temperature {sampling['temperature']}, top-k "
                         f"{sampling['top_k']}, top-p {sampling['top_p']}, seed {sampling['seed']})"}
    for decoding in DECODINGS:
        lines += _table(titles[decoding], generation_keys, metrics["generation"][decoding])
    for lang, samples in sorted(metrics["samples"].items()):
        lines += [f"## Samples ({lang})", ""]
        for sample in samples:
            lines += [f"**Prompt:** {sample['prompt']}", "", f"**Greedy:** {sample['greedy']}", "",
                      f"**Sampled:** {sample['sampled']}", "", f"**Reference:** {sample['reference']}", ""]
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
        for decoding in DECODINGS:
            for key, value in metrics["generation"][decoding].get("all", {}).items():
                tf.summary.scalar(f"evaluator/generation/{decoding}/{key}", value)
        tf.summary.text("evaluator/report", report)
    writer.close()
