import collections
import json
import random

import pytest
import sentencepiece as spm
import tensorflow as tf

from components import ingest, tokenizer
from components.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from components.config import IngestConfig, TokenizerConfig
from components.records import iterate_split
from conftest import write_jsonl


def test_special_ids_and_byte_fallback(spm_proto):
    processor = spm.SentencePieceProcessor(model_proto=spm_proto)
    assert [processor.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert sum(processor.is_byte(i) for i in range(processor.get_piece_size())) == 256


@pytest.mark.parametrize("text", [
    "从前有座山，山里有座庙。",
    "Once upon a time there was a poor tailor.",
    # Characters never seen in training come back through byte pieces, not as <unk>.
    "龍と魔法の鏡 — señor Ærøskøbing 🐉！",
])
def test_in_graph_tokenizer_round_trips(spm_proto, text):
    tok = tokenizer.make_tokenizer(spm_proto)
    ids = tok.tokenize(tf.constant([text]))
    assert ids.dtype == tf.int32
    assert UNK_ID not in ids.flat_values.numpy()
    assert tok.detokenize(ids).numpy()[0].decode("utf-8") == text


def test_han_characters_are_pieces_of_their_own_and_english_words_are_whole(small_examples, tmp_path):
    """A name has the same ids in the prompt and wherever the story repeats it, whatever stands
    beside it; English keeps whole words."""
    tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=700, seed=1))
    processor = spm.SentencePieceProcessor(model_proto=tokenizer.load_proto(str(tmp_path)))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert not [p for p in pieces if tokenizer.HAN.search(p) and len(p) > 1]
    # "山里有座庙" is in every copy of the corpus's first story: a merge would have learned it.
    assert processor.encode("从前有座山，山里有座庙。", out_type=str) == ["▁", *"从前有座山，山里有座庙。"]
    name = processor.encode("小和尚", out_type=int)[1:]
    for text in ("庙里有个老和尚，每天给小和尚讲故事。", "小和尚问：", "“师父，小和尚"):
        ids = processor.encode(text, out_type=int)
        assert any(ids[i:i + len(name)] == name for i in range(len(ids)))
    assert {"▁tailor", "▁forest", "▁morning"} <= set(pieces)


def test_report_and_files(small_examples, tmp_path, capsys):
    report = tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=700, seed=1))
    assert json.loads((tmp_path / "vocab_report.json").read_text()) == report
    assert 400 < report["vocab_size"] <= 700  # the small corpus supports fewer than asked for
    # Its characters fit: at most the rarest 0.05% of occurrences are spelled in byte pieces.
    chars = train_chars(small_examples)
    assert report["distinct_chars"] == len(chars)
    assert report["character_coverage"] > 0.999
    assert report["byte_fallback_chars"] <= 1
    assert "byte pieces" not in capsys.readouterr().out
    assert report["eval_unknown_rate"] == 0.0
    assert 0.0 <= report["eval_byte_fallback_rate"] < 0.05
    assert report["eval_chars_per_token"] > 1.0
    # The same seed trains the same model.
    again = tmp_path / "again"
    again.mkdir()
    tokenizer.train_tokenizer(small_examples, str(again), TokenizerConfig(vocab_size=700, seed=1))
    assert (again / "spm.model").read_bytes() == (tmp_path / "spm.model").read_bytes()


def test_the_sample_is_bounded_in_texts_and_characters_and_keeps_stream_order():
    texts = [f"{i}:" + "x" * (i % 50) for i in range(10_000)]
    sample = tokenizer.Sample(max_texts=1000, max_chars=20_000, seed=3)
    for text in texts:
        sample.offer(text)
    kept = list(sample.texts())
    assert sample.chars == sum(map(len, kept)) <= 20_000 and 500 < len(kept) <= 1000
    assert kept == sorted(kept, key=texts.index)  # in stream order
    # Uniform over the stream: each tenth of it gives about a tenth of the sample.
    tenths = collections.Counter(int(text.split(":")[0]) // 1000 for text in kept)
    assert all(0.06 * len(kept) < n < 0.14 * len(kept) for n in tenths.values()) and len(tenths) == 10
    again = tokenizer.Sample(max_texts=1000, max_chars=20_000, seed=3)
    for text in texts:
        again.offer(text)
    assert list(again.texts()) == kept
    # Within the bounds, the stream passes whole.
    whole = tokenizer.Sample(max_texts=10_000, max_chars=10**9, seed=3)
    for text in texts:
        whole.offer(text)
    assert list(whole.texts()) == texts


def test_the_tokenizer_learns_from_a_sample_bounded_in_characters(small_examples, tmp_path):
    report = tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=700, seed=1),
                                       max_chars=8_000)  # of the split's 16,509
    assert 7_000 < report["sample_chars"] <= 8_000 and report["sample_texts"] < report["train_texts"]
    assert report["distinct_chars"] == len(train_chars(small_examples))  # counted over the whole split
    assert report["eval_unknown_rate"] == 0.0 and report["eval_chars_per_token"] > 1.0


def test_vocab_too_small_is_a_user_error(small_examples, tmp_path):
    # 256 byte pieces, 4 special ones and 5 control pieces (2 languages, 3 tags).
    with pytest.raises(UserError, match="--vocab_size=265 is too small: .*needs at least 266"):
        tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=265, seed=1))
    # The smallest trains: one character keeps a piece, the others are spelled in byte pieces.
    report = tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=266, seed=1))
    assert report["byte_fallback_chars"] == report["distinct_chars"] - 1
    assert report["eval_unknown_rate"] == 0.0


def train_chars(examples_dir):
    return collections.Counter(c for record in iterate_split(examples_dir, "train")
                               for c in record["prompt"] + record["story"])


@pytest.fixture(scope="module")
def classical_chinese(tmp_path_factory):
    """An ingest output folder whose text has 3,500 distinct CJK characters in a Zipf-like spread:
    the k-th most frequent occurs about 2000/k times (at least once), in random order."""
    chars = [chr(0x4E00 + k) for k in range(3500) for _ in range(max(1, round(2000 / (k + 1))))]
    random.Random(0).shuffle(chars)
    text = "".join(chars)
    windows = [text[i:i + 120] for i in range(0, len(text), 120)]
    root = tmp_path_factory.mktemp("classical")
    source = write_jsonl(root / "stories.jsonl", [{"prompt": w[:20], "story": w[20:]} for w in windows])
    out = root / "examples"
    out.mkdir()
    ingest.ingest(IngestConfig(data=source, seed=1, eval_fraction=0.1, test_fraction=0.0, max_bad_fraction=0.0),
                  str(out))
    return str(out)


def test_more_characters_than_fit_leaves_the_rarest_to_byte_pieces(classical_chinese, tmp_path, capsys):
    report = tokenizer.train_tokenizer(classical_chinese, str(tmp_path), TokenizerConfig(vocab_size=1500, seed=1))
    processor = spm.SentencePieceProcessor(model_proto=tokenizer.load_proto(str(tmp_path)))
    # Han characters are never merged: the pieces are characters, bytes and specials.
    assert report["vocab_size"] == processor.get_piece_size() <= 1500

    # The characters whose encoding takes byte pieces are the ones reported, and the rarest.
    chars = train_chars(classical_chinese)
    on_bytes = [c for c in chars if any(processor.is_byte(i) for i in processor.encode(c))]
    with_piece = chars.keys() - set(on_bytes)
    assert report["distinct_chars"] == len(chars)
    assert report["byte_fallback_chars"] == len(on_bytes) > 0
    assert max(chars[c] for c in on_bytes) <= min(chars[c] for c in with_piece)
    assert report["character_coverage"] == pytest.approx(1 - sum(chars[c] for c in on_bytes) / chars.total())
    assert report["character_coverage"] < tokenizer.DEFAULT_COVERAGE
    # The frequent characters are pieces of their own, as many as there is room for.
    assert all(processor.piece_to_id(c) != UNK_ID for c, _ in chars.most_common(1000))
    assert 1000 < len(with_piece) <= 1500 - 260

    # Rare characters come back exactly, through their UTF-8 bytes.
    tok = tokenizer.make_tokenizer(tokenizer.load_proto(str(tmp_path)))
    text = "".join(on_bytes[:50])
    ids = tok.tokenize(tf.constant([text]))
    assert tok.detokenize(ids).numpy()[0].decode("utf-8") == text
    assert sum(processor.is_byte(i) for i in ids.flat_values.numpy().tolist()) == len(text.encode("utf-8"))

    out = capsys.readouterr().out
    assert (f"--vocab_size=1500 has room for {len(with_piece)} of the corpus's {len(chars)} characters: the "
            f"{len(on_bytes)} rarest become byte pieces (character coverage") in out

    # The same seed trains the same model.
    again = tmp_path / "again"
    again.mkdir()
    tokenizer.train_tokenizer(classical_chinese, str(again), TokenizerConfig(vocab_size=1500, seed=1))
    assert (again / "spm.model").read_bytes() == (tmp_path / "spm.model").read_bytes()


def test_control_tags_are_pieces_of_their_own(spm_proto):
    tok = tokenizer.make_tokenizer(spm_proto)
    # The languages, then the tags by how many training records carry them (the most frequent first).
    assert tok.control_pieces[:3] == ("<en>", "<zh>", "<fairy_tale>")
    assert set(tok.control_pieces[3:]) == {"<dragons>", "<fable>"}
    processor = spm.SentencePieceProcessor(model_proto=spm_proto)
    ids = {p: processor.piece_to_id(p) for p in tok.control_pieces}
    assert UNK_ID not in ids.values() and len(set(ids.values())) == 5
    # Written anywhere, a tag is its one piece; text around it is spelled as without it.
    assert processor.encode("<zh><fable>") == [processor.piece_to_id("▁"), ids["<zh>"], ids["<fable>"]]
    assert processor.encode("The fox<fable> ran") == (processor.encode("The fox") + [ids["<fable>"]]
                                                      + processor.encode(" ran")[1:])
    pieces = tf.ragged.constant([["<zh>", "<unknown>", "<fable>"], [], ["<en>"]])
    assert tok.control_ids(pieces).to_list() == [[ids["<zh>"], ids["<fable>"]], [], [ids["<en>"]]]
