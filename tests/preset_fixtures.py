"""Tiny random-weight keras-hub presets built in the tests: T5 (v1.0 ReLU and the gated GELU of
T5 1.1 / Flan-T5), BART and T5Gemma, each with a tokenizer trained here on Chinese and English
text and saved with `save_to_preset`, as a real preset directory is."""

import collections
import io

TEXTS = ["从前有座山，山里有座庙，庙里住着一个小和尚。", "一只狐狸走进了葡萄园，它说葡萄一定是酸的。",
         "Once upon a time there lived a poor tailor in a small house.", "The fox knocked at the door and asked for a coat.",
         "小姑娘提着灯笼走进山洞，唱了一首歌。", "Long ago a dragon slept under the old castle."]
T5_SHAPE = dict(num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, dropout=0.0)
# Gemma 2's features, all in play: grouped-query attention (4 query heads share 2 key/value
# heads), a sliding window of 4 positions on every other layer (prompts and stories are longer),
# attention and final logit soft-capping (caps lower than Gemma 2's 50 and 30, so that they bite).
T5GEMMA_SHAPE = dict(
    encoder_hidden_dim=16, encoder_intermediate_dim=32, encoder_num_layers=2, encoder_num_attention_heads=4,
    encoder_num_key_value_heads=2, encoder_head_dim=8, encoder_layer_types=["sliding_attention", "full_attention"],
    decoder_hidden_dim=16, decoder_intermediate_dim=32, decoder_num_layers=2, decoder_num_attention_heads=4,
    decoder_num_key_value_heads=2, decoder_head_dim=8, decoder_layer_types=["sliding_attention", "full_attention"],
    sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=10.0, query_pre_attn_scalar=8)
BART_SHAPE = dict(num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, dropout=0.0, max_sequence_length=64)


def t5_tokenizer():
    import keras_hub
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model, vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    return keras_hub.models.T5Tokenizer(proto=model.getvalue())


def t5gemma_tokenizer():
    """A SentencePiece model with Gemma's special pieces and ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3)."""
    import keras_hub
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 20), model_writer=model, vocab_size=400,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                   eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    return keras_hub.models.T5GemmaTokenizer(proto=model.getvalue())


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes are themselves, the
    others are shifted past 255, so that every byte has a one-character symbol."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def bart_tokenizer(num_merges: int = 120):
    """A byte-level BPE tokenizer whose merges are the most frequent symbol pairs of TEXTS."""
    import re

    import keras_hub

    symbols = _byte_symbols()
    words = collections.Counter()
    for text in TEXTS:
        for word in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text):
            words[tuple(symbols[b] for b in word.encode("utf-8"))] += 1
    vocabulary = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in symbols:
        vocabulary.setdefault(symbol, len(vocabulary))
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocabulary.setdefault(a + b, len(vocabulary))
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return keras_hub.models.BartTokenizer(vocabulary=vocabulary, merges=merges)


def _scramble(backbone, seed: int):
    """Redraws every weight so that a random model's next token depends on its input: with
    keras-hub's initialisers a tiny model writes one token over and over, which any decoder
    matches. Some seeds still give such a model (seed 3 for the ReLU T5, 4 for BART): the
    default seeds are ones whose greedy stories differ between the test prompts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        value = rng.normal(0.0, 1.0, weight.shape)
        weight.assign(1.0 + 0.2 * value if weight.path.endswith(("weight", "gamma")) else value)


def save_t5_preset(directory: str, gated: bool, seed: int = 4, extra_ids: int = 0) -> str:
    """A tiny T5Seq2SeqLM: v1.0 (ReLU, tied output) or, `gated`, T5 1.1 (gated GELU, own head);
    with `extra_ids` more ids than its tokenizer has pieces, as the real T5 presets have."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = t5_tokenizer()
    backbone = keras_hub.models.T5Backbone(
        vocabulary_size=tokenizer.vocabulary_size() + extra_ids, activation="gelu" if gated else "relu",
        use_gated_activation=gated, tie_embedding_weights=not gated, **T5_SHAPE)
    _scramble(backbone, seed)
    preprocessor = keras_hub.models.T5Seq2SeqLMPreprocessor(tokenizer=tokenizer, encoder_sequence_length=16,
                                                            decoder_sequence_length=32)
    keras_hub.models.T5Seq2SeqLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(directory)
    return directory


def save_bart_preset(directory: str, seed: int = 3) -> str:
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = bart_tokenizer()
    backbone = keras_hub.models.BartBackbone(vocabulary_size=tokenizer.vocabulary_size(), **BART_SHAPE)
    _scramble(backbone, seed)
    preprocessor = keras_hub.models.BartSeq2SeqLMPreprocessor(tokenizer=tokenizer, encoder_sequence_length=16,
                                                              decoder_sequence_length=32)
    keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(directory)
    return directory


def save_t5gemma_preset(directory: str, seed: int = 2, tie_word_embeddings: bool = True, **shape) -> str:
    """A tiny T5GemmaSeq2SeqLM (`T5GEMMA_SHAPE`, with `shape`'s changes): with seed 2 the sliding
    window and the attention soft-cap each change some of the test prompts' greedy stories."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokenizer = t5gemma_tokenizer()
    backbone = keras_hub.models.T5GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(),
                                                tie_word_embeddings=tie_word_embeddings, **{**T5GEMMA_SHAPE, **shape})
    _scramble(backbone, seed)
    preprocessor = keras_hub.models.T5GemmaSeq2SeqLMPreprocessor(tokenizer=tokenizer, encoder_sequence_length=16,
                                                                 decoder_sequence_length=32)
    keras_hub.models.T5GemmaSeq2SeqLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(directory)
    return directory
