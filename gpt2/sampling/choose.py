"""Token choice: greedy, or one exact multinomial draw per row from its own random stream.

Shapes: b = batch rows, V = n_vocab, C = candidates, N = top log-probabilities reported.
"""

import tensorflow as tf

from gpt2.sampling import processors

TOP_LOGPROBS = 5  # most alternatives the sampler can report per token (OpenAI's limit)


def row_uniforms(seed, counter):
    """One uniform number in [0, 1) per row, from the row's own stream: draw `counter` of the
    stream `seed`. seed, counter: int32 [b] -> float32 [b]. A row's numbers depend on nothing
    else, so a seeded row draws the same tokens alone or in any batch.

    The stream is a counter-based hash in 32-bit integer arithmetic (a Weyl sequence started at
    a hash of the seed, each value mixed by Wellons' `lowbias32`; 24 bits per draw), so XLA, plain
    graphs and NumPy give the same numbers. (TensorFlow's stateless random ops draw different
    numbers under XLA than without it, even with the algorithm named.)"""
    start = _lowbias32(tf.bitcast(seed, tf.uint32) ^ tf.constant(0x5BD1E995, tf.uint32))
    bits = _lowbias32(start + tf.bitcast(counter, tf.uint32) * tf.constant(0x9E3779B9, tf.uint32))
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))


def _lowbias32(x):
    """A 32-bit integer hash with low bias (uint32 in and out, multiplication modulo 2^32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def invert_cdf(logits, uniform):
    """Index of the draw from softmax(logits) [b, n] at uniform [b]: an exact multinomial draw.

    The CDF is walked in blocks of 256 (block totals, then one block), not as one n-long cumsum.
    """
    n = logits.shape[-1]
    blocks = -(-n // 256)
    probs = tf.nn.softmax(logits, axis=-1)
    # A uniform that rounds past the last token with probability > 0 must not land after it.
    last_kept = (n - 1) - tf.argmax(tf.cast(tf.reverse(probs > 0.0, [-1]), tf.int32), axis=-1,
                                       output_type=tf.int32)
    probs = tf.pad(probs, [[0, 0], [0, blocks * 256 - n]])
    probs = tf.reshape(probs, [-1, blocks, 256])
    block_cdf = tf.cumsum(tf.reduce_sum(probs, axis=-1), axis=-1)
    target = uniform * block_cdf[:, -1]
    block = tf.minimum(tf.reduce_sum(tf.cast(block_cdf <= target[:, None], tf.int32), axis=-1), blocks - 1)
    before = tf.gather(block_cdf, tf.maximum(block - 1, 0), axis=-1, batch_dims=1)
    within_cdf = tf.cumsum(tf.gather(probs, block, axis=1, batch_dims=1), axis=-1)
    within = tf.where(block > 0, before, 0.0)[:, None] + within_cdf
    index = block * 256 + tf.reduce_sum(tf.cast(within <= target[:, None], tf.int32), axis=-1)
    return tf.minimum(index, last_kept)


def choose_tokens(logits, temperature, top_k, top_p, uniform):
    """Picks each row's next token. logits: float32 [b, V] (penalties applied); temperature,
    top_p: float32 [b]; top_k: int32 [b]; uniform: float32 [b] (the row's draw). Returns int32 [b].

    Temperature 0 is greedy. Otherwise OpenAI's order: scale by the temperature, top-k, top-p,
    draw. Rows whose kept set lies among the largest CANDIDATES logits (the usual case) draw from
    those; the others filter and draw over the whole vocabulary.
    """
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sampling = temperature > 0.0

    def sample():
        scaled = processors.scale(logits, temperature)
        filtering = (top_k > 0) | (top_p < 1.0)

        def candidates():
            values, ids, exact = processors.filter_candidates(scaled, top_k, top_p)
            drawn = tf.gather(ids, invert_cdf(values, uniform), axis=-1, batch_dims=1)
            return drawn, exact

        from_candidates, exact = tf.cond(
            tf.reduce_any(filtering & sampling), candidates, lambda: (greedy, tf.zeros_like(filtering))
        )

        def from_vocabulary():
            filtered = tf.cond(
                tf.reduce_any(filtering & ~exact & sampling),
                lambda: processors.filter_logits(scaled, top_k, top_p),
                lambda: scaled,
            )
            return invert_cdf(filtered, uniform)

        drawn = tf.cond(tf.reduce_all(exact | ~sampling), lambda: from_candidates, from_vocabulary)
        return tf.where(sampling, tf.where(exact, from_candidates, drawn), greedy)

    return tf.cond(tf.reduce_any(sampling), sample, lambda: greedy)


# The per-row values `next_tokens` reads (shapes and dtypes: `decoder.Decoder.state_spec`).
NEXT_TOKEN_FIELDS = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "logit_bias", "seed", "generated", "counts", "prompt_seen")


def next_tokens(logits, rows, ready):
    """Each row's next token from its model logits, as OpenAI's sampler with this project's
    extensions: repetition/presence/frequency penalties and logit bias, then `choose_tokens`
    with the row's own draw. One rule for the compiled loop and the uncompiled sampler.

    logits: float32 [b, V]; rows: a dict of per-row tensors: temperature, top_p,
    presence_penalty, frequency_penalty, repetition_penalty float32 [b], top_k, seed, generated
    (tokens made so far: the draw's index in the row's stream) int32 [b], logit_bias float32
    [b, V], counts int32 [b, V] (generated tokens), prompt_seen bool [b, V]; ready: bool [b],
    the rows taking a token now (the others' choices are ignored; they only skip work).
    Returns (the processed logits [b, V], tokens int32 [b])."""
    counts = rows["counts"]
    penalised = (tf.not_equal(rows["repetition_penalty"], 1.0) | tf.not_equal(rows["presence_penalty"], 0.0)
                 | tf.not_equal(rows["frequency_penalty"], 0.0))
    logits = tf.cond(
        tf.reduce_any(ready & penalised),
        lambda: processors.apply_penalties(
            logits, counts, rows["prompt_seen"] | (counts > 0), rows["presence_penalty"],
            rows["frequency_penalty"], rows["repetition_penalty"], rows["logit_bias"]),
        lambda: logits + rows["logit_bias"],
    )
    sampling = rows["temperature"] > 0.0
    uniform = tf.cond(tf.reduce_any(ready & sampling),
                      lambda: row_uniforms(rows["seed"], rows["generated"]),
                      lambda: tf.zeros(tf.shape(sampling), tf.float32))
    return logits, choose_tokens(logits, rows["temperature"], rows["top_k"], rows["top_p"], uniform)


def logprobs_of(logits, tokens):
    """Log-probabilities of `tokens` int32 [b] and the TOP_LOGPROBS most likely tokens under
    softmax(logits) [b, V]: (token_logprob [b], top_ids int32 [b, N], top_logprobs [b, N]).
    Both come from the same float values, so a greedy token's logprob equals the top one."""
    log_probs = logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
    top_values, top_ids = tf.math.top_k(log_probs, TOP_LOGPROBS)
    token_logprob = tf.gather(log_probs, tokens, axis=-1, batch_dims=1)
    return token_logprob, top_ids, top_values
