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


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class _Settings(tf.experimental.ExtensionType):
    """Per-call values that are tensors in the compiled graph, so changing them never retraces."""

    temperature: tf.Tensor  # float32 scalar, 0 = greedy
    top_k: tf.Tensor  # int32 scalar, 0 = off
    top_p: tf.Tensor  # float32 scalar, 1 = off
    seed: tf.Tensor  # int32 scalar
    stop_token: tf.Tensor  # int32 scalar, -1 = never stop


def filter_logits(logits, top_k, top_p):
    """OpenAI's top-k then top-p filtering; filtered logits become -1e10.

    logits: float32 [b, V]; top_k: int32 scalar (0 = off); top_p: float32 scalar (1 = off).
    Top-k keeps logits >= the k-th largest; top-p keeps the smallest prefix of the sorted
    distribution whose cumulative probability reaches p (at least one token), per row.
    """
    masked = tf.cast(MASKED_SCORE, logits.dtype)
    sorted_logits = tf.sort(logits, direction="DESCENDING", axis=-1)
    vocab = tf.shape(logits)[-1]
    kth_index = tf.where(top_k > 0, tf.minimum(top_k, vocab) - 1, vocab - 1)
    kth_value = tf.gather(sorted_logits, kth_index, axis=-1)[:, None]
    logits = tf.where(logits < kth_value, masked, logits)
    sorted_logits = tf.where(sorted_logits < kth_value, masked, sorted_logits)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
    last_kept = tf.maximum(tf.reduce_sum(tf.cast(cumulative <= top_p, tf.int32), axis=-1) - 1, 0)
    min_value = tf.gather(sorted_logits, last_kept, axis=-1, batch_dims=1)[:, None]
    return tf.where((top_p < 1.0) & (logits < min_value), masked, logits)


def choose_tokens(logits, settings, step):
    """Picks the next token of each row. logits: float32 [b, V]; step: int32 scalar. Returns int32 [b]."""

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def sample():
        scaled = logits / settings.temperature
        filtered = tf.cond(
            (settings.top_k > 0) | (settings.top_p < 1.0),
            lambda: filter_logits(scaled, settings.top_k, settings.top_p),
            lambda: scaled,
        )
        seed = tf.stack([settings.seed, step])
        return tf.random.stateless_categorical(filtered, 1, seed, dtype=tf.int32)[:, 0]

    return tf.cond(settings.temperature > 0.0, sample, greedy)


class _Decoder:
    """Compiled prefill/step/loop functions for one model (built once, reused by every call)."""

    def __init__(self, model, jit_compile):
        self.model = model
        self.generate = tf.function(self._generate, jit_compile=jit_compile)
        self.prefill = tf.function(self._prefill, jit_compile=jit_compile)
        self.step = tf.function(self._step, jit_compile=jit_compile)

    def _prefill(self, tokens, pad, cache_len, settings):
        """Runs the prompt. tokens: int32 [b, P] left-padded by pad [b]; cache_len: Python int.

        Returns (first new tokens [b], cache, done [b]).
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
        next_tokens = choose_tokens(self.model.logits(h[:, -1]), settings, tf.constant(0))
        return next_tokens, cache, tf.equal(next_tokens, settings.stop_token)

    def _step(self, tokens, pad, cache, slot, step, done, settings):
        """Feeds tokens [b] at cache slot `slot` (int32 scalar); picks the tokens of `step`.

        Rows already `done` [b] keep emitting the stop token. Returns (tokens [b], cache, done).
        """
        cache_len = cache[0][0].shape[2]
        slots = tf.range(cache_len)
        visible = (slots[None, :] <= slot) & (slots[None, :] >= pad[:, None])
        positions = (slot - pad)[:, None]
        h, cache = self.model.call_cached(tokens[:, None], positions, cache, slot, visible[:, None, None])
        next_tokens = choose_tokens(self.model.logits(h[:, 0]), settings, step)
        next_tokens = tf.where(done, settings.stop_token, next_tokens)
        return next_tokens, cache, done | tf.equal(next_tokens, settings.stop_token)

    def _generate(self, tokens, pad, length, cache_len, settings):
        """The whole decode. tokens: int32 [b, P]; length: int32 scalar, new tokens wanted.

        Returns (int32 [b, C]: prompt then new tokens, int32 scalar: new tokens produced).
        """
        prompt_len = tokens.shape[1]
        batch = tf.shape(tokens)[0]
        first, cache, done = self._prefill(tokens, pad, cache_len, settings)
        output = tf.concat([tokens, first[:, None], tf.zeros([batch, cache_len - prompt_len - 1], tf.int32)], 1)

        def keep_going(step, last, cache, done, output):
            return (step < length) & ~tf.reduce_all(done)

        def body(step, last, cache, done, output):
            slot = prompt_len + step - 1
            last, cache, done = self._step(last, pad, cache, slot, step, done, settings)
            output = keras.ops.slice_update(output, [0, slot + 1], last[:, None])
            return step + 1, last, cache, done, output

        steps, _, _, _, output = tf.while_loop(
            keep_going, body, (tf.constant(1), first, cache, done, output)
        )
        return output, steps


_decoders = weakref.WeakKeyDictionary()


def compiled_decoder(model, jit_compile=True):
    """The (cached) compiled functions for `model`; exposed for tests that count traces."""
    per_model = _decoders.setdefault(model, {})
    if jit_compile not in per_model:
        per_model[jit_compile] = _Decoder(model, jit_compile)
    return per_model[jit_compile]


def _check_settings(hparams, prompt_lengths, length, temperature, top_k, top_p):
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    longest = max(prompt_lengths)
    if longest + length > hparams.n_ctx:
        raise ValueError(
            f"prompt ({longest} tokens) + length ({length}) exceeds the model's context of "
            f"{hparams.n_ctx} tokens; shorten the prompt or lower length"
        )
    if not isinstance(temperature, (int, float, np.number)) or not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
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


def sample_sequence(model, context, length, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                    stop_token=None, callback=None, jit_compile=True):
    """Samples `length` new tokens after each prompt, with OpenAI's sampler semantics.

    context: int [batch, context_len], or a list of token lists of different lengths (rows are
    left-padded internally; each row gives what it would alone under greedy decoding).
    temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off. seed: an int makes the output
    reproducible; None draws a fresh one. stop_token (e.g. 50256): a row stops after producing it
    and the loop ends once every row has stopped; the rest of a stopped row holds stop_token.
    callback(step, tokens): if given, called with each step's new tokens (int32 [batch]) as they
    are produced (streaming; one compiled step per token instead of one compiled loop).
    jit_compile: compile with XLA (faster on CPU here; see BENCHMARKS.md).

    Returns int32 [batch, context_len + new tokens] for rectangular `context`, or a list of 1-D
    arrays (each prompt + its new tokens) for ragged prompts. New tokens number `length` unless
    every row stopped earlier.
    """
    if isinstance(context, tf.Tensor):
        context = context.numpy()
    ragged = not isinstance(context, np.ndarray) and len({len(row) for row in context}) > 1
    rows = [list(row) for row in context] if ragged else np.asarray(context)
    if not ragged and (rows.ndim != 2 or rows.shape[0] == 0):
        raise ValueError(f"context must be int tokens [batch, context_len], got shape {rows.shape}")
    hparams = model.hparams
    prompt_lengths = [len(row) for row in rows]
    _check_settings(hparams, prompt_lengths, length, temperature, top_k, top_p)
    tokens, pad = _left_pad(rows, hparams.n_vocab)
    cache_len = _round_up(tokens.shape[1] + length, CACHE_BUCKET)
    if seed is None:
        seed = np.random.default_rng().integers(2**31)
    settings = _Settings(
        temperature=tf.constant(temperature, tf.float32),
        top_k=tf.constant(top_k, tf.int32),
        top_p=tf.constant(top_p, tf.float32),
        seed=tf.constant(seed, tf.int32),
        stop_token=tf.constant(-1 if stop_token is None else stop_token, tf.int32),
    )
    decoder = compiled_decoder(model, jit_compile)
    if callback is None:
        output, steps = decoder.generate(tokens, pad, tf.constant(length), cache_len, settings)
        output = output.numpy()[:, : tokens.shape[1] + int(steps)]
    else:
        output = _stream(decoder, tokens, pad, length, cache_len, settings, callback)
    if ragged:
        return [output[i, pad[i]:] for i in range(len(rows))]
    return output[:, pad[0]:]


def _stream(decoder, tokens, pad, length, cache_len, settings, callback):
    """The decode as a Python loop over the compiled step, handing each step's tokens to callback."""
    new_tokens, cache, done = decoder.prefill(tokens, pad, cache_len, settings)
    produced = [new_tokens.numpy()]
    callback(0, produced[-1])
    prompt_len = tokens.shape[1]
    for step in range(1, length):
        if done.numpy().all():
            break
        new_tokens, cache, done = decoder.step(
            new_tokens, pad, cache, tf.constant(prompt_len + step - 1), tf.constant(step), done, settings
        )
        produced.append(new_tokens.numpy())
        callback(step, produced[-1])
    return np.concatenate([tokens, np.stack(produced, axis=1)], axis=1)


def generate(model, enc, prompts, length=64, temperature=1.0, top_k=0, top_p=1.0, seed=None,
             stop_at_eot=True):
    """Text in, text out: returns the continuation (without the prompt) of each prompt.

    prompts: a string or a list of strings; an empty string samples unconditionally. With
    stop_at_eot, a row ends at <|endoftext|> and the text stops before it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [enc.encode(p) if p else [enc.eot_token] for p in prompts]
    outputs = sample_sequence(
        model, rows, length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop_token=enc.eot_token if stop_at_eot else None,
    )
    texts = []
    for row, output in zip(rows, outputs):
        new = list(output[len(row):])
        if stop_at_eot and enc.eot_token in new:
            new = new[: new.index(enc.eot_token)]
        texts.append(enc.decode(new))
    return texts
