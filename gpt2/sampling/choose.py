"""Token choice: greedy, or one exact draw per row (Gumbel-max) from its own random stream.

Shapes: b = batch rows, V = n_vocab, C = candidates, n = tokens a draw considers, N = top log-probabilities
reported.
"""

import tensorflow as tf

from gpt2.sampling import processors

TOP_LOGPROBS = 5  # most alternatives the sampler can report per token (OpenAI's limit)
BLOCK = 256  # a draw over the whole vocabulary picks a block of this many tokens, then a token
NEG_INF = float("-inf")


def row_keys(seed, counter):
    """The key of draw `counter` of the row stream `seed`: int32 seed, counter [b] -> uint32 [b].
    A counter-based hash in 32-bit integer arithmetic (a Weyl sequence started at a hash of the
    seed, each value mixed by Wellons' `lowbias32`), so XLA, plain graphs and NumPy give the same
    keys. (TensorFlow's stateless random ops draw different numbers under XLA than without it,
    even with the algorithm named.)"""
    start = _lowbias32(tf.bitcast(seed, tf.uint32) ^ tf.constant(0x5BD1E995, tf.uint32))
    return _lowbias32(start + tf.bitcast(counter, tf.uint32) * tf.constant(0x9E3779B9, tf.uint32))


def gumbel_noise(seed, counter, ids):
    """Standard Gumbel noise per row and token: seed, counter int32 [b] (the row's stream and
    draw); ids int32 [b, n] or [1, n] (token ids) -> float32 [b, n]. Each value depends only on
    (seed, counter, token id), so a row gets the same noise alone or in any batch, and a token
    the same noise among 256 candidates or the whole vocabulary.

    Two 32-bit hashes of (row key, token) make a uniform with 64 bits (`gumbel_of_bits`), so the
    upper tail, where a token far below the best one wins, is exact up to 45: beyond any logit
    gap whose probability float32 resolves (e^-45 = 3e-20)."""
    key = row_keys(seed, counter)[:, None]
    mixed = _lowbias32(tf.bitcast(ids, tf.uint32) * tf.constant(0x85EBCA6B, tf.uint32) + key)
    high = _lowbias32(mixed ^ key)
    return gumbel_of_bits(high, _lowbias32(mixed + tf.constant(0x2C1B3C6D, tf.uint32)))


def gumbel_of_bits(high, low):
    """-log(-log(1 - v)) for v = (high + (low + 1/2) / 2^32) / 2^32 (uint32 high, low): v and
    1 - v (from the complemented bits) are both exact in (0, 1), so the noise is finite and
    correct in both tails, from -log(45.05) to 45.05."""
    v = tf.cast(high, tf.float32) * 2.0**-32 + (tf.cast(low, tf.float32) + 0.5) * 2.0**-64
    w = tf.cast(~high, tf.float32) * 2.0**-32 + (tf.cast(~low, tf.float32) + 0.5) * 2.0**-64
    exponential = tf.where(v < 0.5, -tf.math.log1p(-v), -tf.math.log(w))
    return -tf.math.log(exponential)


def _lowbias32(x):
    """A 32-bit integer hash with low bias (uint32 in and out, multiplication modulo 2^32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def gumbel_choice(logits, ids, noise):
    """The draw from softmax(logits) [b, n] (-inf: never) over the tokens `ids` int32 [b, n] or
    [1, n]: the token with the largest logit + Gumbel noise (the Gumbel-max trick, an exact draw).
    noise(ids) -> float32 noise of those tokens. Returns int32 [b] (token ids)."""
    best = tf.argmax(logits + noise(ids), axis=-1, output_type=tf.int32)
    return tf.gather(tf.broadcast_to(ids, tf.shape(logits)), best, axis=-1, batch_dims=1)


def vocabulary_choice(logits, noise):
    """The draw from softmax(logits) [b, V] over token ids 0..V-1, in two Gumbel-max steps: a
    block of BLOCK tokens by the blocks' log-masses (noise of ids -1, -2, ...), then a token of
    that block (noise of its ids). P(block) x P(token | block) is the softmax exactly, and the
    noise is drawn for about V / BLOCK + BLOCK values per row, not V. Returns int32 [b].

    Not the inverse of a float32 CDF: there, logits that differ in their last bits between two
    batch shapes move every one of the V boundaries, and a uniform lying within that difference
    of any of them picks a neighbour (1 draw in 700 on the test model at temperature 1). Here a
    draw changes only when a step's two best scores lie within the logits' difference (~1e-6)."""
    n = logits.shape[-1]
    blocks = -(-n // BLOCK)
    padded = tf.pad(logits, [[0, 0], [0, blocks * BLOCK - n]], constant_values=NEG_INF)
    padded = tf.reshape(padded, [-1, blocks, BLOCK])
    block = -1 - gumbel_choice(tf.reduce_logsumexp(padded, axis=-1), -1 - tf.range(blocks)[None], noise)
    within = tf.gather(padded, block, axis=1, batch_dims=1)
    return gumbel_choice(within, block[:, None] * BLOCK + tf.range(BLOCK)[None], noise)


def choose_tokens(logits, temperature, top_k, top_p, noise):
    """Picks each row's next token, int32 [b]. logits: float32 [b, V] (penalties applied);
    temperature, top_p: float32 [b]; top_k: int32 [b]; noise(ids int32 [b, n] or [1, n]) -> the
    rows' Gumbel noise for those tokens, float32 [b, n] (`gumbel_noise`).

    Temperature 0 is greedy. Otherwise OpenAI's order: scale by the temperature, top-k, top-p,
    draw. Rows whose kept set lies among the largest CANDIDATES logits (the usual case) draw from
    those (`gumbel_choice`), the others over the whole vocabulary (`vocabulary_choice`): which,
    depends only on the row."""
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sampling = temperature > 0.0

    def sample():
        scaled = processors.scale(logits, temperature)
        filtering = (top_k > 0) | (top_p < 1.0)

        def candidates():
            values, ids, exact = processors.filter_candidates(scaled, top_k, top_p)
            return gumbel_choice(values, ids, noise), exact

        from_candidates, exact = tf.cond(tf.reduce_any(filtering & sampling), candidates,
                                         lambda: (greedy, tf.zeros_like(filtering)))

        def from_vocabulary():
            filtered = tf.cond(tf.reduce_any(filtering & ~exact & sampling),
                               lambda: processors.filter_logits(scaled, top_k, top_p), lambda: scaled)
            return vocabulary_choice(filtered, noise)

        drawn = tf.cond(tf.reduce_all(exact | ~sampling), lambda: from_candidates, from_vocabulary)
        return tf.where(sampling, tf.where(exact, from_candidates, drawn), greedy)

    return tf.cond(tf.reduce_any(sampling), sample, lambda: greedy)


def distribution(logits, temperature, top_k, top_p):
    """The probabilities `choose_tokens` draws from, float32 [b, V], for sampling rows
    (temperature > 0): softmax of the logits [b, V] (penalties applied) scaled by the
    temperature, after top-k and top-p; over the largest candidates when every row's kept set
    lies among them (as `choose_tokens`), else over the whole vocabulary."""
    scaled = processors.scale(logits, temperature)
    values, ids, exact = processors.filter_candidates(scaled, top_k, top_p)

    def from_candidates():
        rows = tf.broadcast_to(tf.range(tf.shape(ids)[0])[:, None], tf.shape(ids))
        return tf.scatter_nd(tf.stack([rows, ids], -1), tf.nn.softmax(values, axis=-1), tf.shape(logits))

    return tf.cond(tf.reduce_all(exact), from_candidates,
                   lambda: tf.nn.softmax(processors.filter_logits(scaled, top_k, top_p), axis=-1))


# The per-row values `next_tokens` reads (shapes and dtypes: `decoder.Decoder.state_spec`).
NEXT_TOKEN_FIELDS = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "logit_bias", "seed", "generated", "counts", "prompt_seen")


def next_tokens(logits, rows, ready):
    """Each row's next token from its model logits, as OpenAI's sampler with this project's
    extensions: repetition/presence/frequency penalties and logit bias, then `choose_tokens`
    with the row's own draw. One rule for the compiled loop and the uncompiled sampler.

    logits: float32 [b, V]; rows: {NEXT_TOKEN_FIELDS name: per-row tensor [b] or [b, V]}
    (`generated`: tokens made so far, the draw's index in the row's stream; `counts`: of each
    generated token); ready: bool [b], the rows taking a token now (the others' choices are
    ignored; they only skip work). Returns (the processed logits [b, V], tokens int32 [b])."""
    counts = rows["counts"]
    penalised = (tf.not_equal(rows["repetition_penalty"], 1.0) | tf.not_equal(rows["presence_penalty"], 0.0)
                 | tf.not_equal(rows["frequency_penalty"], 0.0))
    logits = tf.cond(tf.reduce_any(ready & penalised),
                     lambda: processors.apply_penalties(logits, counts, rows["prompt_seen"] | (counts > 0),
                                                        rows["presence_penalty"], rows["frequency_penalty"],
                                                        rows["repetition_penalty"], rows["logit_bias"]),
                     lambda: logits + rows["logit_bias"])

    def noise(ids):
        return gumbel_noise(rows["seed"], rows["generated"], ids)

    return logits, choose_tokens(logits, rows["temperature"], rows["top_k"], rows["top_p"], noise)


def logprobs_of(logits, tokens):
    """Log-probabilities of `tokens` int32 [b] and the TOP_LOGPROBS most likely tokens under
    softmax(logits) [b, V]: (token_logprob [b], top_ids int32 [b, N], top_logprobs [b, N]).
    Both come from the same float values, so a greedy token's logprob equals the top one."""
    log_probs = logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
    top_values, top_ids = tf.math.top_k(log_probs, TOP_LOGPROBS)
    token_logprob = tf.gather(log_probs, tokens, axis=-1, batch_dims=1)
    return token_logprob, top_ids, top_values
