"""Sampling from GPT-2 with OpenAI's semantics, compiled, against a fixed-shape key/value cache.

One forward pass over the (left-padded) prompt fills the cache; then each step feeds one token,
writes its keys/values into the next cache slot and picks the next token: logits / temperature,
top-k (0 = off), top-p (1.0 = off), multinomial; temperature 0 is greedy. The whole decode is one
`tf.function` around a `tf.while_loop`; the streaming path calls the same step once per token.

Shapes: b = batch, P = prompt slots (bucketed), C = cache slots (bucketed), V = n_vocab.
"""

import math
import weakref

import keras
import numpy as np
import tensorflow as tf

from gpt2.layers import MASKED_SCORE

# Prompt and cache lengths are rounded up to these granularities so that calls with nearby
# lengths reuse one compiled function instead of tracing (and compiling) a new one.
PROMPT_BUCKET = 32
CACHE_BUCKET = 64
# Top-k/top-p look at this many of the largest logits first (exact when the kept set fits in them).
CANDIDATES = 256


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class _Settings(tf.experimental.ExtensionType):
    """Per-row sampling values, tensors in the compiled graph, so new values never retrace."""

    temperature: tf.Tensor  # float32 [b], 0 = greedy
    top_k: tf.Tensor  # int32 [b], 0 = off
    top_p: tf.Tensor  # float32 [b], 1 = off
    seed: tf.Tensor  # int32 [b]: each row draws its own random stream
    length: tf.Tensor  # int32 [b]: new tokens wanted per row
    stop_token: tf.Tensor  # int32 scalar, -1 = never stop


def _sortable_keys(x):
    """float32 -> int64 keys with the same order, so thresholds can be found exactly by bisection."""
    bits = tf.bitcast(x, tf.int32)
    return tf.cast(tf.where(bits < 0, bits ^ 0x7FFFFFFF, bits), tf.int64)


def _largest_key_where(keys, holds):
    """Per row, the largest t in the int32 range with holds(keys >= t) true, for a `holds` that is
    true at the smallest t and monotone. keys: int64 [b, V]; holds: bool [b, V] mask -> bool [b].
    Returns int64 [b, 1].

    A 32-step bisection: no sort of the vocabulary (XLA's CPU sort of 50257 values costs more
    than a whole decode step).
    """
    low = tf.fill(tf.shape(keys)[:1], tf.constant(-(2**31), tf.int64))
    high = tf.fill(tf.shape(keys)[:1], tf.constant(2**31 - 1, tf.int64))

    def narrow(low, high):
        middle = (low + high + 1) // 2
        ok = holds(keys >= middle[:, None])
        return tf.where(ok, middle, low), tf.where(ok, high, middle - 1)

    low, _ = tf.while_loop(lambda low, high: True, narrow, (low, high), maximum_iterations=32)
    return low[:, None]


def filter_logits(logits, top_k, top_p):
    """OpenAI's top-k then top-p filtering over the whole vocabulary, per row; filtered logits
    become -1e10. (The sampler uses it only when `_filter_candidates` cannot be exact.)

    logits: float32 [b, V]; top_k: int32 [b] (0 = off); top_p: float32 [b] (1 = off).
    Top-k keeps logits >= the k-th largest; top-p keeps the largest logits whose probabilities
    sum to at most p (at least the largest one), as OpenAI's sorted cumulative sum does.
    """
    masked = tf.cast(MASKED_SCORE, logits.dtype)
    keys = _sortable_keys(logits)
    k = tf.where(top_k > 0, top_k, tf.shape(logits)[-1])
    kth_key = _largest_key_where(keys, lambda kept: tf.reduce_sum(tf.cast(kept, tf.int32), -1) >= k)
    logits = tf.where(keys < kth_key, masked, logits)
    probs = tf.nn.softmax(logits, axis=-1)
    beyond_p = _largest_key_where(keys, lambda kept: tf.reduce_sum(tf.where(kept, probs, 0.0), -1) > top_p)
    nucleus_key = tf.minimum(beyond_p + 1, tf.reduce_max(keys, -1, keepdims=True))
    return tf.where((top_p[:, None] < 1.0) & (keys < nucleus_key), masked, logits)


def _row_uniforms(seed, step):
    """One uniform number in [0, 1) per row, from the row's own stream: seed int32 [b] -> [b]."""
    return tf.map_fn(
        lambda row_seed: tf.random.stateless_uniform([], tf.stack([row_seed, step])),
        seed,
        fn_output_signature=tf.float32,
    )


def _invert_cdf(logits, uniform):
    """Index of the draw from softmax(logits) [b, n] at uniform [b]: an exact multinomial draw.

    The CDF is walked in blocks of 256 (block totals, then one block), not as one n-long cumsum.
    """
    n = logits.shape[-1]
    blocks = -(-n // 256)
    probs = tf.pad(tf.nn.softmax(logits, axis=-1), [[0, 0], [0, blocks * 256 - n]])
    probs = tf.reshape(probs, [-1, blocks, 256])
    block_cdf = tf.cumsum(tf.reduce_sum(probs, axis=-1), axis=-1)
    target = uniform * block_cdf[:, -1]
    block = tf.minimum(tf.reduce_sum(tf.cast(block_cdf <= target[:, None], tf.int32), axis=-1), blocks - 1)
    before = tf.gather(block_cdf, tf.maximum(block - 1, 0), axis=-1, batch_dims=1)
    within_cdf = tf.cumsum(tf.gather(probs, block, axis=1, batch_dims=1), axis=-1)
    within = tf.where(block > 0, before, 0.0)[:, None] + within_cdf
    index = block * 256 + tf.reduce_sum(tf.cast(within <= target[:, None], tf.int32), axis=-1)
    return tf.minimum(index, n - 1)


def _filter_candidates(logits, top_k, top_p):
    """Top-k/top-p over the CANDIDATES largest logits only, which is exact whenever the kept set
    lies among them (top_k <= CANDIDATES, or a nucleus smaller than that).

    Returns (filtered candidate logits [b, C], their token ids [b, C], exact [b] bool).
    """
    masked = tf.cast(MASKED_SCORE, logits.dtype)
    values, ids = tf.math.top_k(logits, CANDIDATES)
    k_inside = (top_k > 0) & (top_k <= CANDIDATES)
    kth = tf.gather(values, tf.clip_by_value(top_k, 1, CANDIDATES) - 1, axis=-1, batch_dims=1)[:, None]
    values = tf.where(k_inside[:, None] & (values < kth), masked, values)
    total = tf.where(k_inside, tf.reduce_logsumexp(values, -1), tf.reduce_logsumexp(logits, -1))
    cumulative = tf.cumsum(tf.exp(values - total[:, None]), axis=-1)
    inside = tf.reduce_sum(tf.cast(cumulative <= top_p[:, None], tf.int32), axis=-1)
    min_value = tf.gather(values, tf.maximum(inside - 1, 0), axis=-1, batch_dims=1)[:, None]
    values = tf.where((top_p < 1.0)[:, None] & (values < min_value), masked, values)
    nucleus_inside = (top_k == 0) & (top_p < 1.0) & (inside < CANDIDATES)
    return values, ids, k_inside | nucleus_inside


def choose_tokens(logits, settings, step):
    """Picks the next token of each row. logits: float32 [b, V]; step: int32 scalar. Returns int32 [b].

    Rows whose top-k/top-p set lies among the largest CANDIDATES logits (the usual case) draw
    from those; the others filter and draw over the whole vocabulary.
    """
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sampling = settings.temperature > 0.0

    def sample():
        scaled = logits / tf.where(sampling, settings.temperature, 1.0)[:, None]
        uniform = _row_uniforms(settings.seed, step)
        filtering = (settings.top_k > 0) | (settings.top_p < 1.0)

        def candidates():
            values, ids, exact = _filter_candidates(scaled, settings.top_k, settings.top_p)
            return tf.gather(ids, _invert_cdf(values, uniform), axis=-1, batch_dims=1), exact

        from_candidates, exact = tf.cond(
            tf.reduce_any(filtering), candidates, lambda: (greedy, tf.zeros_like(filtering))
        )

        def from_vocabulary():
            filtered = tf.cond(
                tf.reduce_any(filtering & ~exact),
                lambda: filter_logits(scaled, settings.top_k, settings.top_p),
                lambda: scaled,
            )
            return _invert_cdf(filtered, uniform)

        drawn = tf.cond(tf.reduce_all(exact), lambda: from_candidates, from_vocabulary)
        return tf.where(sampling, tf.where(exact, from_candidates, drawn), greedy)

    return tf.cond(tf.reduce_any(sampling), sample, lambda: greedy)


class _Decoder:
    """Compiled prefill/step/loop functions for one model (built once, reused by every call).

    The loop: prefill gives the logits after the prompt; each step then picks every row's next
    token from the current logits and feeds those tokens through the model for the next logits.
    (The last step's forward pass is not needed; doing it anyway keeps the sampler in the graph
    once, which roughly halves tracing and compiling it.)
    """

    def __init__(self, model, jit_compile):
        self.model = model
        options = dict(jit_compile=jit_compile, autograph=False)
        self.generate = tf.function(self._generate, **options)
        self.prefill = tf.function(self._prefill, **options)
        self.step = tf.function(self._step, **options)

    def _prefill(self, tokens, pad, cache_len):
        """Runs the prompt. tokens: int32 [b, P], left-padded by pad [b]; cache_len: Python int.

        Returns (logits of the last prompt position [b, V], cache).
        """
        prompt_len = tokens.shape[1]
        slots = tf.range(cache_len)
        query_slots = slots[:prompt_len]
        positions = tf.maximum(query_slots[None, :] - pad[:, None], 0)
        visible = (slots[None, None, :] <= query_slots[None, :, None]) & (
            slots[None, None, :] >= pad[:, None, None]
        )
        cache = self.model.empty_cache(tf.shape(tokens)[0], cache_len)
        h, cache = self.model.call_cached(tokens, positions, cache, 0, visible[:, None])
        return self.model.logits(h[:, -1]), cache

    def _step(self, logits, pad, cache, slot, step, done, settings):
        """Picks the tokens of `step` (int32 scalar) from logits [b, V] and feeds them in at cache
        slot `slot`. Rows already `done` [b] emit the stop token (or 0); a row is done after its
        stop token or its `length`-th token. Returns (tokens [b], next logits, cache, done)."""
        chosen = choose_tokens(logits, settings, step)
        tokens = tf.where(done, tf.maximum(settings.stop_token, 0), chosen)
        done = done | tf.equal(tokens, settings.stop_token) | (step + 1 >= settings.length)
        slots = tf.range(cache[0][0].shape[2])
        visible = (slots[None, :] <= slot) & (slots[None, :] >= pad[:, None])
        positions = (slot - pad)[:, None]
        h, cache = self.model.call_cached(tokens[:, None], positions, cache, slot, visible[:, None, None])
        return tokens, self.model.logits(h[:, 0]), cache, done

    def _generate(self, tokens, pad, cache_len, settings):
        """The whole decode. tokens: int32 [b, P], left-padded by pad [b].

        Returns int32 [b, C]: the prompt slots, then the new tokens.
        """
        prompt_len = tokens.shape[1]
        batch = tf.shape(tokens)[0]
        logits, cache = self._prefill(tokens, pad, cache_len)
        output = tf.concat([tokens, tf.zeros([batch, cache_len - prompt_len], tf.int32)], 1)

        def not_done(step, logits, cache, done, output):
            return ~tf.reduce_all(done)

        def body(step, logits, cache, done, output):
            slot = prompt_len + step
            new_tokens, logits, cache, done = self._step(logits, pad, cache, slot, step, done, settings)
            output = keras.ops.slice_update(output, [0, slot], new_tokens[:, None])
            return step + 1, logits, cache, done, output

        start = (tf.constant(0), logits, cache, tf.zeros([batch], tf.bool), output)
        return tf.while_loop(not_done, body, start)[-1]


_decoders = weakref.WeakKeyDictionary()


def compiled_decoder(model, jit_compile=True):
    """The (cached) compiled functions for `model`; exposed for tests that count traces."""
    per_model = _decoders.setdefault(model, {})
    if jit_compile not in per_model:
        per_model[jit_compile] = _Decoder(model, jit_compile)
    return per_model[jit_compile]


def _per_row(value, batch, name):
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"{name}: expected one value per prompt ({batch}), got {len(values)}")
    return values


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_row(n_ctx, prompt_len, length, temperature, top_k, top_p):
    if not _is_int(length) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if prompt_len + length > n_ctx:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + length ({length}) exceeds the model's context of "
            f"{n_ctx} tokens; shorten the prompt or lower length"
        )
    if not isinstance(temperature, (int, float, np.number)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def _left_pad(rows, n_vocab):
    """List of token lists -> (int32 [b, P] left-padded to a bucket, pad [b])."""
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"prompt {i} is empty; start unconditional samples from <|endoftext|> (50256)")
        bad = [int(t) for t in row if not 0 <= int(t) < n_vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {n_vocab}): {bad[:5]}")
    prompt_len = _round_up(max(len(row) for row in rows), PROMPT_BUCKET)
    tokens = np.zeros([len(rows), prompt_len], np.int32)
    pad = np.array([prompt_len - len(row) for row in rows], np.int32)
    for i, row in enumerate(rows):
        tokens[i, pad[i]:] = row
    return tokens, pad


def row_seeds(seed, batch):
    """Per-row int32 seeds from one seed (None: fresh entropy). Row i's seed does not depend on batch."""
    return np.random.SeedSequence(seed).generate_state(batch).view(np.int32)


def sample_rows(model, prompts, length, temperature=1.0, top_k=0, top_p=1.0, seeds=None,
                stop_token=None, callback=None, jit_compile=True):
    """The sampler behind `sample_sequence`, with every setting either one value or one per row.

    prompts: list of token lists (any lengths). length, temperature, top_k, top_p: a value or a
    list with one per prompt. seeds: int32 per row (see `row_seeds`); None = fresh ones.
    Returns a list with each row's new tokens (int32): `length` of them, or fewer ending with
    stop_token. callback(step, tokens [b]) streams each step as it is produced.
    """
    batch = len(prompts)
    if batch == 0:
        raise ValueError("no prompts given")
    hparams = model.hparams
    lengths = _per_row(length, batch, "length")
    temperatures = _per_row(temperature, batch, "temperature")
    top_ks = _per_row(top_k, batch, "top_k")
    top_ps = _per_row(top_p, batch, "top_p")
    for row in zip(map(len, prompts), lengths, temperatures, top_ks, top_ps):
        _check_row(hparams.n_ctx, *row)
    tokens, pad = _left_pad(prompts, hparams.n_vocab)
    cache_len = _round_up(tokens.shape[1] + max(lengths), CACHE_BUCKET)
    settings = _Settings(
        temperature=tf.constant(temperatures, tf.float32),
        top_k=tf.constant(top_ks, tf.int32),
        top_p=tf.constant(top_ps, tf.float32),
        seed=tf.constant(row_seeds(None, batch) if seeds is None else seeds, tf.int32),
        length=tf.constant(lengths, tf.int32),
        stop_token=tf.constant(-1 if stop_token is None else stop_token, tf.int32),
    )
    decoder = compiled_decoder(model, jit_compile)
    if callback is None:
        new_tokens = decoder.generate(tokens, pad, cache_len, settings).numpy()[:, tokens.shape[1]:]
    else:
        new_tokens = _stream(decoder, tokens, pad, cache_len, settings, callback)
    rows = []
    for row, row_length in zip(new_tokens, lengths):
        row = row[:row_length]
        stops = np.flatnonzero(row == stop_token) if stop_token is not None else []
        rows.append(row[: stops[0] + 1] if len(stops) else row)
    return rows


def _stream(decoder, tokens, pad, cache_len, settings, callback):
    """The decode as a Python loop over the compiled step, handing each step's tokens to callback.
    Returns the new tokens, int32 [b, steps]."""
    logits, cache = decoder.prefill(tokens, pad, cache_len)
    done = tf.zeros([tokens.shape[0]], tf.bool)
    produced = []
    while not done.numpy().all():
        step = len(produced)
        new_tokens, logits, cache, done = decoder.step(
            logits, pad, cache, tf.constant(tokens.shape[1] + step), tf.constant(step), done, settings
        )
        produced.append(new_tokens.numpy())
        callback(step, produced[-1])
    return np.stack(produced, axis=1)


def sample_sequence(model, context, length, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                    stop_token=None, callback=None, jit_compile=True):
    """Samples `length` new tokens after each prompt, with OpenAI's sampler semantics.

    context: int [batch, context_len], or a list of token lists of different lengths (rows are
    left-padded internally; each row gives what it would alone under greedy decoding).
    temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off. seed: an int makes the output
    reproducible (each row draws from its own stream); None draws a fresh one.
    stop_token (e.g. 50256): a row stops after producing it, and decoding ends once every row has
    stopped. callback(step, tokens): if given, called with each step's new tokens (int32 [batch])
    as they are produced (streaming; rows that have stopped repeat stop_token).
    jit_compile: compile with XLA (faster on this CPU; see BENCHMARKS.md).

    Returns int32 [batch, context_len + new tokens] for rectangular `context` (rows that stopped
    early are filled with stop_token), or for ragged prompts a list of 1-D arrays, each prompt +
    its new tokens.
    """
    if isinstance(context, tf.Tensor):
        context = context.numpy()
    prompts = [list(row) for row in context]
    if not prompts:
        raise ValueError("context holds no prompts")
    new_tokens = sample_rows(
        model, prompts, length, temperature, top_k, top_p, row_seeds(seed, len(prompts)),
        stop_token, callback, jit_compile,
    )
    outputs = [np.concatenate([np.asarray(p, np.int32), n]) for p, n in zip(prompts, new_tokens)]
    if len({len(p) for p in prompts}) > 1:
        return outputs
    width = max(len(row) for row in outputs)
    fill = 0 if stop_token is None else stop_token
    return np.stack([np.pad(row, (0, width - len(row)), constant_values=fill) for row in outputs])


def generate(model, enc, prompts, length=64, temperature=1.0, top_k=0, top_p=1.0, seed=None,
             stop_at_eot=True):
    """Text in, text out: returns the continuation (without the prompt) of each prompt.

    prompts: a string or a list of strings; an empty string samples unconditionally. With
    stop_at_eot, a row ends at <|endoftext|> and its text stops before it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [enc.encode(p) if p else [enc.eot_token] for p in prompts]
    eot = enc.eot_token if stop_at_eot else None
    new_tokens = sample_rows(
        model, rows, length, temperature, top_k, top_p, row_seeds(seed, len(rows)), stop_token=eot
    )
    return [enc.decode([t for t in row if t != eot] if eot is not None else row) for row in new_tokens]
