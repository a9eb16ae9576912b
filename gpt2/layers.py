"""The building blocks of GPT-2, each a small Keras layer with OpenAI's exact numerics.

Shapes: b = batch, s = new positions in this call, t = key positions attended to, e = n_embd,
h = n_head, d = head_dim = e / h, n = any number of rows (b * s flattened).

dtypes: each layer follows its Keras dtype policy: weights are stored in `variable_dtype` and
matmuls run in `compute_dtype` (float32, or bfloat16 for half the memory and faster oneDNN
matmuls). Whatever the policy, the residual stream, LayerNorm statistics and the attention
softmax are float32. Composite layers invoke their sublayers' `call` directly (Keras' per-call
bookkeeping adds nothing here and made up a large share of tracing time), so casts are explicit.

Every weight's Keras path is OpenAI's variable name (`model/h3/attn/c_proj/w`): composite layers
create their children inside their own name scope.
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
    """Scaled dot-product attention, float32.

    q: [b, h, s, d]; k, v: [b, h, t, d]; mask: bool, broadcastable to [b, h, s, t], True where a
    query may see a key. Returns float32 [b, h, s, d].
    """
    q, k, v = (_cast(x, tf.float32) for x in (q, k, v))
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(q.shape[-1]))
    scores = tf.where(mask, scores, MASKED_SCORE)
    return tf.matmul(tf.nn.softmax(scores, axis=-1), v)


def causal_mask(query_len, key_len):
    """OpenAI's causal mask counted from the lower right: query i sees key j when
    i >= j - key_len + query_len, so queries are the last `query_len` of `key_len` positions.
    Returns bool [1, 1, query_len, key_len]."""
    i = tf.range(query_len)[:, None]
    j = tf.range(key_len)[None, :]
    return (i >= j - key_len + query_len)[None, None]


def _cast(x, dtype):
    return x if x.dtype == dtype else tf.cast(x, dtype)


# The math of each layer as plain functions of tensors: the Keras layers below call them with
# their weights, and the compiled decoder (gpt2.sampling.decoder) calls them with weights it
# passes in explicitly, so that one traced function serves every block.

def layer_norm(x, g, b, epsilon=1e-5):
    """float32 (x - mean) / sqrt(var + epsilon) * g + b over the last axis."""
    x = _cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    centered = x - mean
    variance = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    return centered * tf.math.rsqrt(variance + epsilon) * _cast(g, tf.float32) + _cast(b, tf.float32)


def dense(x, w, b, dtype):
    """x [n, n_in] @ w [n_in, n_out] + b with inputs in `dtype`; float32 [n, n_out]."""
    return matmul(_cast(x, dtype), _cast(w, dtype)) + _cast(b, tf.float32)


def matmul(a, b, transpose_b=False):
    """a @ b (or a @ b^T) as float32. For bfloat16 inputs oneDNN sums in float32 and rounds the
    result to bfloat16, which is then widened: every elementwise step stays float32."""
    return _cast(tf.matmul(a, b, transpose_b=transpose_b), tf.float32)


def split_heads(qkv, batch, n_head):
    """c_attn's output [b * s, 3 e] -> q, k, v, each [b, h, s, d]."""
    e = qkv.shape[-1] // 3
    qkv = tf.reshape(qkv, [batch, -1, 3, n_head, e // n_head])
    q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))
    return q, k, v


def merge_heads(a):
    """[b, h, s, d] -> [b * s, h d]."""
    return tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, a.shape[1] * a.shape[3]])


def mlp(x, fc_w, fc_b, proj_w, proj_b, dtype):
    """c_fc, GELU, c_proj: [n, e] -> float32 [n, e]."""
    return dense(gelu(dense(x, fc_w, fc_b, dtype)), proj_w, proj_b, dtype)


def block(x, weights, batch, n_head, dtype, attention):
    """One pre-LN block at inference as a pure function, for samplers that keep their own cache:
    x float32 [b * s, e]; weights: `Block.inference_weights()`; matmuls in `dtype`;
    attention(q, k, v) -> float32 [b, h, s, d] attends this call's queries (q, k, v float32
    [b, h, s, d]) over the cache and these keys. Returns (x float32 [b * s, e], k, v)."""
    ln1_g, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_g, ln2_b, fc_w, fc_b, out_w, out_b = weights
    q, k, v = split_heads(dense(layer_norm(x, ln1_g, ln1_b), attn_w, attn_b, dtype), batch, n_head)
    x = x + dense(merge_heads(attention(q, k, v)), proj_w, proj_b, dtype)
    return x + mlp(layer_norm(x, ln2_g, ln2_b), fc_w, fc_b, out_w, out_b, dtype), k, v


class LayerNorm(keras.layers.Layer):
    """x -> (x - mean) / sqrt(var + 1e-5) * g + b over the last axis; OpenAI's weights `g`, `b`.

    Statistics in float32; returns float32 (the caller casts for its matmul)."""

    def __init__(self, n_embd, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.g = self.add_weight(shape=(n_embd,), initializer="ones", name="g")
        self.b = self.add_weight(shape=(n_embd,), initializer="zeros", name="b")
        self.built = True

    def call(self, x):
        """x: [..., e] -> float32 [..., e]."""
        return layer_norm(x, self.g, self.b, self.epsilon)


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

    def kernel(self):
        """The weight matrix [n_in, n_out] with any LoRA adapter merged in (what the compiled
        decoder multiplies by; `call` keeps the adapter separate for training)."""
        if self.lora is None:
            return self.w
        delta = tf.matmul(self.lora.a, self.lora.b) * self.lora.scale
        return self.w + _cast(delta, self.w.dtype)

    def call(self, x):
        """x: [n, n_in] (any float dtype) -> float32 [n, n_out], multiplied in the compute dtype."""
        y = dense(x, self.w, self.b, self.compute_dtype)
        if self.lora is not None:  # LoRA hook, see above
            dtype = self.compute_dtype
            low = tf.matmul(_cast(x, dtype), _cast(self.lora.a, dtype))
            y += matmul(low, _cast(self.lora.b, dtype)) * self.lora.scale
        return y


class Attention(keras.layers.Layer):
    """Masked multi-head self-attention: c_attn (q|k|v column blocks), then c_proj."""

    def __init__(self, n_embd, n_head, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.n_head = n_head
        with keras.name_scope(self.name):
            self.c_attn = Conv1D(n_embd, 3 * n_embd, kernel_initializer, name="c_attn", dtype=self.dtype_policy)
            self.c_proj = Conv1D(n_embd, n_embd, kernel_initializer, name="c_proj", dtype=self.dtype_policy)
            self.dropout = keras.layers.Dropout(dropout)
        self.built = True

    def qkv(self, x, batch):
        """x: [b * s, e] -> q, k, v, each float32 [b, h, s, d]."""
        return split_heads(self.c_attn.call(x), batch, self.n_head)

    def project(self, a, training=None):
        """a: [b, h, s, d] -> float32 [b * s, e] (merge heads, c_proj, dropout)."""
        return self.dropout.call(self.c_proj.call(merge_heads(a)), training=training)

    def call(self, x, batch, past=None, training=None):
        """OpenAI's semantics. x: [b * s, e]; past: [b, 2, h, t_past, d] or None.

        Returns (output float32 [b * s, e], present [b, 2, h, s, d]: this call's keys and values).
        """
        q, k, v = self.qkv(x, batch)
        if self.compute_dtype != "float32":  # keys and values as a bfloat16 cache holds them
            k, v = (tf.cast(tf.cast(t, self.compute_dtype), tf.float32) for t in (k, v))
        present = tf.stack([k, v], axis=1)
        if past is not None:
            k = tf.concat([_cast(past[:, 0], k.dtype), k], axis=-2)
            v = tf.concat([_cast(past[:, 1], v.dtype), v], axis=-2)
        a = attend(q, k, v, causal_mask(tf.shape(q)[2], tf.shape(k)[2]))
        return self.project(a, training), present


class MLP(keras.layers.Layer):
    """c_fc (n_embd -> 4 n_embd), GELU, c_proj back to n_embd."""

    def __init__(self, n_embd, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        with keras.name_scope(self.name):
            self.c_fc = Conv1D(n_embd, 4 * n_embd, kernel_initializer, name="c_fc", dtype=self.dtype_policy)
            self.c_proj = Conv1D(4 * n_embd, n_embd, kernel_initializer, name="c_proj", dtype=self.dtype_policy)
            self.dropout = keras.layers.Dropout(dropout)
        self.built = True

    def call(self, x, training=None):
        """x: [n, e] -> float32 [n, e]."""
        out = mlp(x, self.c_fc.kernel(), self.c_fc.b, self.c_proj.kernel(), self.c_proj.b, self.compute_dtype)
        return self.dropout.call(out, training=training)


class Block(keras.layers.Layer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd, n_head, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        with keras.name_scope(self.name):
            self.ln_1 = LayerNorm(n_embd, name="ln_1", dtype=self.dtype_policy)
            self.attn = Attention(n_embd, n_head, dropout, kernel_initializer, name="attn", dtype=self.dtype_policy)
            self.ln_2 = LayerNorm(n_embd, name="ln_2", dtype=self.dtype_policy)
            self.mlp = MLP(n_embd, dropout, kernel_initializer, name="mlp", dtype=self.dtype_policy)
        self.built = True

    def inference_weights(self):
        """The block's weights as tensors, in the order `gpt2.sampling.decoder` takes them."""
        attn, mlp_ = self.attn, self.mlp
        return tuple(tf.convert_to_tensor(w) for w in (
            self.ln_1.g, self.ln_1.b, attn.c_attn.kernel(), attn.c_attn.b, attn.c_proj.kernel(), attn.c_proj.b,
            self.ln_2.g, self.ln_2.b, mlp_.c_fc.kernel(), mlp_.c_fc.b, mlp_.c_proj.kernel(), mlp_.c_proj.b))

    def call(self, x, batch, past=None, training=None):
        """x: float32 [b * s, e]; past: [b, 2, h, t_past, d] or None ->
        (x float32 [b * s, e], present [b, 2, h, s, d])."""
        a, present = self.attn.call(self.ln_1.call(x), batch, past=past, training=training)
        x = x + a
        return x + self.mlp.call(self.ln_2.call(x), training=training), present
