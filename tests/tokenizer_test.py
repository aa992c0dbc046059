import json

import pytest
import sentencepiece as spm
import tensorflow as tf

from components import tokenizer
from components.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from components.config import TokenizerConfig


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


def test_chinese_needs_no_segmentation(spm_proto):
    # Frequent Chinese character pairs are learned as pieces straight from unsegmented text.
    processor = spm.SentencePieceProcessor(model_proto=spm_proto)
    pieces = processor.encode("从前有座山，山里有座庙。", out_type=str)
    assert "里有" in pieces
    assert len(pieces) < len("从前有座山，山里有座庙。") + 1  # "▁" + one piece per character at most


def test_report_and_files(small_examples, tmp_path):
    report = tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=700, seed=1))
    assert json.loads((tmp_path / "vocab_report.json").read_text()) == report
    assert 400 < report["vocab_size"] <= 700  # the small corpus supports fewer than asked for
    assert report["eval_unknown_rate"] == 0.0
    assert 0.0 <= report["eval_byte_fallback_rate"] < 0.05
    assert report["eval_chars_per_token"] > 1.0
    # The same seed trains the same model.
    again = tmp_path / "again"
    again.mkdir()
    tokenizer.train_tokenizer(small_examples, str(again), TokenizerConfig(vocab_size=700, seed=1))
    assert (again / "spm.model").read_bytes() == (tmp_path / "spm.model").read_bytes()


def test_vocab_too_small_is_a_user_error(small_examples, tmp_path):
    with pytest.raises(UserError, match="--vocab_size=260 is too small"):
        tokenizer.train_tokenizer(small_examples, str(tmp_path), TokenizerConfig(vocab_size=260, seed=1))
