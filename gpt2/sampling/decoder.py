"""The compiled decode loop: a pool of rows ("slots"), each with its own key/value cache region,
position, window of tokens, settings, seed and stop rule.

One loop iteration does two things, each only if some row needs it:

* ingest: the first row with tokens waiting in its window (a new prompt, or the window kept after a
  slide) runs up to CHUNK of them through the model, writing their keys and values into its cache
  slots; once its window is all in the cache it holds the logits for its next token;
* decode: every row that is ready picks its next token (penalties, logit bias, temperature,
  top-k, top-p, its own random stream), appends it to its window, and feeds it through the model
  at its own position. When a window would exceed n_ctx it slides: it becomes its last
  `window_keep` tokens, which the following iterations ingest again at positions 0..keep-1.

So prompt ingestion, the slide past n_ctx and decoding of rows at different positions are one
program, compiled once per pool size: it serves every prompt length, output length and setting.
Attention reads only the filled part of the cache, in blocks of BLOCK slots (online softmax,
`gpt2.layers.blocked_attention`).

The state is a dict of tensors (see `Decoder.initial_state`); `ingest` and `decode` map state ->
state, `run` loops them (`gpt2.sampling.pool` keeps the state in variables between calls) and
`run_to_end` loops them until every row is done (the export).

Shapes: B = slots, H = n_head, D = head_dim, E = n_embd, V = n_vocab, N = n_ctx, S = CHUNK,
M = cache slots (N + S rounded up to BLOCK), W = window buffer (N + S), K = iterations recorded
per run, T = TOP_LOGPROBS.
"""

import keras
import numpy as np
import tensorflow as tf

from gpt2 import layers
from gpt2.sampling import choose

CHUNK = 128  # prompt tokens one row ingests per loop iteration (128: the cache stays N + BLOCK slots for n_ctx 1024)
SMALL_CHUNK = 32  # ... when it has at most this many waiting: a short prompt does not pay a 128-wide pass

# Per-row values that stay fixed while a row runs (set when it is admitted).
SETTING_FIELDS = {
    "temperature": tf.float32, "top_k": tf.int32, "top_p": tf.float32, "presence_penalty": tf.float32,
    "frequency_penalty": tf.float32, "repetition_penalty": tf.float32, "seed": tf.int32,
    "max_new": tf.int32, "stop_token": tf.int32, "window_keep": tf.int32, "want_logprobs": tf.bool,
}
# Per-row values the loop updates.
ROW_FIELDS = {"active": tf.bool, "done": tf.bool, "cached": tf.int32, "filled": tf.int32, "generated": tf.int32,
              "source": tf.int32}


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


class Decoder:
    """The loop's computations for one model and pool size (pure functions of the state).
    xla: whether the graph will be compiled with XLA; without it, slices and slice updates use
    TensorFlow's own kernels (XLA's ops outside XLA compile each op on demand: slow, and memory)."""

    def __init__(self, model, slots=None, xla=True):
        hp = model.hparams
        self.model = model
        self.slots = slots
        self.xla = xla
        self.n_ctx = hp.n_ctx
        self.n_vocab = hp.n_vocab
        self.n_head = hp.n_head
        self.head_dim = hp.head_dim
        self.n_embd = hp.n_embd
        self.cache_slots = _round_up(hp.n_ctx + CHUNK, layers.BLOCK)
        self.window_slots = hp.n_ctx + CHUNK
        self.cache_dtype = tf.as_dtype(model.cache_dtype)  # what the cache holds (attention widens it)
        self.compute_dtype = tf.as_dtype(model.compute_dtype)  # the matmuls'
        self._layer_function = layer_function(self._layer, xla)

    # ------------------------------------------------------------------ state

    def state_spec(self, batch=None):
        """{name: (shape, dtype)} of every state tensor (the cache as `k0`, `v0`, `k1`, ...);
        batch defaults to the decoder's slots (None: any)."""
        b, v = batch or self.slots, self.n_vocab
        spec = {name: ([b], dtype) for name, dtype in {**SETTING_FIELDS, **ROW_FIELDS}.items()}
        spec.update({
            "logit_bias": ([b, v], tf.float32), "prompt_seen": ([b, v], tf.bool), "counts": ([b, v], tf.int32),
            "logits": ([b, v], tf.float32), "window": ([b, self.window_slots], tf.int32),
        })
        cache_shape = [b, self.n_head, self.cache_slots, self.head_dim]
        for layer in range(len(self.model.blocks)):
            spec[f"k{layer}"] = (cache_shape, self.cache_dtype)
            spec[f"v{layer}"] = (cache_shape, self.cache_dtype)
        return spec

    def cache_bytes(self):
        """Bytes of key/value cache the pool holds."""
        shape, dtype = self.state_spec()["k0"]
        return 2 * len(self.model.blocks) * int(np.prod(shape)) * dtype.size

    def initial_state(self, batch=None):
        """An empty pool (no active rows), as tensors; batch: an int or int32 scalar tensor."""
        batch = self.slots if batch is None else batch
        return {name: tf.zeros([batch, *shape[1:]], dtype) for name, (shape, dtype) in self.state_spec(1).items()}

    def output_spec(self, iterations, batch=None):
        """{name: (shape, dtype)} of what `run` records per iteration: each row's new token (-1
        if none that iteration), its log-probability and the top alternatives."""
        b, t = batch or self.slots, choose.TOP_LOGPROBS
        return {
            "tokens": ([b, iterations], tf.int32), "logprobs": ([b, iterations], tf.float32),
            "top_ids": ([b, iterations, t], tf.int32), "top_logprobs": ([b, iterations, t], tf.float32),
        }

    def start_state(self, tokens, lengths, settings, seed, max_new, stop_token, window_keep, want_logprobs):
        """A state with every row admitted at once, built in the graph (for exported functions;
        `gpt2.sampling.pool.Pool.admit` does the same from NumPy between runs).

        tokens: int32 [b, P] right-padded prompts (P <= n_ctx); lengths: int32 [b] (>= 1);
        settings: {name: per-row tensor} as `gpt2.sampling.settings.pack_rows` gives them
        (temperature, top_k, top_p, the penalties [b], logit_bias [b, V]); seed, max_new,
        stop_token (-1 = none), window_keep: int32 [b]; want_logprobs: bool [b].
        """
        batch = tf.shape(tokens)[0]
        state = self.initial_state(batch)
        valid = tf.range(tf.shape(tokens)[1])[None, :] < lengths[:, None]
        tokens = tf.where(valid, tokens, 0)
        state["window"] = tf.pad(tokens, [[0, 0], [0, self.window_slots - tf.shape(tokens)[1]]])
        rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(tokens))
        seen = tf.tensor_scatter_nd_max(tf.zeros([batch, self.n_vocab], tf.int32),
                                        tf.reshape(tf.stack([rows, tokens], -1), [-1, 2]),
                                        tf.reshape(tf.cast(valid, tf.int32), [-1]))
        state.update({name: tf.cast(value, state[name].dtype) for name, value in settings.items()})
        state.update(prompt_seen=seen > 0, seed=seed, max_new=max_new, stop_token=stop_token,
                     window_keep=window_keep, want_logprobs=want_logprobs, active=tf.ones([batch], tf.bool),
                     filled=lengths, source=tf.fill([batch], -1))
        return state

    # ------------------------------------------------------------------ model pieces
    #
    # The forward passes run inside tf.cond (only when some row needs them) and return just this
    # call's keys and values; the caller writes those into the cache outside the cond. A cond
    # that returned the cache made XLA copy all of it every iteration, and a one-trip while loop
    # (which XLA updates in place) made the program twice as slow to lower, since every loop
    # carries all the weights.

    def _layer(self, x, weights, keys, values, first_row, cached, num_blocks, batch):
        """The model's block step over this layer's cache keys, values (traced once, called per block)."""
        attention = layers.blocked_attention(keys, values, first_row, cached, num_blocks, self.xla)
        return self.model.block_step(x, weights, batch, self.compute_dtype, attention)

    def _forward(self, x, state, batch, first_row, cached):
        """x float32 [batch * s, E] at the positions after each row's cached [batch] slots.
        Returns (hidden states after the model's `final` (ln_f) [batch * s, E], [(keys, values) per layer, each
        [batch, H, s, D]]) without writing the cache."""
        num_blocks = (tf.reduce_max(cached) + layers.BLOCK - 1) // layers.BLOCK
        new = []
        for layer, block in enumerate(self.model.blocks):
            x, k, v = self._layer_function(x, block.inference_weights(), state[f"k{layer}"], state[f"v{layer}"],
                                           first_row, cached, num_blocks, batch)
            new.append((k, v))
        return self.model.final(x), new

    def _write(self, state, new, write):
        state = dict(state)
        for layer, (k, v) in enumerate(new):
            state[f"k{layer}"] = write(state[f"k{layer}"], k)
            state[f"v{layer}"] = write(state[f"v{layer}"], v)
        return state

    def _zeros_like_new(self, batch, s):
        shape = [batch, self.n_head, s, self.head_dim]
        return [(tf.zeros(shape, self.cache_dtype), tf.zeros(shape, self.cache_dtype)) for _ in self.model.blocks]

    # ------------------------------------------------------------------ ingest

    def ingest(self, state):
        """Runs up to CHUNK waiting tokens of the first row that has some into its cache; a row with
        at most SMALL_CHUNK waiting (a short prompt, the usual case) in a SMALL_CHUNK-wide pass."""
        pending = self.pending(state)
        any_pending = tf.reduce_any(pending)
        row = tf.argmax(tf.cast(pending, tf.int32), output_type=tf.int32)
        start = tf.gather(state["cached"], row)
        waiting = tf.gather(state["filled"], row) - start
        count = tf.minimum(CHUNK, waiting)
        few = waiting <= SMALL_CHUNK

        def compute(size):
            tokens = layers.dynamic_slice(state["window"], [row, start], [1, size], self.xla)[0]
            x = self.model.embed(tokens, tf.minimum(start + tf.range(size), self.n_ctx - 1))
            h, new = self._forward(x, state, 1, row, start[None])
            new = [tuple(tf.pad(t, [[0, 0], [0, 0], [0, CHUNK - size], [0, 0]]) for t in kv) for kv in new]
            return self.model.logits(tf.gather(h, [tf.maximum(count, 1) - 1])), new

        logits, new = tf.cond(any_pending, lambda: tf.cond(few, lambda: compute(SMALL_CHUNK), lambda: compute(CHUNK)),
                              lambda: (tf.zeros([1, self.n_vocab]), self._zeros_like_new(1, CHUNK)))
        # The first SMALL_CHUNK slots are written every iteration (to scratch slots past n_ctx when no row
        # is waiting), the rest only after a CHUNK-wide pass (a one-trip loop, in place). Writing all
        # CHUNK every decode step cost batch 1 about 1 ms a step, and the conditional write of all of
        # them 80-100 ms per prompt at batch 8 (124M).
        at = tf.where(any_pending, start, self.cache_slots - SMALL_CHUNK)
        state = self._write(state, [[t[:, :, :SMALL_CHUNK] for t in kv] for kv in new],
                            lambda cache, update: _update_slice(cache, update, [row, 0, at, 0], self.xla))
        state = _maybe(any_pending & ~few, lambda s: self._write(
            s, [[t[:, :, SMALL_CHUNK:] for t in kv] for kv in new],
            lambda cache, update: _update_slice(cache, update, [row, 0, start + SMALL_CHUNK, 0], self.xla)), state)
        count = tf.where(any_pending, count, 0)
        state["logits"] = tf.where(any_pending & tf.equal(tf.range(_batch(state)), row)[:, None], logits,
                                   state["logits"])
        state["cached"] = tf.tensor_scatter_nd_add(state["cached"], [[row]], [count])
        complete = any_pending & tf.equal(start + count, tf.gather(state["filled"], row))
        return _maybe(complete & tf.reduce_any(tf.equal(state["source"], row)), lambda s: self._share(s, row), state)

    def pending(self, state):
        """bool [B]: rows with window tokens to ingest (rows waiting for a source row excluded)."""
        return state["active"] & ~state["done"] & (state["cached"] < state["filled"]) & (state["source"] < 0)

    def _share(self, state, row):
        """Rows whose `source` is `row` (admitted with the same prompt) take its cache and logits
        now that it has ingested the prompt, instead of ingesting it again."""
        state = dict(state)
        dependents = tf.equal(state["source"], row)
        layers = [name for name in state if name[0] in "kv" and name[1:].isdigit()]

        def copy(slot, caches):
            def write(caches):
                return {name: _update_slice(cache, tf.gather(cache, [row]), [slot, 0, 0, 0], self.xla)
                        for name, cache in caches.items()}

            return slot + 1, _maybe(dependents[slot], write, caches)

        _, caches = tf.while_loop(lambda slot, _: slot < _batch(state), copy,
                                  (tf.constant(0), {name: state[name] for name in layers}))
        state.update(caches)
        state["logits"] = tf.where(dependents[:, None], tf.gather(state["logits"], [row]), state["logits"])
        state["cached"] = tf.where(dependents, tf.gather(state["cached"], row), state["cached"])
        state["source"] = tf.where(dependents, -1, state["source"])
        return state

    # ------------------------------------------------------------------ decode

    def decode(self, state):
        """One token for every ready row. Returns (state, tokens [B] (-1 for rows not ready),
        token logprobs [B], top ids [B, T], top logprobs [B, T])."""
        state = dict(state)
        batch = _batch(state)
        rows = tf.range(batch)
        ready = state["active"] & ~state["done"] & tf.equal(state["cached"], state["filled"])
        logits, tokens = choose.next_tokens(state["logits"], state, ready)
        top = choose.TOP_LOGPROBS
        logprob, top_ids, top_logprobs = tf.cond(
            tf.reduce_any(ready & state["want_logprobs"]),
            lambda: choose.logprobs_of(logits, tokens),
            lambda: (tf.zeros([batch]), tf.zeros([batch, top], tf.int32), tf.zeros([batch, top])),
        )
        index = tf.stack([rows, tokens], axis=1)
        state["counts"] = tf.tensor_scatter_nd_add(state["counts"], index, tf.cast(ready, tf.int32))
        state["generated"] += tf.cast(ready, tf.int32)
        finished = ready & (tf.equal(tokens, state["stop_token"]) | (state["generated"] >= state["max_new"]))
        state["done"] |= finished
        # Append to the window (rows not ready write into the last slot, which is never read).
        write_at = tf.where(ready, state["filled"], self.window_slots - 1)
        state["window"] = tf.tensor_scatter_nd_update(state["window"], tf.stack([rows, write_at], 1), tokens)
        state["filled"] += tf.cast(ready, tf.int32)
        slide = ready & ~finished & (state["filled"] > self.n_ctx)
        state = self._feed(state, tokens, ready & ~finished & ~slide)
        state = self._slide(state, slide)
        emitted = tf.where(ready, tokens, -1)
        return state, emitted, logprob, top_ids, top_logprobs

    def _feed(self, state, tokens, feed):
        """Feeds tokens [B] at each row's position (its `cached` count); rows in `feed` take the
        new logits and advance. Every row writes its keys and values at its position (static
        shapes); for rows not fed that slot is never attended before being rewritten. When one
        row alone is fed, only it runs through the model."""
        state = dict(state)
        batch = _batch(state)
        position = state["cached"]

        def compute():
            x = self.model.embed(tokens, tf.minimum(position, self.n_ctx - 1))
            h, new = self._forward(x, state, batch, 0, tf.where(feed, position, 0))
            return self.model.logits(h), new

        def compute_one():
            """Only the one row fed: a pool of 8 with one request costs about a pool of 1."""
            row = tf.argmax(tf.cast(feed, tf.int32), output_type=tf.int32)
            at = tf.gather(position, [row])
            x = self.model.embed(tf.gather(tokens, [row]), tf.minimum(at, self.n_ctx - 1))
            h, new = self._forward(x, state, 1, row, at)
            into_row = lambda value: tf.tensor_scatter_nd_update(  # noqa: E731
                tf.zeros([batch, *value.shape[1:]], value.dtype), [[row]], value)
            return into_row(self.model.logits(h)), [(into_row(k), into_row(v)) for k, v in new]

        def nothing():
            return tf.zeros([batch, self.n_vocab]), self._zeros_like_new(batch, 1)

        fed = tf.reduce_sum(tf.cast(feed, tf.int32))
        if isinstance(batch, int) and batch > 1:
            logits, new = tf.cond(tf.equal(fed, 1), compute_one, lambda: tf.cond(fed > 0, compute, nothing))
        else:
            logits, new = tf.cond(fed > 0, compute, nothing)
        index = tf.stack([
            tf.repeat(tf.range(batch), self.n_head),
            tf.tile(tf.range(self.n_head), [batch]),
            tf.repeat(tf.minimum(position, self.cache_slots - 1), self.n_head),
        ], axis=1)
        state = self._write(state, new, lambda cache, update: tf.tensor_scatter_nd_update(
            cache, index, tf.reshape(update, [-1, self.head_dim])))
        state["logits"] = tf.where(feed[:, None], logits, state["logits"])
        state["cached"] += tf.cast(feed, tf.int32)
        return state

    def _slide(self, state, slide):
        """Rows in `slide` keep their last window_keep tokens, to be ingested at positions 0..keep-1."""
        state = dict(state)
        keep = state["window_keep"]
        first = tf.where(slide, state["filled"] - keep, 0)
        columns = tf.minimum(first[:, None] + tf.range(self.window_slots)[None], self.window_slots - 1)
        shifted = tf.gather(state["window"], columns, axis=1, batch_dims=1)
        state["window"] = tf.where(slide[:, None], shifted, state["window"])
        state["cached"] = tf.where(slide, 0, state["cached"])
        state["filled"] = tf.where(slide, keep, state["filled"])
        return state

    # ------------------------------------------------------------------ loop

    def run(self, state, max_iterations, iterations):
        """Ingests and decodes while some row is unfinished, at most max_iterations (int32 scalar,
        <= iterations, a Python int sizing the outputs). Returns (state, outputs, count run)."""
        batch = _batch(state)
        outputs = {name: tf.zeros([batch, *shape[1:]], dtype)
                   for name, (shape, dtype) in self.output_spec(iterations, 1).items()}
        outputs["tokens"] -= 1

        def busy(i, state, outputs):
            return (i < max_iterations) & tf.reduce_any(state["active"] & ~state["done"])

        def body(i, state, outputs):
            state = self.ingest(state)
            state, tokens, logprob, top_ids, top_logprobs = self.decode(state)
            new = {"tokens": tokens, "logprobs": logprob, "top_ids": top_ids, "top_logprobs": top_logprobs}
            outputs = {name: _update_slice(outputs[name], value[:, None], [0, i] + [0] * (value.shape.rank - 1),
                                           self.xla)
                       for name, value in new.items()}
            return i + 1, state, outputs

        count, state, outputs = tf.while_loop(busy, body, (tf.constant(0), state, outputs),
                                              maximum_iterations=iterations)
        return state, outputs, count

    def run_to_end(self, state, tokens):
        """Ingests and decodes until every active row is done (or an iteration did nothing: a bug the
        caller checks). tokens: int32 [B, n >= max_new] of padding; returns (state, tokens with
        each row's new tokens from column 0)."""
        rows = tf.range(_batch(state))

        def busy(moved, state, tokens):
            return moved & tf.reduce_any(state["active"] & ~state["done"])

        def body(moved, before, tokens):
            state, new, *_ = self.decode(self.ingest(before))
            at = tf.stack([rows, tf.minimum(before["generated"], tokens.shape[1] - 1)], 1)
            tokens = tf.tensor_scatter_nd_update(tokens, at, tf.where(new >= 0, new, tf.gather_nd(tokens, at)))
            moved = tf.reduce_any(tf.not_equal(state["generated"], before["generated"])
                                  | tf.not_equal(state["cached"], before["cached"]))
            return moved, state, tokens

        _, state, tokens = tf.while_loop(busy, body, (tf.constant(True), state, tokens))
        return state, tokens


def _batch(state):
    """Rows in the state: a Python int when the shape is static (XLA), else a tensor."""
    return state["active"].shape[0] or tf.shape(state["active"])[0]


def _maybe(condition, function, state):
    """function(state) if condition (a bool scalar tensor) else state, for a function that
    rewrites part of the cache: a while loop of at most one trip rather than tf.cond, since XLA
    updates a loop's state in place but copied all of a cache that a conditional passed through."""
    _, state = tf.while_loop(lambda go, _: go, lambda go, state: (tf.constant(False), function(state)),
                             (condition, state), maximum_iterations=1)
    return state


def layer_function(layer, xla):
    """`layer` as the tf.function every block of a program calls. Without XLA it is kept out of
    line (not inlined): TensorFlow holds kernels for every op of an instantiated graph, so a
    program then holds one layer's, not one per block (124M bfloat16, the loop: 73 MiB less at
    batch 1, 248 MiB at batch 8; the uncompiled sampler: 11-15 MiB). Under XLA the attribute is
    left off: compiled programs, and the compilation cache's keys, stay as they were."""
    return tf.function(layer, autograph=False, experimental_attributes=None if xla else {"_noinline": True})


def _update_slice(tensor, update, begin, xla=True):
    """tensor with `update` written at `begin`: a dynamic-update-slice (in place) under XLA,
    else TensorFlow's strided-slice update."""
    if xla:
        return keras.ops.slice_update(tensor, begin, update)
    begin = tf.stack(begin)
    return tf.raw_ops.TensorStridedSliceUpdate(input=tensor, begin=begin, end=begin + tf.shape(update),
                                               strides=tf.ones_like(begin), value=update)
