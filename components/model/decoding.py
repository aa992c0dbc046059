"""Decoding: a story from a prompt, in the graph, for any model with storygen's decoding interface.

`StoryGenerator` is the tf.Module that the exporter saves and the trainer and evaluator use:
signatures serving_default, generate, continue_story, beam_search and score, with tokenisation, the decoding
loop (a tf.while_loop over a key/value cache) and detokenisation inside the graph, using only
TensorFlow core ops and tf-text's tokenizer ops: no XLA, no Python.

The decoding interface a model gives it (`StoryTransformer`, and each pretrained adapter):
`encode(encoder_ids) -> (states, mask)`; `prefill(decoder_ids, states, mask, cache_size,
weights) -> (logits [B, T, V], DecoderCache)`; `decoding_weights()`, read once per call, whose "head" is the output projection laid out
[d, V] (a matmul with transpose_b=True ran 2.2x slower at batch 16 here), which the generator
lays out for its batch (`head_for_batch`) and the step multiplies by with `project`;
`decode_step(token_ids, position, cache, weights) -> (logits [B, V], cache)`; a forward call
on (encoder ids, decoder ids) for `score`; and `vocab_size`, `max_prompt_tokens`,
`max_story_tokens`. The tokenizer gives the special ids (`tokenizer.special`).

Sampling is batch-invariant: at step t a row's Gumbel noise comes from one stateless stream
seeded by (seed, t), rotated by a hash of the row's prompt, so a prompt's story for a given
seed does not depend on what else is in the batch or at which row, while different prompts
draw different noise.

Stories longer than the decoder's window continue with a sliding window: when the window is
full, its newer half is kept as the decoder's prefix and the text just before it becomes the
prompt, as ingest's windows are prompted in training. Models with learned positions (storygen's,
BART's) never see a position past their window; T5's relative positions are the same either way.
"""

from typing import NamedTuple

import tensorflow as tf

from components.common import NEG_INF
from components.control_tags import tag_of
from components.contract import SIGNATURES
from components.transform import encode_prompts, frame_prompts, prompt_control_ids, repeat_ids, spelled


def input_signature(name: str) -> list[tf.TensorSpec]:
    """The TensorSpecs of a signature's inputs, as the serving contract defines them."""
    return [tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name) for tensor in SIGNATURES[name].inputs]


class DecoderCache(NamedTuple):
    """What decoding a prefix leaves for the next tokens: per block the self-attention keys and
    values, each a buffer of its own in `to_blocks`' layout (positions past the decoded ones are
    free), the cross-attention keys and values [1, B, heads, S, head_dim] (`cross_cache`), and
    the prompt's padding as an additive attention bias [1, B, 1, 1, S] (`padding_bias`)."""

    keys: list
    values: list
    cross_keys: list
    cross_values: list
    cross_bias: tf.Tensor


# Positions per block of a self-attention cache (see `to_blocks`).
CACHE_BLOCK = 32


def cache_blocks(cache_size: int) -> int:
    """Blocks of a cache with room for `cache_size` positions."""
    return -(-cache_size // CACHE_BLOCK)


def to_blocks(x, cache_size: int):
    """Keys or values x [B, T, heads, head_dim] of positions 0 .. T - 1 (T <= cache_size) as a
    self-attention cache with room for `cache_size` positions: a buffer of its own, [blocks * B *
    heads * CACHE_BLOCK, head_dim], holding [blocks, B, heads, CACHE_BLOCK, head_dim]. Each
    block's positions of a row and head are contiguous, so attention reads the blocks up to a
    position as batch matmuls (`attend`); the cache is flat so that `write_row` writes a
    position in place.

    >>> cache = to_blocks(tf.reshape(tf.range(2 * 3 * 1 * 1, dtype=tf.float32), [2, 3, 1, 1]), 40)
    >>> cache.shape.as_list(), cache[:4, 0].numpy().tolist(), cache[32:35, 0].numpy().tolist()
    ([128, 1], [0.0, 1.0, 2.0, 0.0], [3.0, 4.0, 5.0])
    """
    heads, head_dim = x.shape[2], x.shape[3]
    blocks = cache_blocks(cache_size)
    x = tf.pad(x, [[0, 0], [0, blocks * CACHE_BLOCK - tf.shape(x)[1]], [0, 0], [0, 0]])
    return tf.reshape(tf.transpose(tf.reshape(x, [-1, blocks, CACHE_BLOCK, heads, head_dim]), [1, 0, 3, 2, 4]),
                      [-1, head_dim])


def empty_cache(batch, heads: int, head_dim: int, cache_size: int) -> tf.Tensor:
    """A zero-filled self-attention cache in `to_blocks`' layout, for `write_row` to write into.
    The Empty op is stateful, so graph optimisation never merges two of them into one buffer
    (it does merge equal tf.zeros ops, and two caches sharing a buffer would overwrite each
    other's rows)."""
    shape = tf.stack([cache_blocks(cache_size) * batch * heads * CACHE_BLOCK, head_dim])
    return tf.raw_ops.Empty(shape=shape, dtype=tf.float32, init=True)


def cross_cache(x):
    """Cross-attention keys or values [B, S, heads, head_dim] laid out as `attend` reads them:
    one block of all S positions, [1, B, heads, S, head_dim]."""
    return tf.transpose(x, [0, 2, 1, 3])[None]


def padding_bias(encoder_mask):
    """The prompt's padding mask [B, S] as the additive cross-attention bias [1, B, 1, 1, S]."""
    return tf.where(encoder_mask, 0.0, NEG_INF)[None, :, None, None, :]


def write_rows(position, batch, heads: int):
    """The rows of a cache (`to_blocks`) that hold position `position` of each of `batch` rows
    and `heads` heads, [batch * heads], in the order of keys [B, heads, head_dim].

    >>> write_rows(tf.constant(33), 2, 1).numpy().tolist()  # block 1 starts at row 2 * 32
    [65, 97]
    """
    per_block = batch * heads * CACHE_BLOCK
    return position // CACHE_BLOCK * per_block + position % CACHE_BLOCK + tf.range(batch * heads) * CACHE_BLOCK


def write_row(cache, rows, row):
    """Writes one position's keys or values row [B, heads, head_dim] at `rows` (`write_rows`)
    of a cache (`to_blocks`).

    InplaceUpdate is a core op that writes into its input's buffer without copying it
    (concatenating, or tensor_scatter_nd_update, copies the whole cache at every token). So
    the buffer must have one owner: `prefill` allocates each cache (`empty_cache`, or
    `to_blocks` of its own input), and each is passed to one decode_step only.
    """
    return tf.raw_ops.InplaceUpdate(x=cache, i=rows, v=tf.reshape(row, [-1, row.shape[-1]]))


class CacheRead(NamedTuple):
    """The cache blocks a query reads (`blocks_read`): Slice's begin and size on a cache, the
    shape [blocks, B, heads, CACHE_BLOCK, head_dim] to view them in, and the additive bias
    [blocks, 1, 1 or heads, 1, CACHE_BLOCK] of their positions' scores."""

    begin: tf.Tensor
    size: tf.Tensor
    shape: tf.Tensor
    bias: tf.Tensor

    def of(self, cache):
        """The blocks read of `cache`, [blocks, B, heads, CACHE_BLOCK, head_dim] (no copy)."""
        return tf.reshape(tf.slice(cache, self.begin, self.size), self.shape)


def blocks_read(position, batch, heads: int, head_dim: int, window=None, position_bias=None) -> CacheRead:
    """What a query at `position` reads of a cache (`to_blocks`) of `batch` rows and `heads`
    heads: the blocks holding positions first .. position, where first is position - window for
    a layer that sees only the last `window` + 1 positions (None: every position, first 0).
    Their bias masks the other positions of those blocks (not yet written, or out of the
    window) and, with `position_bias` [position + 1, heads] (T5's relative positions), adds it
    to positions 0 .. position. Computed once per step, for every layer alike."""
    first = 0 if window is None else tf.maximum(0, position - window)
    first_block = first // CACHE_BLOCK
    blocks = position // CACHE_BLOCK - first_block + 1
    per_block = batch * heads * CACHE_BLOCK
    positions = first_block * CACHE_BLOCK + tf.range(blocks * CACHE_BLOCK)
    seen = (positions >= first) & (positions <= position)
    if position_bias is None:
        bias = tf.reshape(tf.where(seen, 0.0, NEG_INF), [-1, 1, 1, 1, CACHE_BLOCK])
    else:  # [blocks * CACHE_BLOCK, heads] -> [blocks, 1, heads, 1, CACHE_BLOCK]
        bias = tf.where(seen[:, None], tf.gather(position_bias, tf.minimum(positions, position)), NEG_INF)
        bias = tf.transpose(tf.reshape(bias, [-1, CACHE_BLOCK, position_bias.shape[-1]]), [0, 2, 1])[:, None, :, None]
    return CacheRead(tf.stack([first_block * per_block, 0]), tf.stack([blocks * per_block, -1]),
                     tf.stack([-1, batch, heads, CACHE_BLOCK, head_dim]), bias)


def reorder_rows(cache, parent, cache_size: int):
    """A cache (`to_blocks`) whose row b is row parent[b] of `cache` ([B'] ids): beam search's
    beams continuing their parents. A new buffer, as `write_row` needs."""
    blocks = tf.reshape(cache, [cache_blocks(cache_size), tf.size(parent), -1])
    return tf.reshape(tf.gather(blocks, parent, axis=1), tf.shape(cache))


def soft_cap(x, cap):
    """Gemma's logit soft-capping, cap * tanh(x / cap): x squashed into (-cap, cap); x itself
    when `cap` is None."""
    return cap * tf.tanh(x / cap) if cap else x


# The output projection in blocks of its columns, for large vocabularies (see `head_for_batch`).
BLOCKED_HEAD_MIN_ROWS = 8
BLOCKED_HEAD_MIN_VOCAB = 65536
HEAD_BLOCKS = 16


def head_for_batch(head, rows):
    """The output projection head [d, V] as `project` takes it for `rows` rows: head itself
    below BLOCKED_HEAD_MIN_VOCAB columns (or when HEAD_BLOCKS does not divide V); otherwise
    its columns in blocks, [2, d, V / 2] below BLOCKED_HEAD_MIN_ROWS rows and
    [HEAD_BLOCKS, d, V / HEAD_BLOCKS] from there on. Laying it out copies the matrix once a call.

    From 8 rows `project` multiplies the blocks as one batch matmul: on 2 CPU cores oneDNN
    took 35 against 41 ms for 16 rows times [512, 256000] that way (the exported T5Gemma
    decoded 10% faster at batch 16), and lost at 1 row (23 against 17 ms) and for storygen's
    own [256, 8000] at batch 16 and 64 (3%). Below 8 rows it multiplies the two column halves
    as two matmuls, which TensorFlow's executor runs side by side, as `in_column_halves` does
    for the blocks' kernels: with one thread per op (--tensorflow_intra_op_parallelism=1) the
    exported T5Gemma then decoded 1.17-1.38x as many tokens/s at batch 1 as with the whole
    matrix, and about the same with TensorFlow's default threads (benchmarks/RESULTS.md,
    2026-12-06 (later)).

    >>> [head_for_batch(tf.zeros([2, vocab]), rows).shape.as_list() for vocab, rows in
    ...  [(8000, 8), (65536, 1), (65536, 8)]]
    [[2, 8000], [2, 2, 32768], [16, 2, 4096]]
    """
    d, vocab = head.shape
    if vocab < BLOCKED_HEAD_MIN_VOCAB or vocab % HEAD_BLOCKS:
        return head
    blocks = tf.where(rows >= BLOCKED_HEAD_MIN_ROWS, HEAD_BLOCKS, 2)
    return tf.transpose(tf.reshape(head, [d, blocks, -1]), [1, 0, 2])


def project(x, head):
    """Logits [B, V] of x [B, d]: x times the output projection `head`, [d, V] or as
    `head_for_batch` lays it out. The same logits whichever layout, up to float32 rounding.

    >>> x, head = tf.ones([8, 2]), tf.reshape(tf.range(2 * 65536, dtype=tf.float32) % 7, [2, 65536])
    >>> [bool(tf.reduce_all(project(x[:rows], head_for_batch(head, rows)) == tf.matmul(x[:rows], head)))
    ...  for rows in (1, 8)]
    [True, True]
    """
    if head.shape.rank == 2:
        return tf.matmul(x, head)

    def blocked():  # [blocks, B, V / blocks] -> [B, V]
        logits = tf.matmul(tf.broadcast_to(x, tf.concat([tf.shape(head)[:1], tf.shape(x)], 0)), head)
        return tf.reshape(tf.transpose(logits, [1, 0, 2]), [tf.shape(x)[0], -1])

    return tf.cond(tf.shape(head)[0] > 2, blocked, lambda: dense(x, ((head[0], head[1]), None)))  # column halves


def attend(query, keys, values, bias, cap=None):
    """Queries [B, kv_heads, groups, head_dim] (already scaled) attend to keys and values
    [blocks, B, kv_heads, L, head_dim] (`CacheRead.of` a self-attention cache, or a
    `cross_cache`); returns [B, kv_heads, groups, head_dim]. Grouped-query attention has groups
    query heads per key/value head; otherwise groups is 1. `bias` broadcasts to the scores
    [blocks, B, kv_heads, groups, L]; the scores are `soft_cap`ped at `cap` before it is added
    (Gemma's attention logit soft-capping), and the softmax runs over all blocks' positions.

    The products are BatchMatMulV3, which TensorFlow's oneDNN rewrite leaves to Eigen: for
    these many one-row products it ran 1.3-1.4x as fast as oneDNN's batch matmul (what
    tf.matmul makes) at batch 16 and 64 on 2 CPU cores (benchmarks/RESULTS.md, 2026-12-05,
    the cache in blocks).
    """
    scores = tf.raw_ops.BatchMatMulV3(x=query[None], y=keys, Tout=tf.float32, adj_y=True)
    scores = soft_cap(scores, cap) + bias
    weights = tf.exp(scores - tf.reduce_max(scores, axis=[0, 4], keepdims=True))
    weights /= tf.reduce_sum(weights, axis=[0, 4], keepdims=True)
    return tf.reduce_sum(tf.raw_ops.BatchMatMulV3(x=weights, y=values, Tout=tf.float32), axis=0)


def dense(x, weights):
    """x @ kernel (+ bias): `weights` is (kernel [in, out], bias [out] or None). The kernel may
    come as a tuple of its column blocks (`in_column_halves`): their products, concatenated."""
    kernel, bias = weights
    y = tf.concat([tf.matmul(x, block) for block in kernel], axis=-1) if isinstance(kernel, tuple) \
        else tf.matmul(x, kernel)
    return y if bias is None else tf.nn.bias_add(y, bias)


# The decode step's matmuls in two column halves while they are small (see `in_column_halves`):
# the blocks' kernels that each token multiplies by, and the most rows * d_model**2 that take them.
PER_TOKEN_KERNELS = ("qkv", "self_output", "cross_query", "cross_output", "intermediate", "output")
HALVES_MAX_WORK = 2 ** 20


def in_column_halves(weights: dict) -> dict:
    """`weights` (a model's `decoding_weights()`) with each block's PER_TOKEN_KERNELS split into
    two column halves, which `dense` multiplies as two matmuls and concatenates; copies them.

    A matmul of a few rows by a kernel read from memory runs on one core: on 2 CPU cores a
    [1, 512] x [512, 512] product took about 0.1 ms in the exported T5Gemma's step, a tenth of
    the memory's speed. Two halves are independent ops, which TensorFlow's executor runs side
    by side. With every step in halves, the exported greedy `generate` of the `decoding`
    benchmark's model (d_model 256) made 1.09x the tokens/s at batch 1, 1.10x at 16, 1.04x at
    32 and 0.95x at 64; the T5Gemma of `t5gemma_s_s`'s shape (d_model 512) 1.10-1.13x at batch
    1, 1.00x at 4 and 0.97x at 8. Hence HALVES_MAX_WORK (`halves_pay`); what it gives is in
    benchmarks/RESULTS.md (2026-12-06).

    >>> kernel = tf.reshape(tf.range(12.0), [2, 6])
    >>> block = in_column_halves({"blocks": [{"qkv": (kernel, None), "cross_key": (kernel, None)}]})["blocks"][0]
    >>> [k.shape.as_list() for k in block["qkv"][0]], block["cross_key"][0].shape.as_list()
    ([[2, 3], [2, 3]], [2, 6])
    >>> bool(tf.reduce_all(dense(tf.ones([1, 2]), block["qkv"]) == tf.ones([1, 2]) @ kernel))
    True
    """
    def halves(kernel, bias):
        half = kernel.shape[1] // 2
        return tuple(tf.split(kernel, [half, kernel.shape[1] - half], axis=1)), bias

    blocks = [{**block, **{name: halves(*block[name]) for name in PER_TOKEN_KERNELS if name in block}}
              for block in weights["blocks"]]
    return {**weights, "blocks": blocks}


def halves_pay(rows, weights: dict):
    """Whether a step of `rows` rows takes `in_column_halves(weights)`: rows * d_model**2 at
    most HALVES_MAX_WORK (d_model: the rows of the first block's "qkv" kernel).

    >>> [bool(halves_pay(rows, {"blocks": [{"qkv": (tf.zeros([256, 768]), None)}]})) for rows in (16, 17)]
    [True, False]
    """
    d_model = weights["blocks"][0]["qkv"][0].shape[0]
    return rows * d_model ** 2 <= HALVES_MAX_WORK


def unknown_shapes(loop_vars):
    """Shape invariants for loop variables whose every dimension may change (the batch, the
    token count, a new prompt's length after a slide)."""
    return tf.nest.map_structure(lambda x: tf.TensorShape([None] * x.shape.rank), loop_vars)


class GenerationWeights(NamedTuple):
    """A generation's decoding weights, read once per call: `whole`, the model's
    `decoding_weights()` with its output projection laid out for the call's rows
    (`head_for_batch`); `halves`, the same with the per-token kernels in column halves
    (`in_column_halves`); and `take_halves`, whether the call's steps take `halves` (`halves_pay`)."""

    whole: dict
    halves: dict
    take_halves: tf.Tensor

    @classmethod
    def of(cls, whole: dict, rows) -> "GenerationWeights":
        """`whole`, its halves, and whether a call of `rows` rows takes them."""
        return cls(whole, in_column_halves(whole), halves_pay(rows, whole))


class StoryGenerator(tf.Module):
    """The exported module: signatures serving_default, generate, continue_story, beam_search and score."""

    def __init__(self, model, tokenizer, *, temperature: float, top_k: int, top_p: float,
                 max_new_tokens_limit: int, length_penalty: float = 1.0):
        super().__init__(name="story_generator")
        self.model = model
        # An attribute, so the tokenizer's resource is tracked and saved with the graph.
        self.tokenizer = tokenizer
        self.window = model.max_story_tokens
        self.limit = max_new_tokens_limit
        # Saved with the model so that clients can read them: `loaded.max_new_tokens_limit`, `loaded.decoder_window`.
        self.max_new_tokens_limit = tf.Variable(max_new_tokens_limit, trainable=False, dtype=tf.int32)
        self.decoder_window = tf.Variable(self.window, trainable=False, dtype=tf.int32)
        # The tags a prompt may start with (see control_tags): `loaded.control_tags`, [N] strings.
        self.control_tags = tf.Variable([tag_of(piece) for piece in tokenizer.control_pieces], trainable=False,
                                        dtype=tf.string, shape=[len(tokenizer.control_pieces)])
        self.default_sampling = (float(temperature), int(top_k), float(top_p))
        self.length_penalty = float(length_penalty)

    # ------------------------------------------------------------------ signatures

    @tf.function(input_signature=input_signature("serving_default"))
    def serving_default(self, prompt):
        temperature, top_k, top_p = self.default_sampling
        out = self.generate(prompt, tf.constant(min(self.window, self.limit)), tf.constant(temperature),
                            tf.constant(top_k), tf.constant(top_p), tf.constant(0, tf.int64))
        return {"story": out["story"], "num_tokens": out["num_tokens"]}

    @tf.function(input_signature=input_signature("generate"))
    def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed):
        """Samples a story per prompt: temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""
        no_tokens = tf.zeros([tf.size(prompt), 0], tf.int32)
        return self._sample_story(prompt, no_tokens, max_new_tokens, temperature, top_k, top_p, seed)

    @tf.function(input_signature=input_signature("continue_story"))
    def continue_story(self, prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed):
        """Goes on with the stories whose first tokens are `token_ids` [B, T] (what `generate`
        or this signature returned for the same prompts and sampling settings) for at most
        `max_new_tokens` more. The returned story, token_ids and num_tokens are the whole
        story's; log_prob is that of this call's tokens. Calls that each continue the last
        write the same story as one `generate` call: this is how a server streams a story
        through a stateless SavedModel (each call re-reads the story so far in one pass)."""
        return self._sample_story(prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed)

    @tf.function(input_signature=input_signature("beam_search"))
    def beam_search(self, prompt, max_new_tokens, num_beams):
        """The most likely story per prompt among `num_beams` hypotheses, ranked at the end by
        log-probability / length ** length_penalty. Stays within the decoder's window."""
        special = self.tokenizer.special
        checks = self._check_request(prompt, max_new_tokens, min(self.limit, self.window - 1)) + [
            tf.debugging.assert_positive(num_beams, message="num_beams must be >= 1"),
            tf.debugging.assert_less_equal(num_beams, 16, message="num_beams must be <= 16"),
        ]
        with tf.control_dependencies(checks):
            encoder_ids = encode_prompts(self.tokenizer, prompt, self.model.max_prompt_tokens).to_tensor(special.pad)
            num_beams = tf.identity(num_beams)  # everything below waits for the checks
        batch = tf.shape(prompt)[0]
        rows = batch * num_beams
        # Every prompt is repeated num_beams times: row b * num_beams + k is beam k of prompt b.
        encoder_ids = tf.repeat(encoder_ids, num_beams, axis=0)
        states, mask = self.model.encode(encoder_ids)
        weights = self._decoding_weights(rows)
        prefix = len(special.decoder_prefix)
        tokens = repeat_ids(special.decoder_prefix, rows)
        logits, cache = self.model.prefill(tokens, states, mask, self.window, weights)
        logits = logits[:, -1, :]
        vocab = self.model.vocab_size
        # Only beam 0 is live at first, so the first step does not pick one token num_beams times.
        scores = tf.tile(tf.concat([[0.0], tf.fill([num_beams - 1], NEG_INF)], 0), [batch])

        def step(t, tokens, done, scores, logits, cache):
            log_probs = tf.nn.log_softmax(logits)
            # A finished beam can only be extended by PAD, at no cost.
            finished = tf.one_hot(tf.fill([rows], special.pad), vocab, on_value=0.0, off_value=NEG_INF)
            log_probs = tf.where(done[:, None], finished, log_probs)
            candidates = tf.reshape(scores[:, None] + log_probs, [batch, num_beams * vocab])
            top_scores, top_index = tf.math.top_k(candidates, k=num_beams)
            parent = tf.reshape(top_index // vocab + tf.range(batch)[:, None] * num_beams, [rows])
            next_token = tf.reshape(top_index % vocab, [rows])
            tokens = tf.concat([tf.gather(tokens, parent), next_token[:, None]], axis=1)
            done = tf.gather(done, parent) | tf.equal(next_token, special.eos) | tf.equal(next_token, special.pad)
            # Each beam continues its parent's cache (gathering also gives decode_step buffers of its own).
            cache = cache._replace(keys=[reorder_rows(k, parent, self.window) for k in cache.keys],
                                   values=[reorder_rows(v, parent, self.window) for v in cache.values])
            logits, cache = self.model.decode_step(next_token, t + prefix, cache, weights)
            return t + 1, tokens, done, tf.reshape(top_scores, [rows]), logits, cache

        initial = (tf.constant(0), tokens, tf.zeros([rows], tf.bool), scores, logits, cache)
        _, tokens, _, scores, _, _ = tf.while_loop(
            lambda t, tokens, done, *_: (t < max_new_tokens) & ~tf.reduce_all(done), step, initial,
            shape_invariants=unknown_shapes(initial))
        generated = tokens[:, prefix:]
        ended_at = tf.equal(generated, special.eos) | tf.equal(generated, special.pad)
        num_tokens = tf.reduce_sum(tf.cast(tf.equal(tf.cumsum(tf.cast(ended_at, tf.int32), axis=1), 0), tf.int32),
                                   axis=1)
        story = self._detokenize(generated, num_tokens)
        # Length counts the EOS when one was written, so an ended story is not favoured for brevity.
        ended = tf.reduce_any(tf.equal(generated, special.eos), axis=1)
        length = tf.cast(num_tokens + tf.cast(ended, tf.int32), tf.float32)
        normalized = tf.reshape(scores / tf.maximum(length, 1.0) ** self.length_penalty, [batch, num_beams])
        best = tf.argmax(normalized, axis=1, output_type=tf.int32) + tf.range(batch) * num_beams
        return {"story": tf.gather(story, best), "num_tokens": tf.gather(num_tokens, best),
                "log_prob": tf.gather(scores, best)}

    @tf.function(input_signature=input_signature("score"))
    def score(self, prompt, story):
        """Log-likelihood of each story (then EOS) after its prompt, in nats; stories longer than
        the decoder's window are scored on their first window, and bits per character count
        the characters of the scored tokens."""
        checks = [
            tf.debugging.assert_positive(tf.size(prompt), message="prompt must hold at least one string"),
            tf.debugging.assert_equal(tf.size(prompt), tf.size(story), message="prompt and story must have the same length"),
        ]
        special = self.tokenizer.special
        with tf.control_dependencies(checks):
            encoder_ids = encode_prompts(self.tokenizer, prompt, self.model.max_prompt_tokens).to_tensor(special.pad)
        ids = self.tokenizer.tokenize(story)
        rows = ids.nrows()
        targets = tf.concat([repeat_ids(special.opening, rows), ids, repeat_ids([special.eos], rows)],
                            axis=1)[:, : self.window]
        decoder_ids = tf.concat([repeat_ids([special.start], rows), targets[:, :-1]], axis=1).to_tensor(special.pad)
        # Scored positions: each story's targets (a pad id inside a story is scored too).
        mask = tf.sequence_mask(targets.row_lengths(), tf.shape(decoder_ids)[1])
        targets = targets.to_tensor(special.pad)
        logits = self.model((encoder_ids, decoder_ids))
        token_log_probs = tf.gather(tf.nn.log_softmax(logits), targets, batch_dims=2)
        log_likelihood = tf.reduce_sum(tf.where(mask, token_log_probs, 0.0), axis=1)
        scored_text = self.tokenizer.detokenize(spelled(targets, special))
        chars = tf.cast(tf.strings.length(scored_text, unit="UTF8_CHAR"), tf.float32)
        bits_per_char = -log_likelihood / tf.math.log(2.0) / tf.maximum(chars, 1.0)
        return {"log_likelihood": log_likelihood, "num_tokens": tf.reduce_sum(tf.cast(mask, tf.int32), axis=1),
                "bits_per_char": bits_per_char}

    # ------------------------------------------------------------------ helpers

    def _sample_story(self, prompt, generated, max_new_tokens, temperature, top_k, top_p, seed):
        """generate's loop, from the state after the tokens `generated` [B, T]: step t of the
        story draws its noise from (seed, t) whichever call it falls in."""
        so_far = tf.shape(generated)[1] if generated.shape[1] != 0 else 0  # generate's is 0 as traced
        checks = self._check_request(prompt, max_new_tokens, self.limit, so_far) + [
            tf.debugging.assert_equal(tf.shape(generated)[0], tf.size(prompt),
                                      message="token_ids must have a row per prompt"),
            tf.debugging.assert_greater_equal(temperature, 0.0, message="temperature must be >= 0"),
            tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0"),
            tf.debugging.assert_greater(top_p, 0.0, message="top_p must be in (0, 1]"),
            tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
        ]
        special = self.tokenizer.special
        with tf.control_dependencies(checks):
            generated = tf.identity(generated)  # everything below waits for the checks
        batch = tf.shape(prompt)[0]
        noise_offsets = tf.cast(tf.strings.to_hash_bucket_fast(prompt, self.model.vocab_size), tf.int32)
        weights = GenerationWeights.of(self._decoding_weights(batch), batch)
        control_ids, _ = prompt_control_ids(self.tokenizer, prompt)  # a slid window's prompt keeps them
        logits, length, cache = self._resume(prompt, generated, control_ids, weights.whole)
        prefix = len(special.decoder_prefix)  # the start id (and story opening), then one column per generated token
        tokens = tf.concat([repeat_ids(special.decoder_prefix, batch), generated], axis=1)
        ended = tf.cumsum(tf.cast(tf.equal(generated, special.eos), tf.int32), axis=1) > 0
        done = tf.reduce_any(ended, axis=1)
        num_tokens = tf.reduce_sum(tf.cast(~ended, tf.int32), axis=1)

        def step(i, tokens, done, num_tokens, log_prob, logits, length, cache):
            next_token = sample(logits, temperature, top_k, top_p, tf.stack([seed, tf.cast(so_far + i, tf.int64)]),
                                noise_offsets)
            next_token = tf.where(done, special.pad, next_token)
            log_prob += tf.where(done, 0.0, tf.gather(tf.nn.log_softmax(logits), next_token, batch_dims=1))
            tokens = tf.concat([tokens, next_token[:, None]], axis=1)
            done |= tf.equal(next_token, special.eos)
            num_tokens += tf.cast(~done, tf.int32)
            logits, length, cache = self._feed(tokens, length, cache, control_ids, weights)
            return i + 1, tokens, done, num_tokens, log_prob, logits, length, cache

        initial = (tf.constant(0), tokens, done, num_tokens, tf.zeros([batch]), logits, length, cache)
        _, tokens, _, num_tokens, log_prob, *_ = tf.while_loop(
            lambda i, tokens, done, *_: (i < max_new_tokens) & ~tf.reduce_all(done), step, initial,
            shape_invariants=unknown_shapes(initial))
        story = self._detokenize(tokens[:, prefix:], num_tokens)
        return {"story": story, "num_tokens": num_tokens, "log_prob": log_prob, "token_ids": tokens[:, prefix:]}

    def _resume(self, prompt, generated, control_ids, weights):
        """The decoding state after a story's first tokens `generated` [B, T], as generate's
        loop holds it after T steps: the next token's logits [B, V], the window's length and
        its cache. The window has slid where the loop slides it (`_feed`), and the tokens
        since the last slide are prefilled in one pass."""
        special = self.tokenizer.special
        prefix = len(special.decoder_prefix)
        keep = self.window // 2
        so_far = tf.shape(generated)[1]
        # The window is full, and slides, at token first_slide, then every `period` tokens.
        first_slide = self.window - prefix + 1
        period = self.window - keep - prefix + 1
        slid = so_far >= first_slide
        kept_from = tf.where(slid, first_slide + (so_far - first_slide) // period * period - keep, 0)
        encoder_ids = tf.cond(
            slid, lambda: self._prompt_before(generated, kept_from, control_ids),
            lambda: encode_prompts(self.tokenizer, prompt, self.model.max_prompt_tokens).to_tensor(special.pad))
        return self._window_from(encoder_ids, generated, kept_from, weights)

    def _prompt_before(self, generated, kept_from, control_ids):
        """A slid window's encoder ids: the prompt's control tags (`control_ids`, or None) and
        the story's tokens before those the window keeps, framed as a prompt."""
        return frame_prompts(tf.RaggedTensor.from_tensor(generated[:, :kept_from]), self.tokenizer.special,
                             self.model.max_prompt_tokens, control_ids).to_tensor(self.tokenizer.special.pad)

    def _window_from(self, encoder_ids, generated, kept_from, weights):
        """Prefills a window of the decoder prefix and the story's tokens from `kept_from` on,
        reading `encoder_ids`: the next token's logits [B, V], the window's length and its cache."""
        states, mask = self.model.encode(encoder_ids)
        window = tf.concat([repeat_ids(self.tokenizer.special.decoder_prefix, tf.shape(generated)[0]),
                            generated[:, kept_from:]], axis=1)
        logits, cache = self.model.prefill(window, states, mask, self.window, weights)
        return logits[:, -1, :], tf.shape(window)[1], cache

    def _decoding_weights(self, rows):
        """The model's decoding weights, its output projection laid out for `rows` rows."""
        weights = self.model.decoding_weights()
        return {**weights, "head": head_for_batch(weights["head"], rows)}

    def _check_request(self, prompt, max_new_tokens, limit, so_far=0):
        """Checks every request's prompt and length; `so_far` is the length of the story it continues."""
        return [
            tf.debugging.assert_positive(tf.size(prompt), message="prompt must hold at least one string"),
            tf.debugging.assert_positive(max_new_tokens, message="max_new_tokens must be >= 1"),
            tf.debugging.assert_less_equal(max_new_tokens + so_far, limit, message=f"max_new_tokens must be <= {limit}"
                                           + ("" if isinstance(so_far, int) else " less the length of token_ids")),
        ]

    def _feed(self, tokens, length, cache, control_ids, weights: GenerationWeights):
        """Feeds the newest token to a window holding `length` positions; when the window is
        full, slides it first (see module doc), its prompt led by `control_ids`. Returns its
        logits, the new length and cache."""

        def step(step_weights):
            logits, grown = self.model.decode_step(tokens[:, -1], length, cache, step_weights)
            return logits, length + 1, grown

        def slide():  # the newer half of the window stays, read after the text before it
            generated = tokens[:, len(self.tokenizer.special.decoder_prefix):]
            kept_from = tf.shape(generated)[1] - self.window // 2
            return self._window_from(self._prompt_before(generated, kept_from, control_ids), generated, kept_from,
                                     weights.whole)

        # One branch per token: a slide, or a step with the kernels in halves or whole.
        branch = tf.where(length >= self.window, 0, tf.where(weights.take_halves, 1, 2))
        return tf.switch_case(branch, [slide, lambda: step(weights.halves), lambda: step(weights.whole)])

    def _detokenize(self, token_ids, num_tokens):
        """Story strings: each row's first `num_tokens` ids."""
        return self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(token_ids, lengths=num_tokens))


def sample(logits, temperature, top_k, top_p, seed, noise_offsets):
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else a Gumbel-max draw
    from the tempered, top-k and top-p filtered distribution, with row i's noise rotated by
    noise_offsets[i]. Filters that are off cost nothing; with top-k on, the draw is among the
    k candidates alone (tf.math.top_k selects them without sorting the vocabulary, and top-p
    and the noise need no more), which matters for a 256k-piece vocabulary."""

    def draw():
        vocab = tf.shape(logits)[-1]
        scaled = logits / temperature
        # One noise vector per (seed, step), rotated per row: token j of row i gets
        # uniform[(j + noise_offsets[i]) % vocab], so a draw never depends on the batch.
        uniform = tf.random.stateless_uniform([vocab], seed=seed, minval=1e-20, maxval=1.0)

        def gumbel(ids):
            return -tf.math.log(-tf.math.log(tf.gather(uniform, (ids + noise_offsets[:, None]) % vocab)))

        def among_top_k():
            candidates, ids = tf.math.top_k(scaled, k=tf.minimum(top_k, vocab))  # most likely first
            candidates = tf.where(_nucleus(candidates, top_p), candidates, NEG_INF)
            return tf.gather(ids, tf.argmax(candidates + gumbel(ids), axis=-1, output_type=tf.int32), batch_dims=1)

        def among_all():
            kept = tf.cond(top_p < 1.0, lambda: _top_p_filter(scaled, top_p), lambda: scaled)
            return tf.argmax(kept + gumbel(tf.range(vocab)[None, :]), axis=-1, output_type=tf.int32)

        return tf.cond(top_k > 0, among_top_k, among_all)

    return tf.cond(temperature > 0.0, draw, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


def _nucleus(sorted_logits, top_p):
    """Which of the logits sorted most likely first [B, k] top-p keeps: the most likely until
    their probability (within the k) reaches top_p; all of them at top_p 1, even those whose
    share rounds to nothing."""
    before = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    return (before < top_p) | (top_p >= 1.0)


def _top_p_filter(logits, top_p):
    """Drops the logits [B, V] outside top-p's nucleus (sorts the whole vocabulary)."""
    sorted_logits = tf.sort(logits, direction="DESCENDING")
    cutoff = tf.reduce_min(tf.where(_nucleus(sorted_logits, top_p), sorted_logits, -NEG_INF), axis=-1, keepdims=True)
    return tf.where(logits < cutoff, NEG_INF, logits)
