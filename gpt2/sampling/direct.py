"""The uncompiled sampler: one step of the model and the token choice as a plain TensorFlow graph
(no XLA), run once per token from Python, with OpenAI's `past` growing by one position a step.

Why it exists: the compiled loop (`decoder`, `pool`) is the fastest per token, but every process
pays about 4 s (124M) to trace and lower it before the persistent compilation cache can even be
asked, and about 10 s more to compile it the first time. This graph is traced in about half a
second and runs a step about a quarter slower, so a short job prints its text seconds sooner.
`gpt2.sampling.api` uses it for a model until its tokens add up to what compiling would have
cost (`api.direct_tokens()`), then compiles. It serves up to 8 rows whose prompts have one length
and whose text fits in n_ctx (no sliding window): what generate.py and most library calls ask for.
Its cache grows by concatenation (copied every step), so its steps get slower as the text grows,
and at batch 8 they cost about half again the compiled loop's: it is for short jobs only.

The forward pass is the model's own (`model.trunk`, then the logits of the last position only),
and the choice is the compiled loop's `choose.next_tokens` with the same per-row streams, so both
give the same tokens.

Shapes: b = rows, s = new positions, L = n_layer, H = n_head, t = cached positions, D = head_dim,
V = n_vocab.
"""

import threading
import weakref

import numpy as np
import tensorflow as tf

from gpt2.sampling import choose
from gpt2.sampling.settings import pack_rows

# Per-row inputs of a step: name -> (trailing shape, dtype); "V" is n_vocab.
ROW_INPUTS = {
    "temperature": ((), tf.float32), "top_k": ((), tf.int32), "top_p": ((), tf.float32),
    "presence_penalty": ((), tf.float32), "frequency_penalty": ((), tf.float32),
    "repetition_penalty": ((), tf.float32), "seed": ((), tf.int32), "generated": ((), tf.int32),
    "logit_bias": (("V",), tf.float32), "prompt_seen": (("V",), tf.bool), "counts": (("V",), tf.int32),
}

_samplers = weakref.WeakKeyDictionary()  # model -> DirectSampler
_samplers_lock = threading.Lock()


class DirectSampler:
    """`step(tokens, past, rows)` for one model: traced once (any b, s and t), never compiled."""

    def __init__(self, model):
        hp = model.hparams
        self.model = model
        self.empty_past_shape = [hp.n_layer, 2, hp.n_head, 0, hp.head_dim]
        rows = {name: tf.TensorSpec([None, *(hp.n_vocab if d == "V" else d for d in shape)], dtype)
                for name, (shape, dtype) in ROW_INPUTS.items()}
        signature = [tf.TensorSpec([None, None], tf.int32),
                     tf.TensorSpec([None, *self.empty_past_shape[:3], None, hp.head_dim], tf.float32), rows]
        self.step = tf.function(self._step, input_signature=signature, autograph=False)

    def _step(self, tokens, past, rows):
        """tokens int32 [b, s] after `past` float32 [b, L, 2, H, t, D]; rows: ROW_INPUTS [b] or
        [b, V]. Returns (next tokens int32 [b], past [b, L, 2, H, t + s, D], counts with the
        next tokens added)."""
        h, present, _ = self.model.trunk(tokens, past)
        logits = self.model.logits(h[:, -1])
        _, chosen = choose.next_tokens(logits, rows, tf.ones_like(rows["seed"], tf.bool))
        rows_index = tf.range(tf.shape(chosen)[0])
        counts = tf.tensor_scatter_nd_add(rows["counts"], tf.stack([rows_index, chosen], 1),
                                          tf.ones_like(chosen))
        return chosen, tf.concat([past, present], axis=-2), counts


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
    n_vocab = model.hparams.n_vocab
    count = len(requests)
    packed = pack_rows([request.settings for request in requests], n_vocab)
    seen = np.zeros([count, n_vocab], bool)
    for i, request in enumerate(requests):
        seen[i, request.prompt] = True
    rows = {name: tf.constant(value) for name, value in packed.items()}
    rows.update(seed=tf.constant([request.seed for request in requests], tf.int32), prompt_seen=tf.constant(seen),
                counts=tf.zeros([count, n_vocab], tf.int32))
    tokens = np.array([request.prompt for request in requests], np.int32)
    past = tf.zeros([count, *sampler.empty_past_shape], tf.float32)
    made = [0] * count
    running = set(range(count))
    for step in range(max(request.max_new for request in requests)):
        rows["generated"] = tf.fill([count], step)
        chosen, past, rows["counts"] = sampler.step(tokens, past, rows)
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
