"""The sampler's public functions: `sample_sequence`, `stream`, `generate` and `sample_rows`.

A short job runs on the uncompiled sampler (`gpt2.sampling.direct`: no compile wait, slower
steps) until a model's direct tokens add up to `direct_tokens(model)`, about what compiling
costs (bfloat16 models, whose loop runs without XLA, keep using it: there it is also faster).
Other calls admit their rows into a pool of decoding slots (`gpt2.sampling.pool`) and run the
compiled loop until every row is done. Pools hold 1, 2, 4 or 8 slots (up to 64 for models whose
cache is small); a call with more rows than the largest pool runs them in waves, a finished row's
slot taking the next waiting row. The compiled program depends only on the model and the pool
size, so new prompts, lengths and settings never recompile. Generation may run past n_ctx: the
window slides (see `gpt2.sampling.decoder`).

Shapes: b = rows (prompts), n = tokens.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpt2.sampling import direct
from gpt2.sampling.decoder import Decoder
from gpt2.sampling.pool import RUN_ITERATIONS, Pool
from gpt2.sampling.settings import SETTING_NAMES, Row, SamplingSettings, SettingsError, row_seeds

if TYPE_CHECKING:
    from encoder import Encoder
    from gpt2.model import GPT2

# What the public functions take as `context`: int [b, n], or rows of token ids of different lengths.
Context = np.ndarray | Sequence[Sequence[int]]

POOL_SIZES = (1, 2, 4, 8, 16, 32, 64)
ALWAYS_ALLOWED_SLOTS = 8  # larger pools only while their key/value cache fits LARGE_POOL_BYTES
LARGE_POOL_BYTES = 1 << 30
CALL_SECONDS = 0.25  # target duration of one compiled call when not streaming

_pools = weakref.WeakKeyDictionary()  # model -> {(slots, jit_compile): [Pool, ...]}
_pools_lock = threading.Lock()

# Tokens (rows x steps) the uncompiled sampler makes for a model before the compiled loop takes
# over: about where the compiled loop's faster steps have paid for tracing and lowering it with a
# warm compilation cache (124M: ~4 s, against ~10 ms more per step at batch 1, ~15-20 ms at batch
# 8; bench/startup.py, BENCHMARKS.md). For models whose loop runs without XLA (bfloat16) there is
# no budget: there the uncompiled sampler is also the faster one per step. The environment
# variable GPT2_DIRECT_TOKENS overrides both (0: always compile). int8 and float16 models (weights
# widened in each product) get a quarter: there the uncompiled sampler's step is about 4x the
# compiled loop's (int8 124M: ~180 against ~45 ms).
DIRECT_TOKENS = 256
_direct_tokens = weakref.WeakKeyDictionary()  # model -> tokens made by the uncompiled sampler


def direct_tokens(model=None):
    """The uncompiled sampler's budget of tokens for `model`: GPT2_DIRECT_TOKENS if set, else
    DIRECT_TOKENS, or unlimited (None) for a model whose loop runs without XLA by default."""
    value = os.environ.get("GPT2_DIRECT_TOKENS", "").strip()
    if not value:
        if model is not None and not model.default_jit_compile:
            return None
        return DIRECT_TOKENS // 4 if getattr(model, "weight_dtype", "float32") != "float32" else DIRECT_TOKENS
    if not value.isdigit():
        raise ValueError(f"GPT2_DIRECT_TOKENS must be a whole number of tokens (0: always compile), got {value!r}")
    return int(value)


def pool_size_for(model, rows):
    """The pool a call with `rows` rows uses: the smallest that holds them, of at most 8 slots,
    or more while its key/value cache stays under 1 GiB (small models)."""
    row_bytes = Decoder(model, 1).cache_bytes()
    allowed = [size for size in POOL_SIZES if size <= ALWAYS_ALLOWED_SLOTS or size * row_bytes <= LARGE_POOL_BYTES]
    return next((size for size in allowed if size >= rows), allowed[-1])


def _pool_key(model, rows, jit_compile):
    return pool_size_for(model, rows), model.default_jit_compile if jit_compile is None else bool(jit_compile)


def _plan(model, rows, prompt_lengths, steps, jit_compile=None, logprobs=False, tokens=None):
    """How a job of `rows` rows and `steps` new tokens each runs: "compiled" (its pool is
    compiled already), "direct" (the uncompiled sampler: jit_compile left to the default, at most
    8 rows, prompts of one length, text within n_ctx, no logprobs, and the model's direct tokens
    so far + `tokens` (default rows x steps) within `direct_tokens(model)`) or "compile" (compile
    its pool first)."""
    slots, jit = _pool_key(model, rows, jit_compile)
    if _pools.get(model, {}).get((slots, jit)):
        return "compiled"
    budget = direct_tokens(model)
    if (jit_compile is None and not logprobs and rows <= ALWAYS_ALLOWED_SLOTS and len(set(prompt_lengths)) == 1
            and max(prompt_lengths) + steps <= model.hparams.n_ctx
            and (budget is None or _direct_tokens.get(model, 0) + (tokens or rows * steps) <= budget)):
        return "direct"
    return "compile"


def will_compile(model, rows, prompt_length, length, jit_compile=None, tokens=None):
    """Whether sampling `length` tokens after `rows` prompts of `prompt_length` tokens would
    compile a program first (generate.py says "compiling..." then). tokens: all the tokens of a
    run of several such jobs (default: this one's, rows x length), for the uncompiled
    sampler's budget."""
    return _plan(model, rows, [prompt_length] * rows, length, jit_compile, tokens=tokens) == "compile"


def prepare(model, rows=1, jit_compile=None):
    """Builds and compiles the pool a call with `rows` rows uses, now (before the first call):
    with the persistent compilation cache warm this is a second or two; cold, compiling. Called
    by `gpt2.load_model(..., before_weights=...)` it runs before the weights are read, and the
    memory compiling used is handed back to the system, so the peak is not weights + compiler."""
    with _Lease(model, rows, jit_compile) as pool:
        pool.run(0)
    release_free_memory()


def release_free_memory():
    """Returns memory freed by the compiler to the system (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def pools_of(model):
    """The pools built for `model` so far (tests count their traces)."""
    return [pool for pools in _pools.get(model, {}).values() for pool in pools]


class _Lease:
    """A free pool for one call (a new one when all of that size are in use, e.g. by an
    unfinished `stream` generator)."""

    def __init__(self, model, rows, jit_compile):
        key = _pool_key(model, rows, jit_compile)
        with _pools_lock:
            pools = _pools.setdefault(model, {}).setdefault(key, [])
            self.pool = next((pool for pool in pools if pool.lock.acquire(blocking=False)), None)
            if self.pool is None:
                self.pool = Pool(model, key[0], jit_compile=key[1])
                self.pool.lock.acquire()
                pools.append(self.pool)

    def __enter__(self):
        return self.pool

    def __exit__(self, *exc_info):
        self.pool.release_all()
        self.pool.lock.release()


def decode_rows(model, requests, jit_compile=None, iterations_per_run=None, draft=None):
    """Runs Rows to the end. A generator: after each loop iteration that produced tokens, yields
    [(request index, token, info)]; info is (token logprob, top ids int32 [T], top logprobs [T])
    when the request asked for logprobs, else None. Closing the generator stops the decode.

    iterations_per_run: loop iterations per compiled call (1 streams token by token); by default
    as many as fit in about CALL_SECONDS, so Ctrl-C (handled between calls) stops within that.
    Short jobs run on the uncompiled sampler (see `_plan`); a `draft` runs one row speculatively.
    """
    if draft is not None:
        from gpt2.sampling import speculative

        speculative.check(model, requests, jit_compile)
        yield from speculative.decode_rows(model, requests, draft)
        return
    steps = max(request.max_new for request in requests)
    plan = _plan(model, len(requests), [len(request.prompt) for request in requests], steps, jit_compile,
                 any(request.logprobs for request in requests))
    if plan == "direct":
        with _pools_lock:
            _direct_tokens[model] = _direct_tokens.get(model, 0) + len(requests) * steps
        yield from direct.decode_rows(model, requests)
        return
    iterations = iterations_per_run or 4  # unless fixed, adapted so one call lasts about CALL_SECONDS
    with _Lease(model, len(requests), jit_compile) as pool:
        waiting = list(range(len(requests)))
        in_slot = {}  # slot -> request index
        while waiting or in_slot:
            free = [slot for slot in pool.free_slots() if slot not in in_slot][: len(waiting)]
            if free:
                admitted, waiting = waiting[: len(free)], waiting[len(free):]
                pool.admit(free, [requests[i] for i in admitted])
                in_slot.update(zip(free, admitted))
            start = time.perf_counter()
            outputs, done, _ = pool.run(iterations)
            tokens = outputs["tokens"]
            if not iterations_per_run and tokens.shape[1] >= iterations:  # a short call (rows finished) says little
                per_iteration = (time.perf_counter() - start) / max(tokens.shape[1], 1)
                iterations = int(min(max(CALL_SECONDS / max(per_iteration, 1e-6), 1), RUN_ITERATIONS))
            for column in range(tokens.shape[1]):
                produced = []
                for slot, index in in_slot.items():
                    token = int(tokens[slot, column])
                    if token < 0:
                        continue
                    info = None
                    if requests[index].logprobs:
                        info = (float(outputs["logprobs"][slot, column]), outputs["top_ids"][slot, column],
                                outputs["top_logprobs"][slot, column])
                    produced.append((index, token, info))
                if produced:
                    yield produced
            finished = [slot for slot in in_slot if done[slot]]
            pool.release(finished)
            for slot in finished:
                del in_slot[slot]


def _per_row(value, rows, name):
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if len(values) != rows:
            raise SettingsError(name, f"{name}: expected one value per prompt ({rows}), got {len(values)}")
        return values
    return [value] * rows


def _requests(model, prompts, length, seeds, stop_token, window_keep, settings, options):
    """Rows, validated: `settings` or `options` (SamplingSettings' fields as keywords), length and
    seeds may each be one value or one per row."""
    unknown = sorted(set(options) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (sampling settings: {', '.join(SETTING_NAMES)})")
    if settings is not None and options:
        raise SettingsError("settings", f"pass settings= or the separate settings ({', '.join(sorted(options))}), "
                                        "not both")
    hparams = model.hparams
    if hasattr(prompts, "numpy"):
        prompts = prompts.numpy()
    rows = len(prompts)
    if not rows:
        raise SettingsError("context", "no prompts given")
    if settings is not None:
        per_row = _per_row(settings, rows, "settings")
    else:
        columns = {name: _per_row(value, rows, name) for name, value in options.items()}
        per_row = [SamplingSettings(**{name: column[i] for name, column in columns.items()}) for i in range(rows)]
    seeds = row_seeds(None, rows) if seeds is None else _per_row(seeds, rows, "seeds")
    lengths = _per_row(length, rows, "length")
    return [Row.checked(list(prompt), setting, np.int32(seed), n, hparams.n_vocab, hparams.n_ctx, stop_token,
                        window_keep, field=f"prompt {i}")
            for i, (prompt, setting, seed, n) in enumerate(zip(prompts, per_row, seeds, lengths))]


def sample_rows(model, prompts, length, *, seeds=None, stop_token=None, callback=None, jit_compile=None,
                settings=None, window_keep=None, draft=None, **options):
    """The sampler behind `sample_sequence`, with every setting either one value or one per row.

    prompts: list of token lists (any lengths up to n_ctx). length and the sampling settings
    (`SamplingSettings`' fields as keywords): each a value or a list with one per prompt; or
    `settings`: one SamplingSettings or a list of them. seeds: int32 per row (see `row_seeds`);
    None = fresh. Returns each row's new tokens (int32): `length`, or fewer ending with
    stop_token. callback, draft: see `sample_sequence`.
    """
    requests = _requests(model, prompts, length, seeds, stop_token, window_keep, settings, options)
    rows = [[] for _ in requests]
    if callback is not None:
        for step, tokens in enumerate(_lockstep(model, requests, jit_compile, stop_token, draft)):
            callback(step, tokens)
            for row, token, request in zip(rows, tokens, requests):
                if len(row) < request.max_new and request.stop_token not in row[-1:]:  # the row runs on
                    row.append(int(token))
    else:
        for produced in decode_rows(model, requests, jit_compile, draft=draft):
            for index, token, _ in produced:
                rows[index].append(token)
    return [np.asarray(row, np.int32) for row in rows]


def stream_rows(model, prompts, length, *, seeds=None, stop_token=None, jit_compile=None, settings=None,
                window_keep=None, draft=None, **options):
    """`stream` with the arguments of `sample_rows` (per-row settings and seeds)."""
    requests = _requests(model, prompts, length, seeds, stop_token, window_keep, settings, options)
    yield from _lockstep(model, requests, jit_compile, stop_token, draft)


def _lockstep(model, requests, jit_compile, stop_token, draft=None):
    """Each step's tokens, int32 [b]: step i holds token i of every row (rows that have stopped
    repeat stop_token, or 0 without one), yielded once every row has made token i or stopped.
    Decodes token by token; closing it stops the decode."""
    fill = 0 if stop_token is None else int(stop_token)
    rows, finished, step = [[] for _ in requests], [False] * len(requests), 0
    produced_steps = decode_rows(model, requests, jit_compile, iterations_per_run=1, draft=draft)
    try:
        for produced in produced_steps:
            for index, token, _ in produced:
                rows[index].append(token)
                request = requests[index]
                finished[index] = len(rows[index]) >= request.max_new or token == request.stop_token
            while (all(len(row) > step or finished[i] for i, row in enumerate(rows))
                   and any(len(row) > step for row in rows)):
                yield np.array([row[step] if len(row) > step else fill for row in rows], np.int32)
                step += 1
    finally:
        produced_steps.close()


def stream(model: GPT2, context: Context, length: int, *, seed: int | None = None, **options) -> Iterator[np.ndarray]:
    """Yields each step's new tokens, int32 [b], as they are made: step i holds token i of every
    row; rows that have stopped (at stop_token) repeat stop_token. Takes the arguments of
    `sample_sequence` (but callback). Stop iterating (break, or close the generator) to stop the decode.

        for tokens in gpt2.stream(model, [enc.encode("Hello")], 100, top_k=40):
            print(enc.decode(tokens[:1]), end="", flush=True)
    """
    prompts = context.numpy() if hasattr(context, "numpy") else context
    yield from stream_rows(model, prompts, length, seeds=row_seeds(seed, len(prompts)), **options)


def sample_sequence(model: GPT2, context: Context, length: int, *, seed: int | None = None,
                    stop_token: int | None = None, draft=None, **options) -> np.ndarray | list[np.ndarray]:
    """Samples `length` new tokens after each prompt, with OpenAI's sampler semantics.

    context: int [batch, context_len], or token lists of different lengths (each row gives what
    it would alone). length: any number; past n_ctx the window slides, keeping its last
    `window_keep` tokens (default n_ctx // 2, recomputed at positions 0..window_keep-1). Sampling
    settings: `gpt2.SamplingSettings`' fields as keywords (temperature 0 = greedy, top_k 0 = off,
    top_p 1 = off, penalties, logit_bias {token id: bias}), or `settings=` one SamplingSettings.
    seed: an int makes the output reproducible (each row draws from its own stream); None = fresh.
    stop_token (e.g. 50256): a row stops after it. callback(step, tokens int32 [batch]): called
    with each step's tokens (see `stream`). jit_compile: XLA; None = XLA for float32 models, not
    for bfloat16 ones (oneDNN's bfloat16 matmuls are faster on CPU; BENCHMARKS.md). draft:
    speculative decoding of one prompt within the context, `gpt2.DraftModel(smaller_model)`,
    `gpt2.PromptLookup(ngram=3)` or "prompt-lookup" (greedy output as without it, sampled output
    from the same distribution; see `gpt2.sampling.speculative`).

    Returns int32 [batch, context_len + length] when the prompts have one length (rows that
    stopped early are filled with stop_token), else a list of 1-D int32 arrays (prompt + new).
    """
    prompts = context.numpy() if hasattr(context, "numpy") else context
    prompts = [list(row) for row in prompts]
    new_tokens = sample_rows(model, prompts, length, seeds=row_seeds(seed, len(prompts)), stop_token=stop_token,
                             draft=draft, **options)
    outputs = [np.concatenate([np.asarray(p, np.int32), n]) for p, n in zip(prompts, new_tokens)]
    if len({len(p) for p in prompts}) > 1:
        return outputs
    width = max(len(row) for row in outputs)
    fill = 0 if stop_token is None else stop_token
    return np.stack([np.pad(row, (0, width - len(row)), constant_values=fill) for row in outputs])


def generate(model: GPT2, enc: Encoder, prompts: str | list[str], length: int = 64, *, seed: int | None = None,
             stop_at_eot: bool = True, **options) -> list[str]:
    """Text in, text out: returns the continuation (without the prompt) of each prompt.

    prompts: a string or a list of strings; an empty string samples unconditionally. With
    stop_at_eot, a row ends at <|endoftext|> and its text stops before it. Other keyword
    arguments (penalties, logit_bias, settings, window_keep) are those of `sample_sequence`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [enc.encode(p) if p else [enc.eot_token] for p in prompts]
    eot = enc.eot_token if stop_at_eot else None
    new_tokens = sample_rows(model, rows, length, seeds=row_seeds(seed, len(rows)), stop_token=eot, **options)
    return [enc.decode([t for t in row if t != eot] if eot is not None else row) for row in new_tokens]
