"""tf.data pipelines: stored examples -> padded (prompt ids, story ids) batches.

Tokenisation runs inside tf.data with the same tensorflow-text tokenizer the export uses,
so training and serving see identical ids; so does the reading of a prompt's control tags.
Batches are bucketed by story length so that short stories are not padded to the longest one
in the corpus.
"""

import tensorflow as tf

from components import control_tags
from components.records import ENDS_STORY, read_split


def encode_prompts(tokenizer, prompts, max_prompt_tokens: int) -> tf.RaggedTensor:
    """Encoder ids of a batch of prompt strings, their control tags first (see `frame_prompts`)."""
    control_ids, texts = prompt_control_ids(tokenizer, prompts)
    return frame_prompts(tokenizer.tokenize(texts), tokenizer.special, max_prompt_tokens, control_ids)


def prompt_control_ids(tokenizer, prompts):
    """(the ids of the control tags each prompt starts with [B, None], ragged; the prompts'
    texts). A tokenizer without control pieces (a preset's) takes every prompt as text."""
    if not tokenizer.control_pieces:
        return None, prompts
    pieces, texts = split_tags(prompts)
    return tokenizer.control_ids(pieces), texts


def tagged_prompt(prompt, lang, tags, record_id=None):
    """`control_tags.tagged` in a tf.data map, of one record's prompt, lang and tags (1-D); with a
    `record_id`, each tag is left out of control_tags.DROPPED_TAG_SHARE of records (by a hash
    of the id and the tag)."""
    tags = tf.concat([[lang], tags], axis=0)
    keep = tf.strings.regex_full_match(tags, control_tags.TAG)
    if record_id is not None:
        buckets = 1000
        hashes = tf.strings.to_hash_bucket_fast(tf.strings.join([record_id, "/", tags]), buckets)
        keep &= hashes >= int(control_tags.DROPPED_TAG_SHARE * buckets)
    written = tf.strings.reduce_join(tf.strings.join(["<", tf.boolean_mask(tags, keep), ">"]))
    return tf.where(tf.strings.length(written) > 0, tf.strings.join([written, prompt], separator=" "), prompt)


def split_tags(prompts):
    """`control_tags.split_tags` of a batch of prompts [B]: (each prompt's tag pieces, `<tag>`
    [B, None], ragged; the texts [B])."""
    tags_or_nothing = f"(?s)^(?:{control_tags.LEADING_TAGS[1:]})?.*"  # group 1: the tags, if any
    leading = tf.strings.regex_replace(prompts, tags_or_nothing, r"\1", replace_global=False)
    texts = tf.strings.regex_replace(prompts, control_tags.LEADING_TAGS, "", replace_global=False)
    pieces = tf.strings.split(tf.strings.regex_replace(leading, ">", ">\n"), "\n")
    return tf.ragged.boolean_mask(pieces, tf.strings.length(pieces) > 0), texts


def frame_prompts(ids: tf.RaggedTensor, special, max_prompt_tokens: int, control_ids=None) -> tf.RaggedTensor:
    """Encoder ids of a batch of prompt ids: the `control_ids` of each prompt (ragged, or None),
    then its last ids (the text nearest the story matters most), between the model's prompt
    start and end ids (storygen's: BOS before; T5's: EOS after; BART's: both),
    `max_prompt_tokens` in all. The framing ids keep an empty prompt non-empty."""
    before = [special.prompt_start] if special.prompt_start is not None else []
    after = [special.prompt_end] if special.prompt_end is not None else []
    room = max_prompt_tokens - len(before) - len(after)
    if control_ids is None:
        return tf.concat([repeat_ids(before, ids.nrows()), ids[:, -room:], repeat_ids(after, ids.nrows())], axis=1)
    control_ids = control_ids[:, :room]
    # Each row keeps its last (room - its control ids) text ids.
    starts = tf.maximum(ids.row_lengths() - (room - control_ids.row_lengths()), 0)
    positions = tf.ragged.range(starts, ids.row_lengths()) + tf.expand_dims(ids.row_starts(), 1)
    ids = tf.gather(ids.flat_values, positions)
    return tf.concat([repeat_ids(before, ids.nrows()), control_ids, ids, repeat_ids(after, ids.nrows())], axis=1)


def repeat_ids(ids: list[int], rows) -> tf.Tensor:
    """The ids as every one of `rows` rows: [rows, len(ids)] int32."""
    return tf.tile(tf.constant([ids], tf.int32), tf.stack([tf.cast(rows, tf.int32), 1]))


def padding_values(special) -> dict:
    """padded_batch's padding of the id features: the model's padding id (BART's is not 0)."""
    return {key: tf.constant(special.pad, tf.int32) for key in ("encoder_ids", "decoder_ids", "targets")}


def encode_story(tokenizer, story, max_story_tokens: int, ends_story=True):
    """(decoder inputs, targets) of one story window: targets are its ids, then EOS if the
    window ends the story, after the story opening id if the model has one, cut to
    `max_story_tokens` (a story cut short has no EOS, so the model never learns to stop
    mid-story); decoder inputs are the targets shifted right behind the decoder's start id."""
    special = tokenizer.special
    eos = tf.repeat([special.eos], tf.cast(ends_story, tf.int32))
    targets = tf.concat([tf.constant(special.opening, tf.int32), tokenizer.tokenize(story), eos], axis=0)
    targets = targets[:max_story_tokens]
    return tf.concat([[special.start], targets[:-1]], axis=0), targets


def spelled(targets, special) -> tf.RaggedTensor:
    """The ids of targets [B, T] that spell text: not padding, EOS or the story opening."""
    keep = tf.not_equal(targets, special.pad) & tf.not_equal(targets, special.eos)
    if special.story_start is not None:
        keep &= tf.not_equal(targets, special.story_start)
    return tf.ragged.boolean_mask(targets, keep)


def example_features(examples_dir: str, split: str, tokenizer, *, max_prompt_tokens: int,
                     max_story_tokens: int, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """One dict per example, shuffled when `shuffle`: encoder_ids, decoder_ids, targets (1-D int32) and lang.
    Prompts carry their record's control tags (where the tokenizer has control pieces); for
    training (`shuffle`), each tag is left out of control_tags.DROPPED_TAG_SHARE of them.

    The caller keeps `tokenizer` alive while the dataset is used: its SentencePiece resource
    is freed with the Python object.
    """
    dataset = read_split(examples_dir, split)
    if shuffle:
        dataset = dataset.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)

    def encode(example):
        decoder_ids, targets = encode_story(tokenizer, example["story"], max_story_tokens, example[ENDS_STORY] > 0)
        prompt = example["prompt"]
        if tokenizer.control_pieces:
            prompt = tagged_prompt(prompt, example["lang"], example["tags"], example["id"] if shuffle else None)
        encoder_ids = encode_prompts(tokenizer, prompt[None], max_prompt_tokens)[0]
        return {"encoder_ids": encoder_ids,
                "decoder_ids": decoder_ids, "targets": targets, "lang": example["lang"]}

    return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def bucket_boundaries(max_story_tokens: int) -> list[int]:
    """Powers of two from 16 below the longest story: 16, 32, 64, ..."""
    bounds, b = [], 16
    while b < max_story_tokens:
        bounds.append(b + 1)  # bucket_by_sequence_length's boundaries are exclusive
        b *= 2
    return bounds


def training_batches(examples_dir: str, split: str, tokenizer, *, batch_size: int, max_prompt_tokens: int,
                     max_story_tokens: int, shuffle: bool, seed: int = 0) -> tf.data.Dataset:
    """((encoder_ids, decoder_ids), targets) batches as Keras `fit` takes them.

    With `shuffle` (for training) the stream is endless: the split, reshuffled on each pass,
    grouped into batches of `batch_size` stories from one length bucket. Buckets fill across
    passes, so every batch is full (flushing them at the end of each pass would end every
    epoch with a few small batches in length order). An epoch is `batches_per_epoch` steps.
    Without `shuffle`: one pass in order.
    """
    features = example_features(examples_dir, split, tokenizer, max_prompt_tokens=max_prompt_tokens,
                                max_story_tokens=max_story_tokens, shuffle=shuffle, seed=seed)
    features = features.map(lambda f: {k: f[k] for k in ("encoder_ids", "decoder_ids", "targets")})
    padding = padding_values(tokenizer.special)
    if shuffle:
        bounds = bucket_boundaries(max_story_tokens)
        batches = features.repeat().bucket_by_sequence_length(
            lambda f: tf.shape(f["targets"])[0], bucket_boundaries=bounds,
            bucket_batch_sizes=[batch_size] * (len(bounds) + 1), padding_values=padding)
    else:
        batches = features.padded_batch(batch_size, padding_values=padding)
    return batches.map(lambda b: ((b["encoder_ids"], b["decoder_ids"]), b["targets"])).prefetch(tf.data.AUTOTUNE)


def batches_per_epoch(examples_dir: str, split: str, batch_size: int) -> int:
    """Training steps that draw as many stories as the split holds (rounded up)."""
    examples = int(read_split(examples_dir, split).reduce(0, lambda count, _: count + 1))
    return max(1, -(-examples // batch_size))
