import collections

import pytest
import tensorflow as tf

from components import control_tags, transform

PROMPTS = ["<en><fable> Once upon a time", "<zh>从前有座山", "Once <x> upon", "<bad tag> x", "", "<a>",
           "<a><b>  two spaces", " <a> after a space", "<a>\nnew line"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_graph_splits_tags_as_python_does(prompt):
    pieces, texts = transform.split_tags(tf.constant([prompt]))
    tags, text = control_tags.split_tags(prompt)
    assert [p.decode() for p in pieces.to_list()[0]] == [control_tags.piece(t) for t in tags]
    assert texts.numpy()[0].decode() == text


def test_split_tags_inverts_tagged():
    assert control_tags.split_tags(control_tags.tagged("Once", ["en", "fable"])) == (["en", "fable"], "Once")
    assert control_tags.tagged("Once", []) == "Once"
    # A tag that cannot be written as one (a space, a bracket) is left out.
    assert control_tags.tagged("Once", ["fairy tale", "a<b", "fable"]) == "<fable> Once"
    assert control_tags.split_tags("<a><b>  two") == (["a", "b"], " two")


def test_records_are_tagged_in_the_graph_as_in_python():
    for lang, tags in [("en", ["fable"]), ("zh", []), ("", ["fairy tale", "fable"]), ("", [])]:
        written = transform.tagged_prompt(tf.constant("Once"), tf.constant(lang), tf.constant(tags, tf.string))
        assert written.numpy().decode() == control_tags.tagged("Once", [lang] + tags)
    # For training, each tag is left out of a share of the records, apart from the other tags.
    written = collections.Counter(
        transform.tagged_prompt(tf.constant("Once"), tf.constant("en"), tf.constant(["fable"]),
                                tf.constant(f"record-{i}")).numpy().decode() for i in range(4000))
    assert set(written) == {"<en><fable> Once", "<en> Once", "<fable> Once", "Once"}
    dropped = control_tags.DROPPED_TAG_SHARE
    expected = {"<en><fable> Once": (1 - dropped) ** 2, "<en> Once": (1 - dropped) * dropped,
                "<fable> Once": dropped * (1 - dropped), "Once": dropped ** 2}
    for prompt, share in expected.items():
        assert abs(written[prompt] / 4000 - share) < 4 * (share * (1 - share) / 4000) ** 0.5, (prompt, written)


def test_control_pieces_are_the_languages_then_the_frequent_tags():
    records = ([{"lang": "zh", "tags": ["fable", "fable"]}] * 3 + [{"lang": "en", "tags": ["fairy_tale", "zh"]}] * 5
               + [{"lang": "en", "tags": ["once", "fairy tale"]}] + [{"lang": "", "tags": ["with space", "x"]}] * 2)
    # A repeated tag counts once per record, a language is not a tag again, and a tag on one record or
    # that cannot be written as one gets no piece.
    assert control_tags.control_pieces(records) == ["<en>", "<zh>", "<fairy_tale>", "<fable>", "<x>"]
    many = [{"lang": "en", "tags": [f"t{i}"]} for i in range(100) for _ in range(2)]
    assert len(control_tags.control_pieces(many)) == 1 + control_tags.MAX_TAGS
