"""Logit processors: repetition penalties, logit bias, temperature, top-k and top-p, per row.

Shapes: b = batch rows, V = n_vocab, C = CANDIDATES. Every setting is a tensor [b] (or [b, V]),
so new values never retrace. The order is the one `gpt2.sampling.settings` documents.
Removed tokens become -inf (float32), which no temperature can bring back.
"""

import tensorflow as tf

# Top-k/top-p look at this many of the largest logits first (exact when the kept set fits in them).
CANDIDATES = 256
NEG_INF = float("-inf")


def apply_penalties(logits, counts, seen, presence, frequency, repetition, bias):
    """logits float32 [b, V]; counts int32 [b, V] (times each token was generated); seen bool
    [b, V] (in the prompt or generated); presence, frequency, repetition float32 [b]; bias
    float32 [b, V]. Returns the penalised logits [b, V]."""
    rp = repetition[:, None]
    logits = tf.where(seen & tf.not_equal(rp, 1.0), tf.where(logits > 0, logits / rp, logits * rp), logits)
    counts = tf.cast(counts, tf.float32)
    logits -= presence[:, None] * tf.cast(counts > 0, tf.float32) + frequency[:, None] * counts
    return logits + bias


def scale(logits, temperature):
    """(logits - max) / temperature for sampling rows (temperature > 0): the same softmax as
    logits / temperature, without overflow however small the temperature (the best token is 0,
    the others are <= 0, and -inf stays -inf). Rows with temperature 0 are left as they are."""
    shifted = logits - tf.reduce_max(logits, axis=-1, keepdims=True)
    sampling = temperature > 0.0
    return tf.where(sampling[:, None], shifted / tf.where(sampling, temperature, 1.0)[:, None], logits)


def _sortable_keys(x):
    """float32 -> int64 keys with the same order, so thresholds can be found exactly by bisection."""
    bits = tf.bitcast(x, tf.int32)
    return tf.cast(tf.where(bits < 0, bits ^ 0x7FFFFFFF, bits), tf.int64)


def _largest_key_where(keys, holds):
    """Per row, the largest t in the int32 range with holds(keys >= t) true, for a `holds` that is
    true at the smallest t and monotone. keys: int64 [b, V]; holds: bool [b, V] mask -> bool [b].
    Returns int64 [b, 1]. A 32-step bisection: no sort of the vocabulary (XLA's CPU sort of 50257
    values costs more than a whole decode step)."""
    low = tf.fill(tf.shape(keys)[:1], tf.constant(-(2**31), tf.int64))
    high = tf.fill(tf.shape(keys)[:1], tf.constant(2**31 - 1, tf.int64))

    def narrow(low, high):
        middle = (low + high + 1) // 2
        ok = holds(keys >= middle[:, None])
        return tf.where(ok, middle, low), tf.where(ok, high, middle - 1)

    low, _ = tf.while_loop(lambda low, high: True, narrow, (low, high), maximum_iterations=32)
    return low[:, None]


def filter_logits(logits, top_k, top_p):
    """OpenAI's top-k then top-p over the whole vocabulary, per row (the sampler's fallback when
    `filter_candidates` cannot be exact); removed logits become -inf. logits: float32 [b, V]
    (scaled); top_k: int32 [b] (0 = off) keeps logits >= the k-th largest; top_p: float32 [b]
    (1 = off) keeps the largest logits whose probabilities sum to at most p (at least the largest
    one), as OpenAI's sorted cumulative sum does."""
    keys = _sortable_keys(logits)
    k = tf.where(top_k > 0, top_k, tf.shape(logits)[-1])
    kth_key = _largest_key_where(keys, lambda kept: tf.reduce_sum(tf.cast(kept, tf.int32), -1) >= k)
    logits = tf.where(keys < kth_key, NEG_INF, logits)
    probs = tf.nn.softmax(logits, axis=-1)
    beyond_p = _largest_key_where(keys, lambda kept: tf.reduce_sum(tf.where(kept, probs, 0.0), -1) > top_p)
    nucleus_key = tf.minimum(beyond_p + 1, tf.reduce_max(keys, -1, keepdims=True))
    return tf.where((top_p[:, None] < 1.0) & (keys < nucleus_key), NEG_INF, logits)


def filter_candidates(logits, top_k, top_p):
    """Top-k/top-p over the CANDIDATES largest logits only, which is exact whenever the kept set
    lies among them (0 < top_k <= CANDIDATES, or a nucleus smaller than that). logits: float32
    [b, V] (scaled). Returns (filtered candidate logits [b, C], their ids [b, C], exact bool [b])."""
    values, ids = tf.math.top_k(logits, CANDIDATES)
    k_inside = (top_k > 0) & (top_k <= CANDIDATES)
    kth = tf.gather(values, tf.clip_by_value(top_k, 1, CANDIDATES) - 1, axis=-1, batch_dims=1)[:, None]
    values = tf.where(k_inside[:, None] & (values < kth), NEG_INF, values)
    total = tf.where(k_inside, tf.reduce_logsumexp(values, -1), tf.reduce_logsumexp(logits, -1))
    cumulative = tf.cumsum(tf.exp(values - total[:, None]), axis=-1)
    inside = tf.reduce_sum(tf.cast(cumulative <= top_p[:, None], tf.int32), axis=-1)
    min_value = tf.gather(values, tf.maximum(inside - 1, 0), axis=-1, batch_dims=1)[:, None]
    values = tf.where((top_p < 1.0)[:, None] & (values < min_value), NEG_INF, values)
    nucleus_inside = (top_k == 0) & (top_p < 1.0) & (inside < CANDIDATES)
    return values, ids, k_inside | nucleus_inside
