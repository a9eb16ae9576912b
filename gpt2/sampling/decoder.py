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
Attention reads only the filled part of the cache, in blocks of BLOCK slots (online softmax).

The state is a dict of tensors (see `Decoder.initial_state`); `iterate` maps state -> state, and
`run` loops it. `gpt2.sampling.pool` keeps the state in variables between calls.

Shapes: B = slots, H = n_head, D = head_dim, E = n_embd, V = n_vocab, N = n_ctx, S = CHUNK,
M = cache slots (N + S rounded up to BLOCK), W = window buffer (N + S), K = iterations recorded
per run, T = TOP_LOGPROBS.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from gpt2.sampling import choose, processors

CHUNK = 32  # prompt tokens one row ingests per loop iteration
BLOCK = 128  # cache slots attended per step of the attention loop

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
    """The loop's computations for one model and pool size (pure functions of the state)."""

    def __init__(self, model, slots):
        hp = model.hparams
        self.model = model
        self.slots = slots
        self.n_ctx = hp.n_ctx
        self.n_vocab = hp.n_vocab
        self.n_head = hp.n_head
        self.head_dim = hp.head_dim
        self.n_embd = hp.n_embd
        self.cache_slots = _round_up(hp.n_ctx + CHUNK, BLOCK)
        self.window_slots = hp.n_ctx + CHUNK
        self.cache_dtype = tf.as_dtype(model.compute_dtype)

    # ------------------------------------------------------------------ state

    def state_spec(self):
        """{name: (shape, dtype)} of every state tensor (the cache as `k0`, `v0`, `k1`, ...)."""
        b, v = self.slots, self.n_vocab
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

    def initial_state(self):
        """An empty pool (no active rows), as tensors."""
        return {name: tf.zeros(shape, dtype) for name, (shape, dtype) in self.state_spec().items()}

    def output_spec(self, iterations):
        """{name: (shape, dtype)} of what `run` records per iteration: each row's new token (-1
        if none that iteration), its log-probability and the top alternatives."""
        b, t = self.slots, choose.TOP_LOGPROBS
        return {
            "tokens": ([b, iterations], tf.int32), "logprobs": ([b, iterations], tf.float32),
            "top_ids": ([b, iterations, t], tf.int32), "top_logprobs": ([b, iterations, t], tf.float32),
        }

    # ------------------------------------------------------------------ model pieces

    def _attention(self, q, state, layer, first_row, limit, num_blocks):
        """Blocked attention of queries q [b, H, s, D] (cache rows first_row..first_row+b-1) over
        the cache of `layer`; query (r, i) sees slots < limit[r, i] (int32 [b, s]).
        num_blocks (int32 scalar) blocks of BLOCK slots are visited. Returns [b, H, s, D]."""
        keys, values = state[f"k{layer}"], state[f"v{layer}"]
        b, h, s, d = q.shape
        scale = 1.0 / math.sqrt(d)

        def body(j, best, total, acc):
            begin = [first_row, 0, j * BLOCK, 0]
            k = tf.slice(keys, begin, [b, h, BLOCK, d])
            v = tf.slice(values, begin, [b, h, BLOCK, d])
            scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) * scale
            visible = (j * BLOCK + tf.range(BLOCK))[None, None, None, :] < limit[:, None, :, None]
            scores = tf.where(visible, scores, processors.NEG_INF)
            new_best = tf.maximum(best, tf.reduce_max(scores, axis=-1))
            weights = tf.exp(scores - new_best[..., None])
            rescale = tf.exp(best - new_best)
            total = total * rescale + tf.reduce_sum(weights, axis=-1)
            mixed = tf.matmul(tf.cast(weights, v.dtype), v)
            acc = acc * rescale[..., None] + tf.cast(mixed, tf.float32)
            return j + 1, new_best, total, acc

        start = (
            tf.constant(0),
            tf.fill([b, h, s], tf.constant(-1e30, tf.float32)),
            tf.zeros([b, h, s], tf.float32),
            tf.zeros([b, h, s, d], tf.float32),
        )
        _, _, total, acc = tf.while_loop(lambda j, *_: j < num_blocks, body, start,
                                         maximum_iterations=self.cache_slots // BLOCK)
        return tf.cast(acc / total[..., None], self.cache_dtype)

    def _blocks(self, x, state, batch, write, first_row, limit, num_blocks):
        """Runs x float32 [batch * s, E] through every block; write(layer_cache, new) stores this
        call's keys/values ([batch, H, s, D]) into the cache. Returns (x after ln_f, state)."""
        for layer, block in enumerate(self.model.blocks):
            q, k, v = block.attn.qkv(block.ln_1.call(x), batch)
            state[f"k{layer}"] = write(state[f"k{layer}"], k)
            state[f"v{layer}"] = write(state[f"v{layer}"], v)
            a = self._attention(q, state, layer, first_row, limit, num_blocks)
            x = x + block.attn.project(a)
            x = x + block.mlp.call(block.ln_2.call(x))
        return self.model.ln_f.call(x), state

    # ------------------------------------------------------------------ ingest

    def ingest(self, state):
        """Runs up to CHUNK waiting tokens of the first row that has some into its cache."""
        state = dict(state)
        pending = self.pending(state)
        row = tf.argmax(tf.cast(pending, tf.int32), output_type=tf.int32)
        start = state["cached"][row]
        count = tf.minimum(CHUNK, state["filled"][row] - start)
        tokens = tf.slice(state["window"], [row, start], [1, CHUNK])[0]
        offsets = tf.range(CHUNK)
        x = self.model.embed(tokens, tf.minimum(start + offsets, self.n_ctx - 1))

        def write(cache, new):
            return _update_slice(cache, new, [row, 0, start, 0])

        limit = (start + offsets + 1)[None]
        num_blocks = (start + CHUNK + BLOCK - 1) // BLOCK
        h, state = self._blocks(x, state, 1, write, row, limit, num_blocks)
        logits = self.model.logits(h[count - 1][None])
        state["logits"] = tf.tensor_scatter_nd_update(state["logits"], [[row]], logits)
        state["cached"] = tf.tensor_scatter_nd_add(state["cached"], [[row]], [count])
        complete = tf.equal(start + count, state["filled"][row])
        return _maybe(complete & tf.reduce_any(tf.equal(state["source"], row)), lambda s: self._share(s, row), state)

    def pending(self, state):
        """bool [B]: rows with window tokens to ingest (rows waiting for a source row excluded)."""
        return state["active"] & (state["cached"] < state["filled"]) & (state["source"] < 0)

    def _share(self, state, row):
        """Rows whose `source` is `row` (admitted with the same prompt) take its cache and logits
        now that it has ingested the prompt, instead of ingesting it again."""
        state = dict(state)
        dependents = tf.equal(state["source"], row)
        layers = [name for name in state if name[0] in "kv" and name[1:].isdigit()]

        def copy(slot, caches):
            def write(caches):
                return {name: _update_slice(cache, tf.gather(cache, [row]), [slot, 0, 0, 0])
                        for name, cache in caches.items()}

            return slot + 1, _maybe(dependents[slot], write, caches)

        _, caches = tf.while_loop(lambda slot, _: slot < self.slots, copy,
                                  (tf.constant(0), {name: state[name] for name in layers}))
        state.update(caches)
        state["logits"] = tf.where(dependents[:, None], state["logits"][row][None], state["logits"])
        state["cached"] = tf.where(dependents, state["cached"][row], state["cached"])
        state["source"] = tf.where(dependents, -1, state["source"])
        return state

    # ------------------------------------------------------------------ decode

    def decode(self, state):
        """One token for every ready row. Returns (state, tokens [B] (-1 for rows not ready),
        token logprobs [B], top ids [B, T], top logprobs [B, T])."""
        state = dict(state)
        rows = tf.range(self.slots)
        ready = state["active"] & ~state["done"] & tf.equal(state["cached"], state["filled"])
        counts = state["counts"]
        penalised = (tf.not_equal(state["repetition_penalty"], 1.0) | tf.not_equal(state["presence_penalty"], 0.0)
                     | tf.not_equal(state["frequency_penalty"], 0.0))
        logits = tf.cond(
            tf.reduce_any(ready & penalised),
            lambda: processors.apply_penalties(
                state["logits"], counts, state["prompt_seen"] | (counts > 0), state["presence_penalty"],
                state["frequency_penalty"], state["repetition_penalty"], state["logit_bias"]),
            lambda: state["logits"] + state["logit_bias"],
        )
        sampling = state["temperature"] > 0.0
        uniform = tf.cond(tf.reduce_any(ready & sampling),
                          lambda: choose.row_uniforms(state["seed"], state["generated"]),
                          lambda: tf.zeros([self.slots], tf.float32))
        tokens = choose.choose_tokens(logits, state["temperature"], state["top_k"], state["top_p"], uniform)
        top = choose.TOP_LOGPROBS
        logprob, top_ids, top_logprobs = tf.cond(
            tf.reduce_any(ready & state["want_logprobs"]),
            lambda: choose.logprobs_of(logits, tokens),
            lambda: (tf.zeros([self.slots]), tf.zeros([self.slots, top], tf.int32), tf.zeros([self.slots, top])),
        )
        index = tf.stack([rows, tokens], axis=1)
        state["counts"] = tf.tensor_scatter_nd_add(counts, index, tf.cast(ready, tf.int32))
        state["generated"] += tf.cast(ready, tf.int32)
        finished = ready & (tf.equal(tokens, state["stop_token"]) | (state["generated"] >= state["max_new"]))
        state["done"] |= finished
        # Append to the window (rows not ready write into the last slot, which is never read).
        write_at = tf.where(ready, state["filled"], self.window_slots - 1)
        state["window"] = tf.tensor_scatter_nd_update(state["window"], tf.stack([rows, write_at], 1), tokens)
        state["filled"] += tf.cast(ready, tf.int32)
        slide = ready & ~finished & (state["filled"] > self.n_ctx)
        feed = ready & ~finished & ~slide
        state = _maybe(tf.reduce_any(feed), lambda s: self._feed(s, tokens, feed), state)
        state = _maybe(tf.reduce_any(slide), lambda s: self._slide(s, slide), state)
        emitted = tf.where(ready, tokens, -1)
        return state, emitted, logprob, top_ids, top_logprobs

    def _feed(self, state, tokens, feed):
        """Feeds tokens [B] at each row's position (its `cached` count); rows in `feed` take the
        new logits and advance. Other rows compute too (static shapes) but keep their state; what
        they write lands in a cache slot that is never attended before being rewritten."""
        state = dict(state)
        position = state["cached"]
        x = self.model.embed(tokens, tf.minimum(position, self.n_ctx - 1))
        index = tf.stack([
            tf.repeat(tf.range(self.slots), self.n_head),
            tf.tile(tf.range(self.n_head), [self.slots]),
            tf.repeat(position, self.n_head),
        ], axis=1)

        def write(cache, new):
            return tf.tensor_scatter_nd_update(cache, index, tf.reshape(new, [-1, self.head_dim]))

        limit = (position + 1)[:, None]
        longest = tf.reduce_max(tf.where(feed, position + 1, 1))
        num_blocks = (longest + BLOCK - 1) // BLOCK
        h, state = self._blocks(x, state, self.slots, write, 0, limit, num_blocks)
        state["logits"] = tf.where(feed[:, None], self.model.logits(h), state["logits"])
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
        """Loops `iterate` while some row is unfinished, at most max_iterations (int32 scalar,
        <= iterations, a Python int sizing the outputs). Returns (state, outputs, count run)."""
        outputs = {name: tf.zeros(shape, dtype) for name, (shape, dtype) in self.output_spec(iterations).items()}
        outputs["tokens"] -= 1

        def busy(i, state, outputs):
            return (i < max_iterations) & tf.reduce_any(state["active"] & ~state["done"])

        def body(i, state, outputs):
            # "active" is never changed by the loop; passed through unchanged, XLA's compile-time
            # constant analysis follows it from the row index `ingest` slices with back to the
            # variable, and keys the compiled program on its value: a new compile for every new
            # set of active slots. An operation on it (a no-op in value) stops that analysis.
            state = {**state, "active": state["active"] | tf.less(i, 0)}
            pending = self.pending(state)
            state = _maybe(tf.reduce_any(pending), self.ingest, state)
            ready = state["active"] & ~state["done"] & tf.equal(state["cached"], state["filled"])

            def decode(both):
                state, outputs = both
                new_state, tokens, logprob, top_ids, top_logprobs = self.decode(state)
                new_outputs = {
                    "tokens": _update_slice(outputs["tokens"], tokens[:, None], [0, i]),
                    "logprobs": _update_slice(outputs["logprobs"], logprob[:, None], [0, i]),
                    "top_ids": _update_slice(outputs["top_ids"], top_ids[:, None], [0, i, 0]),
                    "top_logprobs": _update_slice(outputs["top_logprobs"], top_logprobs[:, None], [0, i, 0]),
                }
                return new_state, new_outputs

            state, outputs = _maybe(tf.reduce_any(ready), decode, (state, outputs))
            return i + 1, state, outputs

        count, state, outputs = tf.while_loop(busy, body, (tf.constant(0), state, outputs),
                                              maximum_iterations=iterations)
        return state, outputs, count


def _maybe(condition, function, state):
    """function(state) if condition (a bool scalar tensor) else state.

    A while loop of at most one trip rather than tf.cond: XLA updates a loop's state in place,
    while a conditional that passes the key/value cache through copied all of it every step."""
    _, state = tf.while_loop(lambda go, _: go, lambda go, state: (tf.constant(False), function(state)),
                             (condition, state), maximum_iterations=1)
    return state


def _update_slice(tensor, update, begin):
    """tensor with `update` written at `begin` (a dynamic-update-slice: in place under XLA)."""
    return keras.ops.slice_update(tensor, begin, update)
