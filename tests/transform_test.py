from collections import Counter

import numpy as np
import tensorflow as tf

from components import control_tags, transform
from components.common import BOS_ID, EOS_ID, PAD_ID
from components.records import iterate_split
from components.tokenizer import make_tokenizer


def test_encode_story_shifts_and_truncates(spm_proto):
    tok = make_tokenizer(spm_proto)
    ids = tok.tokenize("从前有座山。").numpy().tolist()
    decoder_ids, targets = transform.encode_story(tok, tf.constant("从前有座山。"), max_story_tokens=100)
    assert targets.numpy().tolist() == ids + [EOS_ID]
    assert decoder_ids.numpy().tolist() == [BOS_ID] + ids
    # A story cut short ends without EOS.
    decoder_ids, targets = transform.encode_story(tok, tf.constant("从前有座山。"), max_story_tokens=3)
    assert targets.numpy().tolist() == ids[:3]
    assert decoder_ids.numpy().tolist() == [BOS_ID] + ids[:2]


def test_encode_prompts_keeps_the_end_behind_bos(spm_proto):
    tok = make_tokenizer(spm_proto)
    ids = tok.tokenize("Once upon a time there was a poor tailor.").numpy().tolist()
    encoded = transform.encode_prompts(tok, tf.constant(["Once upon a time there was a poor tailor.", ""]), 5)
    assert encoded.to_list() == [[BOS_ID] + ids[-4:], [BOS_ID]]


def test_control_tags_lead_the_prompt_however_it_is_cut(spm_proto):
    tok = make_tokenizer(spm_proto)
    text = "Once upon a time there was a poor tailor."
    ids = tok.tokenize(text).numpy().tolist()
    fable, en = (tok.control_ids(tf.ragged.constant([[p]])).to_list()[0][0] for p in ("<fable>", "<en>"))
    prompts = tf.constant([f"<fable><en> {text}", f"<en><unknown> {text}", text, "<fable>"])
    assert transform.encode_prompts(tok, prompts, 6).to_list() == [
        [BOS_ID, fable, en] + ids[-3:], [BOS_ID, en] + ids[-4:], [BOS_ID] + ids[-5:], [BOS_ID, fable]]
    # More tags than room: the first ones are kept, and no text.
    assert transform.encode_prompts(tok, tf.constant(["<fable><en><fable> x"]), 3).to_list() == [[BOS_ID, fable, en]]


def test_training_prompts_carry_their_tags_but_each_is_left_out_of_a_share(small_examples, spm_proto):
    tok = make_tokenizer(spm_proto)
    options = dict(max_prompt_tokens=64, max_story_tokens=64)
    control = set(tok.control_ids(tf.ragged.constant([list(tok.control_pieces)])).to_list()[0])

    def control_ids_read(split, **shuffle):
        features = transform.example_features(small_examples, split, tok, **options, **shuffle)
        return sum(len([i for i in f["encoder_ids"].tolist() if i in control]) for f in features.as_numpy_iterator())

    def tags_carried(split):  # each record's language and tags, all of which have a piece here
        return sum(1 + len(record["tags"]) for record in iterate_split(small_examples, split))

    assert control_ids_read("eval") == tags_carried("eval")
    kept = control_ids_read("train", shuffle=True) / tags_carried("train")
    assert abs(kept - (1 - control_tags.DROPPED_TAG_SHARE)) < 0.1  # of about 200 tags


def test_training_batches(small_examples, spm_proto):
    tok = make_tokenizer(spm_proto)
    batches = transform.training_batches(small_examples, "train", tok, batch_size=8, max_prompt_tokens=16,
                                         max_story_tokens=40, shuffle=True, seed=3)
    features = transform.example_features(small_examples, "train", tok, max_prompt_tokens=16, max_story_tokens=40)
    stories = [f["targets"].numpy().tolist() for f in features]
    steps = transform.batches_per_epoch(small_examples, "train", 8)
    assert steps == -(-len(stories) // 8)
    bounds = transform.bucket_boundaries(40)
    seen, stream = [], []
    # The stream is endless; three epochs' worth of it.
    for (encoder_ids, decoder_ids), targets in batches.take(3 * steps):
        stream.append(targets.numpy().tolist())
        assert encoder_ids.dtype == decoder_ids.dtype == targets.dtype == tf.int32
        assert encoder_ids.shape[1] <= 16 and targets.shape[1] <= 40
        assert decoder_ids.shape == targets.shape
        # Full batches, each from one length bucket, padded to its longest story.
        assert targets.shape[0] == 8
        lengths = np.count_nonzero(targets, axis=1)
        assert targets.shape[1] == lengths.max()
        assert len(set(np.searchsorted(bounds, lengths, side="right"))) == 1
        np.testing.assert_array_equal(decoder_ids[:, 0], BOS_ID)
        # Decoder inputs are the targets shifted right, padded where the targets are.
        np.testing.assert_array_equal(decoder_ids[:, 1:], np.where(targets[:, 1:] == PAD_ID, PAD_ID, targets[:, :-1]))
        seen += [row[:length] for row, length in zip(targets.numpy().tolist(), lengths)]
    # Each pass reshuffles the split; three epochs draw each story two to four times: three
    # passes, give or take the few waiting in a bucket and the start of the fourth. (Stories cut
    # to 40 tokens can be equal.)
    in_split, drawn = Counter(map(tuple, stories)), Counter(map(tuple, seen))
    assert set(drawn) == set(in_split)
    assert all(2 * n <= drawn[story] <= 4 * n for story, n in in_split.items())
    # The same seed gives the same stream (a resumed run skips to its step in it); a
    # dataset's seeded shuffle reshuffles for each new iterator, so this compares a fresh one.
    again = transform.training_batches(small_examples, "train", tok, batch_size=8, max_prompt_tokens=16,
                                       max_story_tokens=40, shuffle=True, seed=3)
    assert stream[:steps] == [t.numpy().tolist() for _, t in again.take(steps)]


def test_bucket_boundaries():
    assert transform.bucket_boundaries(128) == [17, 33, 65]
    assert transform.bucket_boundaries(16) == []


def test_eval_batches_are_stable(small_examples, spm_proto):
    tok = make_tokenizer(spm_proto)
    make = lambda: transform.training_batches(small_examples, "eval", tok, batch_size=4, max_prompt_tokens=16,
                                              max_story_tokens=40, shuffle=False)
    first = [t.numpy().tolist() for _, t in make()]
    assert first == [t.numpy().tolist() for _, t in make()]


def test_only_the_last_window_of_a_story_ends_with_eos(spm_proto):
    tok = make_tokenizer(spm_proto)
    ids = tok.tokenize("从前有座山。").numpy().tolist()
    _, ending = transform.encode_story(tok, tf.constant("从前有座山。"), 100, ends_story=tf.constant(True))
    _, continued = transform.encode_story(tok, tf.constant("从前有座山。"), 100, ends_story=tf.constant(False))
    assert ending.numpy().tolist() == ids + [EOS_ID]
    assert continued.numpy().tolist() == ids
