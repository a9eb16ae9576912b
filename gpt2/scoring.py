"""Scoring text with GPT-2: per-token log-probabilities and sliding-window perplexity.

`score` gives log p(token_t | tokens_<t) for every token of each row after the first (rows of up to
n_ctx + 1 tokens: the last token is only predicted, never fed); `echo_logprobs` gives the same in
OpenAI's `echo` + `logprobs` layout; `perplexity` scores a sequence of any length, given whole or
as a stream, with overlapping windows of n_ctx tokens.

Log-probabilities are those of the model's own distribution, log_softmax(logits), before any
temperature, top-k or top-p (as OpenAI's API reports them).

All three run one compiled function per model (XLA by default) that returns only what is asked
for, never the logits: per position, the log-probability of one target token and, on request,
the ids and log-probabilities of the k most likely tokens. Rows are right-padded (attention is
causal, so padding after a row never changes it) to a length bucket (a power of two >= 32, at most
n_ctx) and batches to a power of two of rows, so calls with new lengths reuse a few compiled
programs. Batches are sized so that the logits the compiled function holds stay near
LOGITS_BUDGET_BYTES.

Shapes: b = rows in a compiled call, L = positions (bucketed), k = alternatives, V = n_vocab,
n = tokens of one row.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from gpt2.model import GPT2

from gpt2 import compile_cache

MIN_LENGTH_BUCKET = 32
# Batches are sized so that their float32 logits [b, L, V] stay within this many bytes
# (2 windows of 1024 tokens with GPT-2's 50257-token vocabulary).
LOGITS_BUDGET_BYTES = 512 << 20
# top_k of 1..SMALL_TOP_K is computed as SMALL_TOP_K and cut, so OpenAI's logprobs=1..5 share
# one compiled function.
SMALL_TOP_K = 5


class TokenScores(NamedTuple):
    """The scores of one row, one entry per scored position (see `score` and `echo_logprobs`):
    logprobs float32 [m], log p(token | tokens before it); top_ids int32 [m, k], the k most likely
    tokens there, most likely first; top_logprobs float32 [m, k], their log-probabilities."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """What `perplexity` returns: the summed negative log-likelihood (nats) of `tokens` scored
    tokens, and the number of windows the model ran."""

    total_nll: float
    tokens: int
    windows: int

    @property
    def mean_nll(self):
        """Mean negative log-likelihood in nats per token (NaN when nothing was scored)."""
        return self.total_nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self):
        """exp(mean_nll)."""
        return math.exp(self.mean_nll) if self.tokens else math.nan


# ----------------------------------------------------------------------------- compiled part

class _Scorer:
    """The compiled scoring functions of one model, one per number of alternatives k. `traces`
    counts how often any of them was traced (a test checks it stays bounded)."""

    def __init__(self, model, jit_compile):
        self.model = model
        self.jit_compile = jit_compile
        self.traces = 0
        self._functions = {}
        if jit_compile:
            compile_cache.enable()  # before this process's first XLA compile

    def __call__(self, inputs, targets, top_k):
        """`target_logprobs` as NumPy arrays."""
        if top_k not in self._functions:
            self._functions[top_k] = tf.function(lambda inputs, targets: self._logprobs(inputs, targets, top_k),
                                                 jit_compile=self.jit_compile, autograph=False)
        try:
            logprobs, top_ids, top_logprobs = self._functions[top_k](inputs, targets)
        except tf.errors.OpError as error:
            if not compile_cache.recover(error):
                raise
            self._functions.clear()  # new functions, new names: TensorFlow keeps failing the old ones
            return self(inputs, targets, top_k)
        return logprobs.numpy(), top_ids.numpy(), top_logprobs.numpy()

    def _logprobs(self, inputs, targets, top_k):
        self.traces += 1
        return target_logprobs(self.model, inputs, targets, top_k)


def target_logprobs(model, inputs, targets, top_k=0):
    """The graph computation behind `score` (also the exported `score` signature, gpt2.savedmodel).

    inputs, targets: int32 [b, L] (targets[:, i] is the token after inputs[:, i]). Returns
    (target logprobs float32 [b, L], top ids int32 [b, L, k], top logprobs float32 [b, L, k]).
    """
    logits = tf.cast(model(inputs, training=False)["logits"], tf.float32)  # [b, L, V]
    log_normalizer = tf.reduce_logsumexp(logits, axis=-1, keepdims=True)  # [b, L, 1]
    ids = targets[..., None]
    if top_k:
        ids = tf.concat([ids, tf.math.top_k(logits, top_k).indices], axis=-1)  # [b, L, 1 + k]
    # One gather and one subtraction for the target and the alternatives alike: when the
    # target is the most likely token, its logprob and top_logprobs[0] are the same float.
    values = tf.gather(logits, ids, batch_dims=2) - log_normalizer
    return values[..., 0], ids[..., 1:], values[..., 1:]


_scorers = weakref.WeakKeyDictionary()


def compiled_scorer(model, jit_compile=None):
    """The (cached) `_Scorer` of `model`; exposed for tests that count traces."""
    per_model = _scorers.setdefault(model, {})
    jit_compile = model.default_jit_compile if jit_compile is None else jit_compile
    if jit_compile not in per_model:
        per_model[jit_compile] = _Scorer(model, jit_compile)
    return per_model[jit_compile]


# ----------------------------------------------------------------------------- shapes

def _power_of_two_at_least(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def length_bucket(n, n_ctx):
    """Positions a row of n inputs is padded to: a power of two >= MIN_LENGTH_BUCKET, <= n_ctx."""
    return min(max(_power_of_two_at_least(n), MIN_LENGTH_BUCKET), n_ctx)


def default_batch_size(length, n_vocab):
    """Rows of `length` positions per compiled call: a power of two whose float32 logits fit in
    LOGITS_BUDGET_BYTES (at least 1). 124M, 1024 positions: 2; 32 positions: 64."""
    rows = max(LOGITS_BUDGET_BYTES // (length * n_vocab * 4), 1)
    return 1 << (rows.bit_length() - 1)


def _rows_bucket(rows, batch_size):
    """A batch of `rows` rows is padded to the next power of two, at most batch_size."""
    return min(_power_of_two_at_least(rows), batch_size)


def _check_positive_int(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_ids(row, n_vocab, what):
    """One row of token ids -> int32 [n]; ValueError naming `what` for non-integers or ids outside
    the vocabulary (XLA would clamp them silently)."""
    array = np.asarray(row)
    if array.size == 0:
        return np.zeros([0], np.int32)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D sequence of integer token ids, "
                         f"got {array.dtype} of shape {array.shape}")
    bad = array[(array < 0) | (array >= n_vocab)]
    if bad.size:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {n_vocab}): {bad[:5].tolist()}")
    return array.astype(np.int32)


def _pad(rows, n_rows, length):
    """Right-pads int32 rows (each at most `length` long) with 0 into int32 [n_rows, length]."""
    out = np.zeros([n_rows, length], np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# ----------------------------------------------------------------------------- score

def _array_of(tokens, ndim, expected):
    """tokens as a NumPy array if it is a tensor or an array (of `ndim` dimensions, else a
    ValueError saying `expected`), else None (a Python sequence or iterator)."""
    if isinstance(tokens, tf.Tensor):
        tokens = tokens.numpy()
    if not isinstance(tokens, np.ndarray):
        return None
    if tokens.ndim != ndim:
        raise ValueError(f"tokens must be {expected}, got shape {tokens.shape}")
    return tokens


def _rows_of(tokens, n_vocab):
    array = _array_of(tokens, 2, "2-D [rows, tokens] or a list of token lists")
    try:
        rows = list(tokens if array is None else array)
    except TypeError:
        raise ValueError("tokens must be a list of token lists (one per row)") from None
    if rows and all(isinstance(row, (int, np.integer)) for row in rows):
        raise ValueError("tokens must be a list of rows; to score one sequence pass [tokens]")
    return [_as_ids(row, n_vocab, f"row {i}") for i, row in enumerate(rows)]


def score(model: GPT2, tokens: Sequence[Sequence[int]], top_k: int = 0, batch_size: int | None = None,
          jit_compile: bool | None = None) -> list[np.ndarray] | list[TokenScores]:
    """Per-token log-probabilities: log p(token_t | tokens_<t) for t = 1..n-1 of each row.

    tokens: token-id lists (ragged, 0 to n_ctx + 1 tokens each: the last is only predicted), or
    int [rows, n]. top_k: also the top_k most likely tokens per position and their logprobs, from
    the same float values as the tokens' own (a most likely token's logprob equals
    top_logprobs[0] exactly). batch_size: rows per compiled call (default: as many as keep the
    logits within LOGITS_BUDGET_BYTES). jit_compile: XLA (None: GPT2.default_jit_compile).

    Returns one entry per row, in input order: with top_k=0, float32 [len(row) - 1] (empty for
    rows of 0 or 1 tokens; `np.stack` equal-length rows); with top_k > 0, a `TokenScores`. Values
    are the model's distribution before temperature/top-k/top-p.
    """
    rows, top_k, batch_size = _check_score_args(model, tokens, top_k, batch_size)
    results = _score_rows(model, rows, top_k, batch_size, jit_compile)
    return [r.logprobs for r in results] if top_k == 0 else results


def echo_logprobs(model, tokens, top_n=0, batch_size=None, jit_compile=None):
    """OpenAI's legacy `echo` + `logprobs`: for each row (see `score`), a `TokenScores` with one
    entry per token, the first token's empty as OpenAI's `null` (logprob NaN, top_ids -1,
    top_logprobs NaN); top_n: alternatives per position (OpenAI allows 0..5). For a completion's
    logprobs, score prompt + completion and take the completion's part."""
    rows, top_n, batch_size = _check_score_args(model, tokens, top_n, batch_size, "top_n")
    results = _score_rows(model, rows, top_n, batch_size, jit_compile)
    first = TokenScores(np.full([1], np.nan, np.float32), np.full([1, top_n], -1, np.int32),
                        np.full([1, top_n], np.nan, np.float32))
    return [TokenScores(*(np.concatenate([a, b]) for a, b in zip(first, scores))) if len(row) else scores
            for row, scores in zip(rows, results)]


def _check_score_args(model, tokens, top_k, batch_size, top_k_name="top_k"):
    """Validated (rows as int32 arrays, top_k, batch_size) or a ValueError saying what is wrong."""
    hparams = model.hparams
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 0 <= top_k <= hparams.n_vocab:
        raise ValueError(f"{top_k_name} must be an integer between 0 and n_vocab ({hparams.n_vocab}), got {top_k!r}")
    if batch_size is not None:
        batch_size = _check_positive_int(batch_size, "batch_size")
    rows = _rows_of(tokens, hparams.n_vocab)
    for i, row in enumerate(rows):
        if len(row) > hparams.n_ctx + 1:
            raise ValueError(f"row {i} has {len(row)} tokens; score takes at most n_ctx + 1 = {hparams.n_ctx + 1} "
                             "(the model's context plus the predicted last token); use gpt2.perplexity for longer text")
    return rows, int(top_k), batch_size


def _score_rows(model, rows, top_k, batch_size, jit_compile):
    """`score` of validated rows: a `TokenScores` per row (top arrays [n-1, top_k])."""
    hparams = model.hparams
    computed_k = SMALL_TOP_K if 0 < top_k <= SMALL_TOP_K else top_k
    scorer = compiled_scorer(model, jit_compile)
    results = [TokenScores(np.zeros([0], np.float32), np.zeros([0, top_k], np.int32),
                           np.zeros([0, top_k], np.float32))] * len(rows)
    # Longest rows first, so that each batch holds rows of similar lengths.
    order = [i for i in sorted(range(len(rows)), key=lambda i: -len(rows[i])) if len(rows[i]) >= 2]
    start = 0
    while start < len(order):
        length = length_bucket(len(rows[order[start]]) - 1, hparams.n_ctx)
        per_call = batch_size or default_batch_size(length, hparams.n_vocab)
        chosen = order[start : start + per_call]
        start += len(chosen)
        n_rows = _rows_bucket(len(chosen), per_call)
        inputs = _pad([rows[i][:-1] for i in chosen], n_rows, length)
        targets = _pad([rows[i][1:] for i in chosen], n_rows, length)
        logprobs, top_ids, top_logprobs = scorer(inputs, targets, computed_k)
        for j, i in enumerate(chosen):
            m = len(rows[i]) - 1
            results[i] = TokenScores(logprobs[j, :m], top_ids[j, :m, :top_k], top_logprobs[j, :m, :top_k])
    return results


# ----------------------------------------------------------------------------- perplexity

# The window conventions of `perplexity`: "rolling" feeds n_ctx tokens and scores the n_ctx tokens after
# them (lm-evaluation-harness's rolling windows); "hf" is Hugging Face's documented recipe
# ("Perplexity of fixed-length models"), whose windows of n_ctx tokens hold their own targets.
WINDOWS = ("rolling", "hf")


def window_count(n_tokens, n_ctx, stride, windows="rolling"):
    """How many windows `perplexity` runs over n_tokens tokens (for progress bars)."""
    return 0 if n_tokens < 2 else 1 + max(-(-(n_tokens - (1 if windows == "rolling" else 0) - n_ctx) // stride), 0)


def _token_chunks(tokens, n_vocab):
    """A 1-D sequence of ids, or an iterable of ids and/or 1-D chunks of ids -> int32 chunks."""
    array = _array_of(tokens, 1, "one sequence (1-D)")
    if array is not None:
        yield _as_ids(array, n_vocab, "tokens")
        return
    for scalars, items in itertools.groupby(tokens, key=lambda item: np.ndim(item) == 0):
        if not scalars:
            for chunk in items:
                yield _as_ids(chunk, n_vocab, "a chunk of tokens")
        while scalars and (ids := list(itertools.islice(items, 4096))):
            yield _as_ids(ids, n_vocab, "tokens")


class _Stream:
    """A token stream read chunk by chunk, holding only the part still needed (about a window)."""

    def __init__(self, chunks):
        self.chunks, self.buffer, self.offset, self.ended = iter(chunks), np.zeros([0], np.int32), 0, False

    def span(self, begin, end):
        """Tokens [begin, min(end, N)) (begin >= what was forgotten), and whether they end the stream."""
        pieces, held = [self.buffer], self.offset + len(self.buffer)  # buffer[0] is token number offset
        while not self.ended and held < end:
            try:
                pieces.append(next(self.chunks))
                held += len(pieces[-1])
            except StopIteration:
                self.ended = True
        self.buffer = np.concatenate(pieces) if len(pieces) > 1 else self.buffer
        end = min(end, held)
        return self.buffer[begin - self.offset : end - self.offset], self.ended and end == held

    def forget(self, before):
        """Drops the tokens before token number `before`."""
        self.buffer, self.offset = self.buffer[before - self.offset :], before


def _windows(chunks, n_ctx, stride, hf=False):
    """`perplexity`'s windows over a token stream, holding about one window of it at a time:
    (inputs int32 [l], targets int32 [l], first, weight); targets[first:] are scored (those no
    earlier window scored). hf: Hugging Face's recipe step for step, a window feeding n_ctx tokens
    and predicting inside itself, its mean NLL weighted by (end - previous end) - 1, the recipe's
    `num_loss_tokens` (valid labels less one for the shift); rolling windows' weight is None."""
    stream = _Stream(chunks)
    start, scored_to = 0, 0 if hf else 1  # rolling windows never score token 0
    while True:
        window, last = stream.span(start, start + n_ctx + (0 if hf else 1))
        end = start + len(window)
        if end - start < 2 or end <= scored_to:  # fewer than 2 tokens, or every token is scored
            return
        yield window[:-1], window[1:], max(scored_to - start - 1, 0), end - scored_to - 1 if hf else None
        if last:
            return
        scored_to = end
        start += stride
        stream.forget(start)


def perplexity(model: GPT2, tokens: Sequence[int] | np.ndarray, stride: int | None = None,
               batch_size: int | None = None, progress=None, jit_compile: bool | None = None,
               windows: str = "rolling") -> PerplexityResult:
    """Negative log-likelihood of a token sequence of any length, with sliding windows.

    windows="rolling" (default; lm-evaluation-harness's rolling windows): windows of n_ctx tokens
    start every `stride` tokens (default n_ctx // 2; stride = n_ctx gives disjoint windows). Each
    token after the first is scored exactly once, in the first window that can predict it (window
    w feeds tokens [w * stride, w * stride + n_ctx) and so predicts up to token w * stride + n_ctx),
    from all the left context that window gives: after the first window, every token has at least
    n_ctx - stride + 1 tokens of context.

    windows="hf": Hugging Face's documented recipe ("Perplexity of fixed-length models"), to
    reproduce its numbers exactly: a window holds n_ctx tokens including the ones it predicts, so it
    scores at most n_ctx - 1 (with stride = n_ctx one token per window is never scored), and each
    window's mean NLL counts as many times as its labels less one. total_nll and tokens are then
    that recipe's `nll_sum` and `n_tokens`, whose ratio is its `avg_nll`.

    tokens: a 1-D sequence of token ids (list, array, tensor), or an iterable of ids and/or 1-D
    chunks of ids (e.g. `encoder.encode_file(path)`), read as the windows need it, so a large
    input is never held whole. batch_size: windows per compiled call (default: as many as keep the
    logits within LOGITS_BUDGET_BYTES; 2 for GPT-2's 1024-token context). progress: called with
    the number of windows just scored after each call.

    Returns a `PerplexityResult` (total_nll in nats, tokens scored, windows, mean_nll, perplexity).
    """
    if windows not in WINDOWS:
        raise ValueError(f"windows must be one of {', '.join(map(repr, WINDOWS))}, got {windows!r}")
    hparams = model.hparams
    n_ctx = hparams.n_ctx
    stride = n_ctx // 2 if stride is None else _check_positive_int(stride, "stride")
    if stride > n_ctx:
        raise ValueError(f"stride must be at most the model's context ({n_ctx}), got {stride}")
    if batch_size is None:
        batch_size = default_batch_size(n_ctx, hparams.n_vocab)
    batch_size = _check_positive_int(batch_size, "batch_size")
    scorer = compiled_scorer(model, jit_compile)
    total_nll, scored, windows_run = 0.0, 0, 0
    # The first full batch fixes the shape [batch_size, n_ctx]; later batches, the last one
    # included, are padded to it (cheaper than compiling another shape). A stream that ends
    # before a batch fills gets the bucketed shape of what it holds.
    full_shape = False

    def run(batch):
        nonlocal total_nll, scored, windows_run
        if full_shape:
            n_rows, length = batch_size, n_ctx
        else:
            n_rows = _rows_bucket(len(batch), batch_size)
            length = length_bucket(max(len(inputs) for inputs, _, _, _ in batch), n_ctx)
        logprobs, _, _ = scorer(_pad([w[0] for w in batch], n_rows, length),
                                _pad([w[1] for w in batch], n_rows, length), 0)
        for row, (inputs, _, first, weight) in zip(logprobs, batch):
            kept = row[first : len(inputs)]
            nll = -float(np.sum(kept, dtype=np.float64))
            if weight is None:  # rolling: the sum over the tokens scored
                total_nll += nll
                scored += len(kept)
            else:  # hf: the window's mean, `weight` times
                total_nll += nll / len(kept) * weight
                scored += weight
        windows_run += len(batch)
        if progress is not None:
            progress(len(batch))

    batch = []
    for window in _windows(_token_chunks(tokens, hparams.n_vocab), n_ctx, stride, hf=windows == "hf"):
        batch.append(window)
        if len(batch) == batch_size:
            run(batch)
            batch, full_shape = [], True
    if batch:
        run(batch)
    return PerplexityResult(total_nll=total_nll, tokens=scored, windows=windows_run)
