"""The building blocks of GPT-2, each a small Keras layer with OpenAI's exact numerics.

Shapes use b = batch, s = new positions in this call, t = key positions attended to, e = n_embd,
h = n_head, d = head_dim = e / h.

Composite layers invoke their sublayers' `call` directly: Keras' per-call bookkeeping in
`__call__` adds nothing for these layers and made up a large share of tracing the sampler.
"""

import math

import keras
import tensorflow as tf

# OpenAI masks attention scores to -1e10 (not -inf), so a fully masked row stays finite.
MASKED_SCORE = -1e10


def gelu(x):
    """OpenAI's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def attend(q, k, v, mask):
    """Scaled dot-product attention.

    q: [b, h, s, d]; k, v: [b, h, t, d]; mask: bool, broadcastable to [b, h, s, t], True where a
    query may see a key. Returns [b, h, s, d].
    """
    scores = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(tf.shape(v)[-1], q.dtype))
    scores = tf.where(mask, scores, tf.cast(MASKED_SCORE, scores.dtype))
    return tf.matmul(tf.nn.softmax(scores, axis=-1), v)


def causal_mask(query_len, key_len):
    """OpenAI's causal mask counted from the lower right: query i sees key j when
    i >= j - key_len + query_len, so queries are the last `query_len` of `key_len` positions.
    Returns bool [1, 1, query_len, key_len]."""
    i = tf.range(query_len)[:, None]
    j = tf.range(key_len)[None, :]
    return (i >= j - key_len + query_len)[None, None]


class LayerNorm(keras.layers.Layer):
    """x -> (x - mean) / sqrt(var + 1e-5) * g + b over the last axis; OpenAI's weights `g`, `b`."""

    def __init__(self, n_embd, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.g = self.add_weight(shape=(n_embd,), initializer="ones", name="g")
        self.b = self.add_weight(shape=(n_embd,), initializer="zeros", name="b")
        self.built = True

    def call(self, x):
        """x: [..., n_embd] -> same shape."""
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * self.g + self.b


class Conv1D(keras.layers.Layer):
    """OpenAI's `conv1d`: a dense projection x @ w + b with w stored [n_in, n_out].

    OpenAI's checkpoint keeps a leading axis of 1 ([1, n_in, n_out]); the loader drops it.
    """

    def __init__(self, n_in, n_out, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.w = self.add_weight(shape=(n_in, n_out), initializer=kernel_initializer, name="w")
        self.b = self.add_weight(shape=(n_out,), initializer="zeros", name="b")
        self.built = True

    # Fine-tuning hook (gpt2/train/lora.py): an optional low-rank adapter with variables `a`
    # [n_in, r], `b` [r, n_out] and a float `scale`, adding (x @ a @ b) * scale. None = off.
    lora = None

    def call(self, x):
        """x: [b, s, n_in] -> [b, s, n_out]."""
        batch, seq = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, [-1, self.w.shape[0]])
        y = tf.matmul(x, self.w) + self.b
        if self.lora is not None:  # LoRA hook, see above
            low_rank = tf.matmul(tf.matmul(x, tf.cast(self.lora.a, x.dtype)), tf.cast(self.lora.b, x.dtype))
            y += low_rank * tf.cast(self.lora.scale, x.dtype)
        return tf.reshape(y, [batch, seq, self.w.shape[1]])


class Attention(keras.layers.Layer):
    """Masked multi-head self-attention: c_attn (q|k|v column blocks), then c_proj."""

    def __init__(self, n_embd, n_head, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.n_head = n_head
        self.c_attn = Conv1D(n_embd, 3 * n_embd, kernel_initializer, name="c_attn")
        self.c_proj = Conv1D(n_embd, n_embd, kernel_initializer, name="c_proj")
        self.dropout = keras.layers.Dropout(dropout)
        self.built = True

    def _split_heads(self, x):
        """[b, s, e] -> [b, h, s, d]."""
        batch, seq = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, [batch, seq, self.n_head, x.shape[-1] // self.n_head])
        return tf.transpose(x, [0, 2, 1, 3])

    def _merge_heads(self, x):
        """[b, h, s, d] -> [b, s, e]."""
        batch, seq = tf.shape(x)[0], tf.shape(x)[2]
        x = tf.transpose(x, [0, 2, 1, 3])
        return tf.reshape(x, [batch, seq, self.n_head * x.shape[-1]])

    def _qkv(self, x):
        q, k, v = tf.split(self.c_attn.call(x), 3, axis=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _output(self, a, training):
        return self.dropout.call(self.c_proj.call(self._merge_heads(a)), training=training)

    def call(self, x, past=None, training=None):
        """OpenAI's semantics. x: [b, s, e]; past: [b, 2, h, t_past, d] or None.

        Returns (output [b, s, e], present [b, 2, h, s, d]: this call's keys and values).
        """
        q, k, v = self._qkv(x)
        present = tf.stack([k, v], axis=1)
        if past is not None:
            k = tf.concat([past[:, 0], k], axis=-2)
            v = tf.concat([past[:, 1], v], axis=-2)
        a = attend(q, k, v, causal_mask(tf.shape(q)[2], tf.shape(k)[2]))
        return self._output(a, training), present

    def call_cached(self, x, cache, index, mask):
        """Fixed-shape cache path for compiled decoding.

        x: [b, s, e]; cache: (keys, values), each [b, h, cache_len, d]; the new keys and values are
        written at slots index..index+s-1. mask: bool [b, 1, s, cache_len], True where a query may
        see a slot. Returns (output [b, s, e], updated cache).
        """
        q, k, v = self._qkv(x)
        start = [0, 0, index, 0]
        keys = keras.ops.slice_update(cache[0], start, k)
        values = keras.ops.slice_update(cache[1], start, v)
        return self._output(attend(q, keys, values, mask), training=False), (keys, values)


class MLP(keras.layers.Layer):
    """c_fc (n_embd -> 4 n_embd), GELU, c_proj back to n_embd."""

    def __init__(self, n_embd, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.c_fc = Conv1D(n_embd, 4 * n_embd, kernel_initializer, name="c_fc")
        self.c_proj = Conv1D(4 * n_embd, n_embd, kernel_initializer, name="c_proj")
        self.dropout = keras.layers.Dropout(dropout)
        self.built = True

    def call(self, x, training=None):
        """x: [b, s, e] -> [b, s, e]."""
        return self.dropout.call(self.c_proj.call(gelu(self.c_fc.call(x))), training=training)


class Block(keras.layers.Layer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd, n_head, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.ln_1 = LayerNorm(n_embd, name="ln_1")
        self.attn = Attention(n_embd, n_head, dropout, kernel_initializer, name="attn")
        self.ln_2 = LayerNorm(n_embd, name="ln_2")
        self.mlp = MLP(n_embd, dropout, kernel_initializer, name="mlp")
        self.built = True

    def call(self, x, past=None, training=None):
        """x: [b, s, e]; past: [b, 2, h, t_past, d] or None -> (x [b, s, e], present [b, 2, h, s, d])."""
        a, present = self.attn.call(self.ln_1.call(x), past=past, training=training)
        x = x + a
        return x + self.mlp.call(self.ln_2.call(x), training=training), present

    def call_cached(self, x, cache, index, mask):
        """Like `call`, against a fixed-shape cache (see `Attention.call_cached`)."""
        a, cache = self.attn.call_cached(self.ln_1.call(x), cache, index, mask)
        x = x + a
        return x + self.mlp.call(self.ln_2.call(x), training=False), cache
