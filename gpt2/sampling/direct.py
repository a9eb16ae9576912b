"""The uncompiled sampler: one step of the model and the token choice as a plain TensorFlow graph
(no XLA), run once per token from Python, with a key/value cache sized to the job.

Why it exists: the compiled loop (`decoder`, `pool`) is the fastest per token, but every process
pays about 4 s (124M) to trace and lower it before the persistent compilation cache can even be
asked, and about 10 s more to compile it the first time. This graph is traced in about half a
second and its steps are somewhat slower, so a short job prints its text seconds sooner.
`gpt2.sampling.api` uses it for a model until its tokens add up to what compiling would have cost
(`api.direct_tokens(model)`), then compiles; for bfloat16 models, whose loop runs without XLA,
it is also the faster per step, so they keep using it. It serves up to 8 rows whose prompts have
one length and whose text fits in n_ctx (no sliding window): what generate.py and most library
calls ask for.

It shares the compiled loop's math: the block as `layers.block` (attention here is one masked
softmax over the job's cache) and the choice as `choose.next_tokens` with the same per-row
streams, so both give the same tokens. Every shape is fixed for a job (the cache holds prompt +
new tokens rounded up to BLOCK slots), so memory stays flat while it runs.

Shapes: b = rows, s = new positions, H = n_head, M = cache slots of the job, D = head_dim,
V = n_vocab.
"""

import threading
import weakref

import numpy as np
import tensorflow as tf

from gpt2 import layers
from gpt2.sampling import choose
from gpt2.sampling.decoder import BLOCK, Decoder, _round_up, _update_slice
from gpt2.sampling.pool import sampling_rows

_samplers = weakref.WeakKeyDictionary()  # model -> DirectSampler
_samplers_lock = threading.Lock()


class DirectSampler:
    """`step(tokens, position, caches, rows)` for one model: traced once (any b, s and M), never
    compiled."""

    def __init__(self, model):
        hp = model.hparams
        self.model = model
        self.cache_dtype = tf.as_dtype(model.compute_dtype)
        self.cache_names = [f"{kind}{layer}" for layer in range(hp.n_layer) for kind in "kv"]
        cache = tf.TensorSpec([None, hp.n_head, None, hp.head_dim], self.cache_dtype)
        spec = Decoder(model).state_spec()  # shapes with any number of rows
        rows = {name: tf.TensorSpec(*spec[name]) for name in choose.NEXT_TOKEN_FIELDS}
        signature = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32),
                     {name: cache for name in self.cache_names}, rows]
        self.step = tf.function(self._step, input_signature=signature, autograph=False)

    def empty_caches(self, rows, slots):
        """Zeroed caches for `rows` rows of at least `slots` positions."""
        hp = self.model.hparams
        shape = [rows, hp.n_head, _round_up(max(slots, 1), BLOCK), hp.head_dim]
        return {name: tf.zeros(shape, self.cache_dtype) for name in self.cache_names}

    def _step(self, tokens, position, caches, rows):
        """tokens int32 [b, s] at positions position.. (every row); caches {k0, v0, ...}
        [b, H, M, D] holding the first `position` of them; rows: choose.NEXT_TOKEN_FIELDS.
        Returns (next tokens int32 [b], the caches with this call's keys and values written,
        counts with the next tokens added)."""
        model, dtype = self.model, self.cache_dtype
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        x = tf.reshape(model.embed(tokens, position + tf.range(length)[None]), [-1, model.hparams.n_embd])
        # Query i (at position + i) sees cache slots 0 .. position + i.
        slots = tf.shape(caches["k0"])[2]
        visible = (tf.range(slots)[None, :] <= position + tf.range(length)[:, None])[None, None]
        caches = dict(caches)
        for layer, block in enumerate(model.blocks):
            names = f"k{layer}", f"v{layer}"

            def attention(q, k, v, names=names):
                for name, new in zip(names, (k, v)):
                    caches[name] = _update_slice(caches[name], tf.cast(new, dtype), [0, 0, position, 0], xla=False)
                return layers.attend(q, caches[names[0]], caches[names[1]], visible)

            x, _, _ = layers.block(x, block.inference_weights(), batch, model.hparams.n_head, dtype, attention)
        last = tf.reshape(model.ln_f.call(x), [batch, length, model.hparams.n_embd])[:, -1]
        _, chosen = choose.next_tokens(model.logits(last), rows, tf.ones_like(rows["seed"], tf.bool))
        counts = tf.tensor_scatter_nd_add(rows["counts"], tf.stack([tf.range(batch), chosen], 1),
                                          tf.ones_like(chosen))
        return chosen, caches, counts


def prepare(model):
    """Traces the model's step now (e.g. in a thread while the weights are read)."""
    sampler_for(model).step.get_concrete_function()


def sampler_for(model):
    """The model's DirectSampler (made, and traced, on first use)."""
    with _samplers_lock:
        sampler = _samplers.get(model)
        if sampler is None:
            sampler = _samplers[model] = DirectSampler(model)
        return sampler


def decode_rows(model, requests):
    """Runs `gpt2.sampling.pool.RowRequest`s (prompts of one length; prompt + max_new <= n_ctx;
    no logprobs) to the end, as `api.decode_rows` does: a generator yielding, per step, a list
    of (request index, token, None) for the rows still running."""
    sampler = sampler_for(model)
    count = len(requests)
    rows = {name: tf.constant(value) for name, value in sampling_rows(requests, model.hparams.n_vocab).items()}
    tokens = np.array([request.prompt for request in requests], np.int32)
    steps = max(request.max_new for request in requests)
    caches = sampler.empty_caches(count, tokens.shape[1] + steps - 1)
    position = 0
    made = [0] * count
    running = set(range(count))
    for step in range(steps):
        rows["generated"] = tf.fill([count], step)
        chosen, caches, rows["counts"] = sampler.step(tokens, tf.constant(position, tf.int32), caches, rows)
        position += tokens.shape[1]
        tokens = chosen.numpy()[:, None]
        produced = []
        for i in sorted(running):
            token = int(tokens[i, 0])
            produced.append((i, token, None))
            made[i] += 1
            if made[i] >= requests[i].max_new or token == requests[i].stop_token:
                running.discard(i)
        yield produced
        if not running:
            return
