"""A pool of decoding slots whose state lives in TensorFlow variables between calls.

`Pool(model, slots)` owns the variables of one `Decoder` state and one compiled program, `run`,
that advances every active row by up to a given number of loop iterations (updating the
variables in place under XLA). Rows are admitted into free slots and released from Python
between runs, so one program serves the library's batches and the server's continuous batching.

Shapes: B = slots, V = n_vocab, K = iterations recorded per run call, T = TOP_LOGPROBS.
"""

import contextlib
import hashlib
import itertools
import threading

import numpy as np
import tensorflow as tf

from gpt2 import compile_cache
from gpt2.sampling import decoder as decoder_lib
from gpt2.sampling.settings import check_window_keep, pack_rows

RUN_ITERATIONS = 64  # iterations one run call records (it may stop earlier)

# State that only `admit`/`release` write; `run` writes back everything else.
FIXED_IN_RUN = {*decoder_lib.SETTING_FIELDS, "logit_bias", "prompt_seen", "active"}


def sampling_rows(rows, n_vocab):
    """What the token choice reads of Rows `rows` before their first token
    (`choose.NEXT_TOKEN_FIELDS`), as NumPy arrays: the packed settings, seed, prompt_seen,
    counts 0 and generated 0."""
    seen = np.zeros([len(rows), n_vocab], bool)
    for i, row in enumerate(rows):
        seen[i, row.prompt] = True
    return {**pack_rows([row.settings for row in rows], n_vocab),
            "seed": np.array([np.int32(row.seed) for row in rows], np.int32), "prompt_seen": seen,
            "counts": np.zeros([len(rows), n_vocab], np.int32), "generated": np.zeros(len(rows), np.int32)}


_name_uses = {}
_name_lock = threading.Lock()


@contextlib.contextmanager
def stable_names(key):
    """Makes the names TensorFlow gives the functions traced inside depend only on `key` (and
    on how many programs with that key this process traced before), not on everything traced
    earlier. XLA's persistent cache keys a program by those names, so without this a program
    compiled by generate.py would not be found by the server, a notebook or a test that traced
    something else first. (TensorFlow numbers functions with one process-wide counter.)"""
    try:
        from tensorflow.python.framework import ops
    except ImportError:  # pragma: no cover - a TensorFlow without this internal: names vary
        yield
        return
    with _name_lock:
        use = _name_uses.get(key, 0)
        _name_uses[key] = use + 1
    digest = hashlib.sha256(repr((key, use)).encode()).digest()
    counter = itertools.count(10**15 + int.from_bytes(digest[:6], "big") * 10**6)  # far above TF's own
    real = ops.uid
    ops.uid = lambda: next(counter)
    try:
        yield
    finally:
        ops.uid = real


class Pool:
    """Variables and the compiled `run` program for `slots` rows of `model`."""

    def __init__(self, model, slots, jit_compile=True, iterations=RUN_ITERATIONS):
        self.model = model
        self.slots = slots
        self.iterations = iterations
        self.jit_compile = jit_compile
        self.decoder = decoder_lib.Decoder(model, slots, xla=jit_compile)
        self.n_ctx = model.hparams.n_ctx
        self.n_vocab = model.hparams.n_vocab
        with tf.init_scope():
            self.state = {name: tf.Variable(tf.zeros(shape, dtype), trainable=False, name=f"decode_{name}")
                          for name, (shape, dtype) in self.decoder.state_spec().items()}
        self._changing = [name for name in self.state if name not in FIXED_IN_RUN]
        if jit_compile:
            compile_cache.enable()  # before this process's first XLA compile
        self._trace()
        self.lock = threading.Lock()
        self._published = False
        self.active = np.zeros(slots, bool)  # host copy of the "active" flags

    # ------------------------------------------------------------------ compiled program

    def _trace(self):
        """Traces `run` now, under names that do not depend on the process's history."""
        self._run = tf.function(self._run_program, jit_compile=self.jit_compile, autograph=False)
        key = (type(self.model).__name__, self.model.hparams, self.model.dtype_policy.name, self.slots,
               self.jit_compile, self.iterations)
        with stable_names(key):
            self._run.get_concrete_function(tf.TensorSpec([], tf.int32))

    def _run_program(self, max_iterations):
        state = {name: tf.convert_to_tensor(variable) for name, variable in self.state.items()}
        state, outputs, count = self.decoder.run(state, max_iterations, self.iterations)
        for name in self._changing:
            self.state[name].assign(state[name])
        return outputs, count, state["done"], state["generated"]

    def run(self, max_iterations=None):
        """Advances the active rows by up to max_iterations loop iterations (default and at most
        `iterations`). Returns (outputs: dict of NumPy arrays [B, count, ...] (see
        Decoder.output_spec; tokens are -1 where a row produced none), done bool [B], generated
        int32 [B])."""
        steps = self.iterations if max_iterations is None else min(max_iterations, self.iterations)
        try:
            outputs, count, done, generated = self._run(tf.constant(steps, tf.int32))
        except tf.errors.OpError as error:
            if self._published or not compile_cache.recover(error):
                raise
            self._trace()  # new names, so a new program: TensorFlow keeps failing the old one
            outputs, count, done, generated = self._run(tf.constant(steps, tf.int32))
        count = int(count)
        if not self._published:  # the first call compiled: share it with other processes now
            self._published = compile_cache.publish() >= 0
        if steps and count == steps and not (outputs["tokens"].numpy() >= 0).any() and not self._ingesting():
            raise RuntimeError("the decoder made no progress; this is a bug, please report it")
        outputs = {name: value.numpy()[:, :count] for name, value in outputs.items()}
        return outputs, done.numpy(), generated.numpy()

    def _ingesting(self):
        cached, filled = self.state["cached"].numpy(), self.state["filled"].numpy()
        done = self.state["done"].numpy()
        return bool((self.active & ~done & (cached < filled)).any())

    def tracing_count(self):
        return self._run.experimental_get_tracing_count()

    # ------------------------------------------------------------------ admission

    def free_slots(self):
        return [int(i) for i in np.flatnonzero(~self.active)]

    def admit(self, slots, rows):
        """Starts each Row of `rows` (validated where they were made) in the matching free slot of `slots`."""
        if not rows:
            return
        count = len(rows)
        window = np.zeros([count, self.decoder.window_slots], np.int32)
        for i, row in enumerate(rows):
            window[i, :len(row.prompt)] = row.prompt
        values = {
            **sampling_rows(rows, self.n_vocab),
            "max_new": np.array([row.max_new for row in rows], np.int32),
            "stop_token": np.array([row.stop_token for row in rows], np.int32),
            "window_keep": np.array([check_window_keep(row.window_keep, self.n_ctx) for row in rows], np.int32),
            "want_logprobs": np.array([bool(row.logprobs) for row in rows]),
            "active": np.ones(count, bool),
            "done": np.zeros(count, bool),
            "cached": np.zeros(count, np.int32),
            "filled": np.array([len(row.prompt) for row in rows], np.int32),
            "window": window,
        }
        # Rows admitted together with the same prompt share one ingestion of it.
        first_slot = {}
        values["source"] = np.array([first_slot.setdefault(tuple(row.prompt), slot) for slot, row in zip(slots, rows)],
                                    np.int32)
        values["source"][values["source"] == np.array(slots)] = -1
        index = np.array(slots, np.int32)[:, None]
        for name, value in values.items():
            self.state[name].scatter_nd_update(index, value)
        self.active[list(slots)] = True

    def release(self, slots):
        """Frees slots (their rows stop at once)."""
        slots = list(slots)
        if slots:
            index = np.array(slots, np.int32)[:, None]
            self.state["active"].scatter_nd_update(index, np.zeros(len(slots), bool))
            self.active[slots] = False

    def release_all(self):
        self.release(range(self.slots))
