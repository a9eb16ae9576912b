"""The uncompiled sampler: one step of the model and the token choice as a plain TensorFlow graph
(no XLA), run once per token from Python, with a key/value cache sized to the job.

Why it exists: every process pays about 4 s (124M) to trace and lower the compiled loop
(`decoder`, `pool`) before the persistent compilation cache can even be asked, and about 10 s
more to compile it the first time; this graph is traced in about half a second, so a short job
prints its text seconds sooner (`gpt2.sampling.api` says which jobs). It serves up to 8 rows
whose prompts have one length and whose text fits in n_ctx (no sliding window).

It shares the compiled loop's math: the model's `block_step` (attention here is
`layers.attend`, one masked softmax over the cache slots filled so far) and the choice as
`choose.next_tokens` with the same per-row streams, so both give the same tokens.

The cache: per layer, keys and values of the job in two resource variables of [b * H * M, D]
rows (M = prompt + new tokens; row (r * H + h) * M + p holds row r, head h, position p), written
in place by a scatter of the new rows and read back by a gather of the filled prefix of every
(row, head), rounded up to PREFIX positions, straight into the [b, H, m, D] layout attention
multiplies. A cache passed in and out as tensors was copied whole on every step (the caller
still held the input) and attended over every slot; this moves about what is filled, and a few
shapes per job keep oneDNN's primitives (and memory) few.

Shapes: b = rows, s = new positions, H = n_head, M = cache slots of the job, m = slots attended
this step, D = head_dim, V = n_vocab.
"""

import threading
import uuid
import weakref

import numpy as np
import tensorflow as tf

from gpt2 import compile_cache, layers
from gpt2.sampling import choose
from gpt2.sampling.decoder import Decoder, _round_up, layer_function
from gpt2.sampling.pool import sampling_rows

PREFIX = 64  # the attended slots are the filled ones rounded up to this
_samplers = weakref.WeakKeyDictionary()  # model -> DirectSampler
_samplers_lock = threading.Lock()


class DirectSampler:
    """`step(tokens, position, slots, caches, rows)` for one model: traced once (any b, s and M),
    never compiled; `caches`: a job's `new_caches(rows, slots)`."""

    def __init__(self, model):
        compile_cache.enable()  # its first call reads XLA's flags: the compiled loop comes later
        hp = model.hparams
        self.model = model
        self.cache_dtype = tf.as_dtype(model.cache_dtype)
        self.cache_names = [f"{kind}{layer}" for layer in range(hp.n_layer) for kind in "kv"]
        spec = Decoder(model).state_spec()  # shapes with any number of rows
        rows = {name: tf.TensorSpec(*spec[name]) for name in choose.NEXT_TOKEN_FIELDS}
        signature = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32),
                     {name: tf.TensorSpec([], tf.resource) for name in self.cache_names}, rows]
        self.step = tf.function(self._step, input_signature=signature, autograph=False)
        # The same step split in two, for speculative decoding (gpt2/sampling/speculative.py):
        # `logits` is the model over s tokens, `choose` the token choice at several positions.
        self.logits = tf.function(self._hidden, input_signature=[*signature[:4], tf.TensorSpec([], tf.int32)],
                                  autograph=False)
        choice = [tf.TensorSpec([None, hp.n_vocab], tf.float32), rows, tf.TensorSpec([None], tf.int32)]
        self.choose = tf.function(lambda *args: self._choose(*args, False), input_signature=choice, autograph=False)
        self.choose_with_probs = tf.function(lambda *args: self._choose(*args, True), input_signature=choice,
                                             autograph=False)
        self._layer = layer_function(self._layer_step, xla=False)  # one layer's kernels, not twelve

    def new_caches(self, rows, slots):
        """Zeroed cache variables of one job, {name: resource handle of [rows * H * slots, D]};
        free them with `free_caches`. Plain resource ops, not tf.Variable: under a
        tf.distribute strategy's scope a tf.Variable would be a distributed one, whose handle
        exists only inside a replica. Declared [None, D]: TensorFlow keys its instantiated
        functions by the declared shapes of resource inputs, and a job of another size would
        otherwise instantiate the step again (0.2-0.5 s and about 10 MiB, kept, per size)."""
        hp = self.model.hparams
        shape = [rows * hp.n_head * slots, hp.head_dim]
        caches = {}
        for name in self.cache_names:
            handle = tf.raw_ops.VarHandleOp(dtype=self.cache_dtype, shape=[None, hp.head_dim],
                                            shared_name=f"gpt2_direct_cache_{uuid.uuid4().hex}")
            tf.raw_ops.AssignVariableOp(resource=handle, value=tf.zeros(shape, self.cache_dtype))
            caches[name] = handle
        return caches

    @staticmethod
    def free_caches(caches):
        for handle in caches.values():
            tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)

    def _layer_step(self, x, weights, k_cache, v_cache, written, read, visible):
        """One block of `_step`: x float32 [b * s, E]; k_cache, v_cache: the layer's cache handles,
        to which it writes this call's keys and values at rows `written` [b H s] before reading
        rows `read` [b H, m] back for attention under `visible` [1, 1, s, m]. Returns x."""
        hp, dtype = self.model.hparams, self.cache_dtype
        batch, attended = tf.shape(read)[0] // hp.n_head, tf.shape(read)[1]

        def attention(q, k, v):
            prefix = []
            for handle, new in zip((k_cache, v_cache), (k, v)):
                update = tf.raw_ops.ResourceScatterUpdate(
                    resource=handle, indices=written, updates=tf.cast(tf.reshape(new, [-1, hp.head_dim]), dtype))
                with tf.control_dependencies([update]):
                    rows_read = tf.raw_ops.ResourceGather(resource=handle, indices=read, dtype=dtype)
                prefix.append(tf.reshape(rows_read, [batch, hp.n_head, attended, hp.head_dim]))
            return layers.attend(q, *prefix, visible), k, v

        return self.model.block_step(x, weights, batch, self.model.compute_dtype, attention)[0]

    def _hidden(self, tokens, position, slots, caches, keep):
        """The model over tokens int32 [b, s] at positions position.. (every row); caches {k0, v0,
        ...}: handles of [b * H * M, D] variables (M = slots) holding the first `position`
        positions, to which this call writes its keys and values. Returns the logits of the last
        `keep` positions, float32 [b, keep, V]."""
        model, hp = self.model, self.model.hparams
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        x = tf.reshape(model.embed(tokens, position + tf.range(length)[None]), [-1, hp.n_embd])
        # Positions 0 .. m-1 are read; query i (at position + i) sees positions 0 .. position + i.
        attended = tf.minimum(_round_up(position + length, PREFIX), slots)
        visible = (tf.range(attended)[None, :] <= position + tf.range(length)[:, None])[None, None]
        first_row = tf.range(batch * hp.n_head)[:, None] * slots  # of each (row, head), [b H, 1]
        written = tf.reshape(first_row + position + tf.range(length)[None], [-1])  # [b H s]
        read = first_row + tf.range(attended)[None]  # [b H, m]
        for layer, block in enumerate(model.blocks):
            x = self._layer(x, block.inference_weights(), caches[f"k{layer}"], caches[f"v{layer}"], written, read,
                            visible)
        last = tf.reshape(model.final(x), [batch, length, hp.n_embd])[:, length - keep:]
        h = tf.reshape(last, [-1, hp.n_embd])
        if isinstance(keep, int):  # the plain step: one position
            logits = model.logits(h)
        else:
            logits = tf.cond(keep > 1, lambda: model.logits(h, few_rows=True), lambda: model.logits(h))
        return tf.reshape(logits, [batch, keep, -1])

    def _step(self, tokens, position, slots, caches, rows):
        """`_hidden` of the last position, then the token choice: rows are choose.NEXT_TOKEN_FIELDS.
        Returns (next tokens int32 [b], counts with the next tokens added)."""
        logits = self._hidden(tokens, position, slots, caches, 1)[:, 0]
        batch = tf.shape(tokens)[0]
        _, chosen = choose.next_tokens(logits, rows, tf.ones_like(rows["seed"], tf.bool))
        counts = tf.tensor_scatter_nd_add(rows["counts"], tf.stack([tf.range(batch), chosen], 1), tf.ones_like(chosen))
        return chosen, counts

    def _choose(self, logits, row, drafts, probs):
        """The token choice of one row at n positions that follow each other: logits float32 [n,
        V]; row: choose.NEXT_TOKEN_FIELDS of one row (batch 1) before drafts [d] (d >= n - 1) were
        generated; position i comes after drafts[:d - n + 1 + i], whose tokens count as generated
        (penalties, the draw's index). Returns (tokens int32 [n], and with `probs` the
        distribution each was drawn from, float32 [n, V] (`choose.distribution`); else [n, 0])."""
        n, d = tf.shape(logits)[0], tf.shape(drafts)[0]
        added = tf.cumsum(tf.one_hot(drafts, self.model.hparams.n_vocab, dtype=tf.int32), axis=0)
        added = tf.concat([tf.zeros_like(row["counts"]), added], 0)[d + 1 - n:]  # [n, V]
        rows = {name: tf.repeat(value, n, axis=0) for name, value in row.items()}
        rows["counts"] += added
        rows["generated"] += tf.range(d + 1 - n, d + 1)
        processed, chosen = choose.next_tokens(logits, rows, tf.ones([n], tf.bool))
        if not probs:
            return chosen, tf.zeros([n, 0])
        return chosen, choose.distribution(processed, rows["temperature"], rows["top_k"], rows["top_p"])

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
    """Runs `gpt2.sampling.settings.Row`s (prompts of one length; prompt + max_new <= n_ctx;
    no logprobs) to the end, as `api.decode_rows` does: a generator yielding, per step, a list
    of (request index, token, None) for the rows still running."""
    sampler = sampler_for(model)
    count = len(requests)
    rows = {name: tf.constant(value) for name, value in sampling_rows(requests, model.hparams.n_vocab).items()}
    tokens = np.array([request.prompt for request in requests], np.int32)
    steps = max(request.max_new for request in requests)
    slots = tokens.shape[1] + steps - 1
    caches = sampler.new_caches(count, slots)
    slots_tensor = tf.constant(slots, tf.int32)  # made once, passed every step
    try:
        position = 0
        running = set(range(count))
        for step in range(steps):
            rows["generated"] = tf.fill([count], step)
            chosen, rows["counts"] = sampler.step(tokens, tf.constant(position, tf.int32), slots_tensor, caches, rows)
            position += tokens.shape[1]
            tokens = chosen.numpy()[:, None]
            produced = [(i, int(tokens[i, 0]), None) for i in sorted(running)]  # step + 1 tokens each
            running -= {i for i, token, _ in produced
                        if step + 1 >= requests[i].max_new or token == requests[i].stop_token}
            yield produced
            if not running:
                return
    finally:  # also when the caller stops early (the generator is closed)
        sampler.free_caches(caches)
