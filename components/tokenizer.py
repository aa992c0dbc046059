"""Trains the SentencePiece model on the training split, or records a pretrained preset's
tokenizer; builds the in-graph tokenizer.

Training uses the sentencepiece library directly (keras-hub's `compute_sentence_piece_proto`
wraps the same trainer but cannot turn on byte fallback, which keeps every character).
The same model is used in tf.data and in the exported graph through tensorflow-text. With
`--init_from` the step saves the preset's own keras-hub tokenizer instead (`save_to_preset`),
which the model's vocabulary was trained with.
"""

import bisect
import collections
import heapq
import io
import itertools
import json
import os
import random
import re
import tempfile
import time

import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

from components import control_tags, spm_model
from components.common import BOS_ID, EOS_ID, PAD_ID, STORYGEN_IDS, UNK_ID, SpecialIds, UserError
from components.config import TokenizerConfig
from components.records import iterate_split

MODEL_FILE = "spm.model"
# The sample SentencePiece learns from: the trainer's memory grows with its sample, and texts
# of windows differ in length, so a bound in characters too keeps a large corpus's peak flat
# (see benchmarks/scale.py).
MAX_SAMPLE_SENTENCES = 200_000
MAX_SAMPLE_CHARS = 20_000_000
REPORT_FILE = "vocab_report.json"
# The normalisation rules (codepoints in hex, a tab, their replacement): none that changes text
# ingest lets through. SentencePiece's own "identity" rule leaves the model without a character
# map, and every load of such a model (tensorflow-text's, in each process) logs "precompiled_charsmap
# is empty" from C++, which no setting silences. Deleting U+0001, a control character validation
# keeps out of every story, gives the model a map and normalises nothing else.
NO_NORMALIZATION_RULES = "1\t\n"
RESERVED_PIECES = 256 + 4  # the byte pieces, and <pad>, <unk>, <s> and </s>
SPACE = "\u2581"  # SentencePiece's spelling of a space, which also starts every text
# SentencePiece gives the most frequent characters a piece each until they cover this share of
# all character occurrences (its recommendation for CJK); the rarest, which the model would
# barely see as pieces, are spelled in byte pieces.
DEFAULT_COVERAGE = 0.9995
# A boundary that no learned piece crosses, put into the text the trainer learns from (validation
# keeps control characters out of stories and prompts): it stands for the characters left out,
# and it surrounds every Han character.
BOUNDARY = "\x02"
# Han characters are pieces of their own, as BERT's Chinese tokenizer splits them: a name then
# has the same ids in the prompt and wherever the story repeats it. Learned merges join a name
# with what follows it most often (名叫|春花 in the prompt, 春花决定 in the story), and a model then
# has to learn each spelling to copy the name. (With enough training the unigram tokenizer's
# model copied names as well: see the README's built-in corpus section.)
HAN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])")


class Tokenizer(tf.Module):
    """Strings <-> ragged int32 ids in the graph, the special ids its model frames them with,
    and the ids of its control tags' pieces (see control_tags).

    `layer` is tensorflow-text's SentencepieceTokenizer (storygen's own model) or a pretrained
    preset's keras-hub tokenizer; both have `tokenize` and `detokenize`. A tf.Module, so that
    the layer's resources (and the control pieces' table) are saved with a SavedModel that holds it.
    """

    def __init__(self, layer, special: SpecialIds, control: dict[str, int] | None = None):
        super().__init__(name="tokenizer")
        self.layer = layer
        self.special = special
        self.control_pieces = tuple(control or ())
        if self.control_pieces:
            self.control_table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(list(control), list(control.values()), tf.string, tf.int32), -1)

    def tokenize(self, texts):
        return _as_tensor(self.layer.tokenize(texts), tf.int32)

    def detokenize(self, ids):
        return _as_tensor(self.layer.detokenize(ids), tf.string)

    def control_ids(self, pieces: tf.RaggedTensor) -> tf.RaggedTensor:
        """The ids of ragged control pieces ([B, None] `<tag>` strings), leaving out those
        without an id."""
        ids = tf.ragged.map_flat_values(self.control_table.lookup, pieces)
        return tf.ragged.boolean_mask(ids, ids >= 0)


def _as_tensor(value, dtype):
    """keras-hub's tokenizers called eagerly answer with Python lists or NumPy (in a graph,
    tensors); storygen works with tensors either way."""
    if isinstance(value, (tf.Tensor, tf.RaggedTensor)):
        return value
    if isinstance(value, list) and value and isinstance(value[0], list):
        return tf.ragged.constant(value, dtype=dtype, ragged_rank=1)
    return tf.constant(value, dtype=dtype)


def train_tokenizer(examples_dir: str, output_dir: str, config: TokenizerConfig,
                    max_sentences: int = MAX_SAMPLE_SENTENCES, max_chars: int = MAX_SAMPLE_CHARS) -> dict:
    """Writes spm.model and vocab_report.json; returns the report. With `config.init_from`
    it saves the preset's tokenizer instead (see `record_preset_tokenizer`).

    One pass over the training split counts its characters, finds its control pieces and draws
    the sample SentencePiece learns from (at most `max_sentences` texts and `max_chars`
    characters), so memory does not grow with the corpus."""
    if config.init_from:
        return record_preset_tokenizer(examples_dir, output_dir, config.init_from)
    vocab_size = config.vocab_size
    start = time.time()
    chars, count = collections.Counter(), 0
    sample = Sample(max_sentences, max_chars, config.seed)

    def counted(records):
        """The records, their texts counted and offered to the sample as they pass."""
        nonlocal count
        for record in records:
            for text in (record["prompt"], record["story"]):
                if text:
                    chars.update(text)
                    count += 1
                    sample.offer(text)
            yield record

    control = control_tags.control_pieces(counted(iterate_split(examples_dir, "train")))
    rare, needed_vocab_size = rare_characters(chars, count, vocab_size, len(control))
    # The trainer learns from the text without the rare characters, and with Han characters apart.
    boundaries = str.maketrans(dict.fromkeys(rare, BOUNDARY))
    sentences = (HAN.sub(BOUNDARY + r"\1" + BOUNDARY, text.translate(boundaries)) for text in sample.texts())
    model = io.BytesIO()
    spm.set_random_generator_seed(config.seed)  # sentence sampling is the trainer's only randomness
    _train_sentencepiece(sentences, model, vocab_size, max_sentences,
                         character_coverage=1.0 if rare else DEFAULT_COVERAGE, control_pieces=control)
    proto = _without_rule_path(model.getvalue())
    with tf.io.gfile.GFile(f"{output_dir}/{MODEL_FILE}", "wb") as f:
        f.write(proto)
    report = vocab_report(proto, examples_dir)
    report.update(character_report(proto, chars))
    report.update(sample_texts=sample.size, sample_chars=sample.chars, train_texts=count)
    if rare:
        distinct, fallback = report["distinct_chars"], report["byte_fallback_chars"]
        print(f"[tokenizer] --vocab_size={vocab_size} has room for {distinct - fallback} of the corpus's {distinct} "
              f"characters: the {fallback} rarest become byte pieces (character coverage "
              f"{report['character_coverage']:.2%}; --vocab_size={needed_vocab_size} or more would cover "
              f"{DEFAULT_COVERAGE:.2%}).", flush=True)
    return _write_report(report, output_dir, start)


class Sample:
    """A uniform sample of a stream of texts, bounded in texts and in characters, drawn in one
    pass: each text gets a seeded random key, and the sample is the texts with the smallest keys
    that fit the bounds (a heap drops the largest key while they do not).

    `texts()` gives them in stream order, so that a stream within the bounds is passed on whole
    and unchanged.

    >>> sample = Sample(max_texts=3, max_chars=100, seed=1)
    >>> for text in ["a", "bb", "ccc"]:
    ...     sample.offer(text)
    >>> list(sample.texts())
    ['a', 'bb', 'ccc']
    >>> sample.offer("dddd")
    >>> sample.size, sample.chars <= 100
    (3, True)
    """

    def __init__(self, max_texts: int, max_chars: int, seed: int):
        self.max_texts, self.max_chars = max_texts, max_chars
        self.random = random.Random(seed)
        self.heap = []  # (-key, position, text): the largest key on top
        self.chars = self.offered = 0

    def offer(self, text: str):
        heapq.heappush(self.heap, (-self.random.random(), self.offered, text))
        self.offered += 1
        self.chars += len(text)
        while len(self.heap) > self.max_texts or self.chars > self.max_chars:
            self.chars -= len(heapq.heappop(self.heap)[2])

    @property
    def size(self) -> int:
        return len(self.heap)

    def texts(self):
        return (text for _, _, text in sorted(self.heap, key=lambda entry: entry[1]))


def rare_characters(chars: collections.Counter, texts: int, vocab_size: int,
                    control_pieces: int = 0) -> tuple[set[str], int]:
    """The characters to leave to byte pieces before training (none when the default coverage
    fits), and the smallest vocab_size at which it fits.

    `chars` counts the characters of `texts` texts; `control_pieces` ids are the control tags'.
    SentencePiece gives a piece to each of the
    most frequent characters that make up DEFAULT_COVERAGE of the text, and stops with an error
    when they do not fit (it cannot lower the coverage below 98%). When they do not fit, only as
    many of the most frequent as there is room for keep a piece: the others are returned, for
    training to replace with BOUNDARY. (Such a corpus is mostly Han characters, which are never
    merged into longer pieces anyway.)
    """
    reserved = RESERVED_PIECES + control_pieces
    room = vocab_size - reserved
    if room < 1:
        smallest = reserved + 1
        raise UserError(f"--vocab_size={vocab_size} is too small: its {reserved} byte, special and control pieces "
                        f"leave no room for characters (it needs at least {smallest}).")
    # The counts as the trainer sees them: a space is "▁", and every text starts with one.
    counts = chars.copy()
    counts[SPACE] += counts.pop(" ", 0) + texts
    ranked = [c for c, _ in counts.most_common()]
    cumulative = list(itertools.accumulate(counts[c] for c in ranked))
    kept_by_default = bisect.bisect_left(cumulative, DEFAULT_COVERAGE * cumulative[-1]) + 1
    needed_vocab_size = reserved + kept_by_default
    if kept_by_default <= room:
        return set(), needed_vocab_size
    return set(ranked[room:]) - {SPACE}, needed_vocab_size  # the trainer keeps "▁" whatever it is given


def character_report(proto: bytes, chars: collections.Counter) -> dict:
    """How the model spells the characters `chars` counts: the share of their occurrences it has
    a piece for, and how many distinct characters it spells in byte pieces instead."""
    processor = spm.SentencePieceProcessor(model_proto=proto)
    fallback = [c for c in chars if processor.piece_to_id(c.replace(" ", SPACE)) == UNK_ID]
    return {
        "distinct_chars": len(chars),
        "byte_fallback_chars": len(fallback),
        "character_coverage": 1 - sum(chars[c] for c in fallback) / chars.total(),
    }


def record_preset_tokenizer(examples_dir: str, output_dir: str, init_from: str) -> dict:
    """Saves the preset's tokenizer into `output_dir` (keras-hub's preset layout) and writes
    vocab_report.json; returns the report."""
    from components.model import internals

    start = time.time()
    tok = _preset_tokenizer(init_from)
    tok.layer.save_to_preset(output_dir)
    # keras-hub loads a tokenizer through its preset's config.json (the backbone's, which names the class).
    with tf.io.gfile.GFile(f"{output_dir}/config.json", "w") as f:
        json.dump(internals.preset_config(init_from), f, indent=2)
    tokens = unknown = chars = 0
    unk = getattr(tok.layer, "unk_token_id", None)
    for batch in _batched((record["story"] for record in iterate_split(examples_dir, "eval")), 256):
        ids = tok.tokenize(tf.constant(batch)).flat_values.numpy()
        tokens += len(ids)
        unknown += int((ids == unk).sum()) if unk is not None else 0
        chars += sum(len(text) for text in batch)
    report = {"vocab_size": int(tok.layer.vocabulary_size()), "preset": init_from, "eval_tokens": tokens,
              "eval_chars_per_token": chars / max(tokens, 1), "eval_unknown_rate": unknown / max(tokens, 1)}
    return _write_report(report, output_dir, start)


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_report(report: dict, output_dir: str, start: float) -> dict:
    report["seconds"] = time.time() - start
    with tf.io.gfile.GFile(f"{output_dir}/{REPORT_FILE}", "w") as f:
        json.dump(report, f, indent=2)
    return report


def _train_sentencepiece(sentences, model_writer, vocab_size: int, max_sentences: int, character_coverage: float,
                         control_pieces=()):
    """SentencePiece's trainer with storygen's settings, its rules file in a scratch folder.
    No piece crosses BOUNDARY in `sentences`; each of `control_pieces` is a piece of its own."""
    with tempfile.TemporaryDirectory() as scratch:
        rules = os.path.join(scratch, "rules.tsv")
        with open(rules, "w", encoding="utf-8") as f:
            f.write(NO_NORMALIZATION_RULES)
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model_writer,
            # BPE: on the built-in corpus the unigram model split frequent English words
            # (▁na|me|d) and made 2.8 characters per English token against BPE's 4.4.
            model_type="bpe",
            vocab_size=vocab_size,
            # Not a hard limit: a small corpus may not support the asked-for vocabulary.
            hard_vocab_limit=False,
            # Characters outside the vocabulary become UTF-8 byte pieces instead of <unk>.
            byte_fallback=True,
            character_coverage=character_coverage,
            pretokenization_delimiter=BOUNDARY,
            # No normalisation keeps full-width Chinese punctuation (NFKC would turn ，into ,).
            # Whitespace is left alone too (ingest already folded it), so generated text
            # retokenises to its ids.
            normalization_rule_tsv=rules,
            remove_extra_whitespaces=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=list(control_pieces),
            max_sentence_length=1 << 16,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )


def _without_rule_path(proto: bytes) -> bytes:
    """The model without the rule file's path, which the trainer records (the rules themselves
    are in the character map): the same corpus and config give the same bytes."""
    model = spm_model.ModelProto.FromString(proto)
    model.normalizer_spec.ClearField("normalization_rule_tsv")
    return model.SerializeToString(deterministic=True)


def describe(report: dict) -> str:
    """The pipeline's one-line summary of the tokenizer step."""
    text = f"{report['vocab_size']} pieces, {report['eval_chars_per_token']:.2f} chars/token"
    if "preset" in report:
        return f"{text}, the preset's tokenizer ({report['preset']})"
    tags = [control_tags.tag_of(piece) for piece in report.get("control_pieces", [])]
    text += f", byte fallback {report['eval_byte_fallback_rate']:.2%} of eval tokens"
    return text + (f", control tags {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}" if tags else "")


def vocab_report(proto: bytes, examples_dir: str) -> dict:
    """Vocabulary size and, on the eval split, characters per token and the byte-fallback and
    unknown rates (how often text was not covered by a learned piece)."""
    processor = spm.SentencePieceProcessor(model_proto=proto)
    byte_ids = {i for i in range(processor.get_piece_size()) if processor.is_byte(i)}
    tokens = byte_tokens = unknown = chars = 0
    for record in iterate_split(examples_dir, "eval"):
        ids = processor.encode(record["story"])
        tokens += len(ids)
        byte_tokens += sum(i in byte_ids for i in ids)
        unknown += ids.count(UNK_ID)
        chars += len(record["story"])
    return {
        "vocab_size": processor.get_piece_size(),
        "byte_pieces": len(byte_ids),
        "control_pieces": list(_control_pieces(proto)),
        "eval_tokens": tokens,
        "eval_chars_per_token": chars / max(tokens, 1),
        "eval_byte_fallback_rate": byte_tokens / max(tokens, 1),
        "eval_unknown_rate": unknown / max(tokens, 1),
    }


def load_proto(tokenizer_dir: str) -> bytes:
    with tf.io.gfile.GFile(f"{tokenizer_dir}/{MODEL_FILE}", "rb") as f:
        return f.read()


def make_tokenizer(proto: bytes) -> Tokenizer:
    """The in-graph tokenizer of a storygen SentencePiece model (string -> ragged int32 ids, and back)."""
    return Tokenizer(tf_text.SentencepieceTokenizer(model=proto, out_type=tf.int32), STORYGEN_IDS,
                     _control_pieces(proto))


def _control_pieces(proto: bytes) -> dict[str, int]:
    """{piece: id} of a SentencePiece model's user-defined pieces: its control tags."""
    model = spm_model.ModelProto.FromString(proto)
    return {p.piece: i for i, p in enumerate(model.pieces) if p.type == spm_model.USER_DEFINED}


def load_tokenizer(tokenizer_dir: str) -> Tokenizer:
    """The in-graph tokenizer that the tokenizer step wrote into `tokenizer_dir`: storygen's
    SentencePiece model, or a preset's keras-hub tokenizer."""
    if tf.io.gfile.exists(f"{tokenizer_dir}/{MODEL_FILE}"):
        return make_tokenizer(load_proto(tokenizer_dir))
    return _preset_tokenizer(tokenizer_dir)


def _preset_tokenizer(handle: str) -> Tokenizer:
    """A keras-hub preset's tokenizer with its architecture's special ids."""
    from components.model import presets

    layer = presets.load_tokenizer(handle)
    return Tokenizer(layer, presets.special_ids(layer))
