"""GPT-2's building blocks, OpenAI's numerics: `block`, the one per-layer step every driver runs
(GPT2.call, the compiled loop, the uncompiled sampler) with the attention over its cache as a
parameter, and the Keras layers that hold the weights. `ml_block` and `MLBlock` are GPT2-ML's
(Grover's) variant of that step, which the same drivers run through `GPT2.block_step`.

Shapes: b = batch, s = new positions in this call, t = key positions attended to, e = n_embd,
h = n_head, d = head_dim = e / h, n = any number of rows (b * s flattened).

dtypes: each layer follows its Keras dtype policy: weights are stored in `variable_dtype` and
matmuls run in `compute_dtype` (float32, or bfloat16 for half the memory and faster oneDNN
matmuls). Projection kernels (and the model's token embedding) may instead be held narrow
(`NarrowKernel`: int8 with a float32 scale per output channel, or float16), widened to float32
for the product. Whatever the policy, the residual stream, LayerNorm statistics and the
attention softmax are float32. Layers invoke their sublayers' `call` directly (Keras' per-call
bookkeeping adds nothing here and made up a large share of tracing time), so casts are explicit.

Every weight's Keras path is OpenAI's variable name (`model/h3/attn/c_proj/w`; GPT2-ML's
`newslm/layer03/query_layer/kernel`): composite layers create their children inside their own name scope.
"""

import functools
import math

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla as tfxla

from gpt2.hparams import NARROW_DTYPES

# OpenAI masks attention scores to -1e10 (not -inf), so a fully masked row stays finite.
MASKED_SCORE = -1e10
NEG_INF = float("-inf")  # the blocked form's mask: every row there sees at least its own key
BLOCK = 128  # cache slots `blocked_attention` reads per step


def gelu(x):
    """OpenAI's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def gelu_erf(x):
    """The exact GELU, x/2 (1 + erf(x / sqrt 2)) (GPT2-ML's)."""
    return 0.5 * x * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))


def attend(q, k, v, mask):
    """Scaled dot-product attention, float32: one masked softmax over the given keys. q: [b, h, s,
    d]; k, v: [b, h, t, d]; mask: bool, broadcastable to [b, h, s, t], True where a query may see
    a key. Returns float32 [b, h, s, d]."""
    q, k, v = (_cast(x, tf.float32) for x in (q, k, v))
    scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(q.shape[-1]))
    scores = tf.where(mask, scores, MASKED_SCORE)
    return tf.matmul(tf.nn.softmax(scores, axis=-1), v)


def _cast(x, dtype):
    return x if x.dtype == dtype else tf.cast(x, dtype)


# The math as plain functions of tensors; the Keras layers below call `block` with their weights.

def layer_norm(x, g, b, epsilon=1e-5):
    """float32 (x - mean) / sqrt(var + epsilon) * g + b over the last axis."""
    x = _cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    centered = x - mean
    variance = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    return centered * tf.math.rsqrt(variance + epsilon) * _cast(g, tf.float32) + _cast(b, tf.float32)


def dense(x, w, b, dtype):
    """x [n, n_in] @ w [n_in, n_out] + b with inputs in `dtype`; float32 [n, n_out]. w: a float
    kernel, or a narrow kernel's tensors (`NarrowKernel.tensors()`: int8 [n_out, n_in] and its
    float32 scale [n_out], or float16 [n_out, n_in] alone), multiplied in float32."""
    if isinstance(w, (tuple, list)):
        return narrow_matmul(x, *w) + _cast(b, tf.float32)
    return matmul(_cast(x, dtype), _cast(w, dtype)) + _cast(b, tf.float32)


NARROW_CHUNK = 64  # output channels `narrow_matmul` widens to float32 at a time (at least; at most 64 chunks)
FLOAT16_MAX = 65504.0  # the largest finite float16


def quantize_int8(rows) -> tuple[tf.Tensor, tf.Tensor]:
    """Symmetric int8 quantization with one float32 scale per row (per output channel: int8
    kernels are held [n_out, n_in], the token embedding's layout): rows float [r, c] -> (q int8
    [r, c], scale float32 [r]) with scale = max |row| / 127 and q = round(row / scale) in
    [-127, 127], so q * scale is within scale / 2 of each weight. A row of zeros gets scale 1."""
    rows = _cast(tf.convert_to_tensor(rows), tf.float32)
    scale = tf.reduce_max(tf.abs(rows), axis=1) / 127.0
    scale = tf.where(scale > 0, scale, 1.0)
    q = tf.cast(tf.clip_by_value(tf.round(rows / scale[:, None]), -127.0, 127.0), tf.int8)
    return q, scale


def dequantize_int8(q, scale) -> tf.Tensor:
    """The float32 rows an int8 pair stands for: q * scale [r, 1]."""
    return tf.cast(q, tf.float32) * _cast(scale, tf.float32)[:, None]


def narrow_matmul(x, q, scale=None) -> tf.Tensor:
    """x float [n, n_in] times the narrow kernel q [n_out, n_in] (one row per output channel:
    int8 with its float32 scale [n_out], or float16 with scale None): float32 [n, n_out] =
    (x @ q^T) * scale, q widened to float32 exactly.

    How, for XLA on CPUs (where widening the whole kernel first costs more than float32's own
    product): one row (n == 1, known when traced) is one product, which XLA fuses with the
    widening; more rows go NARROW_CHUNK output channels at a time in a loop, each chunk widened
    while it is in cache. Plain TensorFlow runs the same ops."""
    x = _cast(x, tf.float32)
    n_out, n_in = q.shape
    size = max(NARROW_CHUNK, -(-n_out // (64 * NARROW_CHUNK)) * NARROW_CHUNK)  # the logits: 64 chunks of 832
    chunks = n_out // size
    if x.shape[0] == 1 or chunks < 2:
        y = tf.matmul(x, tf.cast(q, tf.float32), transpose_b=True)
        if scale is None:
            # Else XLA's CPU backend fuses this one-row product with the bias added after it,
            # and then widens the whole kernel to float32 first instead of inside the product
            # (124M float16: ~470 instead of ~45 ms a step); int8's scale multiply keeps them apart.
            y = tfxla.optimization_barrier(y)[0]
    else:
        def step(j, out):
            rows = tf.cast(tf.slice(q, [j * size, 0], [size, n_in]), tf.float32)
            return j + 1, out.write(j, tf.matmul(x, rows, transpose_b=True))

        rows = tf.shape(x)[0]
        _, out = tf.while_loop(lambda j, _: j < chunks, step,
                               (tf.constant(0), tf.TensorArray(tf.float32, chunks, element_shape=[x.shape[0], size])))
        y = tf.reshape(tf.transpose(out.stack(), [1, 0, 2]), [rows, chunks * size])
        if chunks * size < n_out:  # the last, partial chunk
            y = tf.concat([y, tf.matmul(x, tf.cast(q[chunks * size:], tf.float32), transpose_b=True)], 1)
    return y if scale is None else y * _cast(scale, tf.float32)


class NarrowKernel:
    """A float weight held narrow (Keras variables, not trainable), laid out [n_out, n_in]: int8
    `q` with a float32 `scale` per output channel (`quantize_int8`), or float16 `q` with `scale`
    None. A Conv1D kernel [n_in, n_out] is held transposed, the token embedding [V, e] as it is
    (its rows are the logits' channels). Stands in for the float variable where weights are
    loaded and saved: `assign` narrows, `value` widens, `shape` and `dtype` are the float weight's."""

    dtype = "float32"

    def __init__(self, q, scale, transposed):
        self.q, self.scale, self.transposed = q, scale, transposed

    @property
    def shape(self):
        return tuple(reversed(self.q.shape)) if self.transposed else tuple(self.q.shape)

    def assign(self, value):
        """Narrows `value` (the float weight) into q (and scale), a block of rows (4M weights) at a
        time, so the float temporaries stay small beside the weight (wte: 154 MiB). float16
        refuses a weight beyond its range (|w| > 65504) with a one-line ValueError."""
        rows = tf.transpose(value) if self.transposed else tf.convert_to_tensor(value)
        if self.scale is None:
            largest = float(tf.reduce_max(tf.abs(_cast(rows, tf.float32))))
            if not largest <= FLOAT16_MAX:
                raise ValueError(f"{self.q.path}: a weight of magnitude {largest:g} does not fit float16 (at most "
                                 f"{FLOAT16_MAX:g}); load this model with dtype='float32' or 'int8'")
            self.q.assign(_cast(rows, tf.float16))
            return
        block = max(1, (1 << 22) // rows.shape[1])
        parts = [quantize_int8(rows[start: start + block]) for start in range(0, rows.shape[0], block)]
        del rows
        self.q.assign(tf.concat([q for q, _ in parts], 0) if len(parts) > 1 else parts[0][0])
        self.scale.assign(tf.concat([scale for _, scale in parts], 0) if len(parts) > 1 else parts[0][1])

    @property
    def value(self):
        """The widened float32 weight, in the float weight's layout."""
        rows = tf.cast(self.q, tf.float32) if self.scale is None else dequantize_int8(self.q, self.scale)
        return tf.transpose(rows) if self.transposed else rows

    def tensors(self):
        """What `dense` and `narrow_matmul` take: (q int8 [n_out, n_in], scale float32 [n_out]), or
        (q float16 [n_out, n_in],)."""
        if self.scale is None:
            return (tf.convert_to_tensor(self.q),)
        return tf.convert_to_tensor(self.q), tf.convert_to_tensor(self.scale)

    def gather(self, indices):
        """Rows `indices` (of the untransposed token embedding), widened: float32 [..., e]."""
        rows = tf.cast(tf.gather(self.q, indices), tf.float32)
        return rows if self.scale is None else rows * tf.gather(self.scale, indices)[..., None]


def narrow_weight(layer, shape, transposed, initializer, name, dtype):
    """A `NarrowKernel` of `dtype` (int8 or float16) for a float weight of `shape`, made of
    `layer`'s weights `name` (and, for int8, `name`_scale). initializer: a Keras initializer
    (random: drawn in float32, then narrowed) or a plain function of (shape, dtype) (as the
    model's uninitialised one)."""
    random = isinstance(initializer, keras.initializers.Initializer)
    rows = tuple(reversed(shape)) if transposed else tuple(shape)
    q = layer.add_weight(shape=rows, initializer="zeros" if random else initializer, dtype=dtype,
                         trainable=False, name=name)
    scale = None
    if dtype == "int8":
        scale = layer.add_weight(shape=(rows[0],), initializer="ones" if random else initializer,
                                 trainable=False, name=f"{name}_scale")
    kernel = NarrowKernel(q, scale, transposed)
    if random:
        kernel.assign(initializer(shape, "float32"))
    return kernel


def matmul(a, b, transpose_b=False):
    """a @ b (or a @ b^T) as float32. For bfloat16 inputs oneDNN sums in float32 and rounds the
    result to bfloat16, which is then widened: every elementwise step stays float32."""
    return _cast(tf.matmul(a, b, transpose_b=transpose_b), tf.float32)


def split_heads(qkv, batch, n_head):
    """c_attn's output [b * s, 3 e] -> q, k, v, each [b, h, s, d]."""
    e = qkv.shape[-1] // 3
    return tf.unstack(tf.transpose(tf.reshape(qkv, [batch, -1, 3, n_head, e // n_head]), [2, 0, 3, 1, 4]))


def to_heads(x, batch, n_head):
    """One projection's output [b * s, e] -> [b, h, s, d]."""
    return tf.transpose(tf.reshape(x, [batch, -1, n_head, x.shape[-1] // n_head]), [0, 2, 1, 3])


def merge_heads(a):
    """[b, h, s, d] -> [b * s, h d]."""
    return tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, a.shape[1] * a.shape[3]])


def _linear(x, w, b, dtype):
    """x @ w + b: a Conv1D layer's own call (keeping a LoRA adapter separate), else `dense`."""
    return w.call(x) if isinstance(w, Conv1D) else dense(x, w, b, dtype)


def block(x, weights, batch, n_head, dtype, attention, dropout=None):
    """One pre-LN block: x + attn(ln_1(x)), then x + c_proj(gelu(c_fc(ln_2(x)))). x: float32
    [b * s, e]; weights: `Block.inference_weights()` (or `layer_weights()`); matmuls in `dtype`;
    attention(q, k, v) -> (a float32 [b, h, s, d], k, v as its cache holds them) attends this
    call's queries over the cache and these keys (q, k, v float32 [b, h, s, d]); dropout: two
    callables for the attention's and the MLP's output, or None. Returns (x, k, v)."""
    ln1_g, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_g, ln2_b, fc_w, fc_b, out_w, out_b = weights
    attn_dropout, mlp_dropout = dropout or [lambda y: y] * 2
    q, k, v = split_heads(_linear(layer_norm(x, ln1_g, ln1_b), attn_w, attn_b, dtype), batch, n_head)
    a, k, v = attention(q, k, v)
    x = x + attn_dropout(_linear(merge_heads(a), proj_w, proj_b, dtype))
    h = _linear(gelu(_linear(layer_norm(x, ln2_g, ln2_b), fc_w, fc_b, dtype)), out_w, out_b, dtype)
    return x + mlp_dropout(h), k, v


def ml_block(x, weights, batch, n_head, dtype, attention, dropout=None):
    """GPT2-ML's (Grover's) block, `block`'s arguments and result (weights: `MLBlock`'s): no
    LayerNorm before attention, separate q, k, v projections, x + attn(x), then
    mlp_ln1(x + output(gelu_erf(intermediate(mlp_ln0(x))))): the stream leaves it normalised."""
    q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, ln0_g, ln0_b, fc_w, fc_b, out_w, out_b, ln1_g, ln1_b = weights
    attn_dropout, mlp_dropout = dropout or [lambda y: y] * 2
    q, k, v = (to_heads(_linear(x, w, b, dtype), batch, n_head) for w, b in ((q_w, q_b), (k_w, k_b), (v_w, v_b)))
    a, k, v = attention(q, k, v)
    x = x + attn_dropout(_linear(merge_heads(a), proj_w, proj_b, dtype))
    h = _linear(gelu_erf(_linear(layer_norm(x, ln0_g, ln0_b), fc_w, fc_b, dtype)), out_w, out_b, dtype)
    return layer_norm(x + mlp_dropout(h), ln1_g, ln1_b), k, v


def cached_attention(past, dtype):
    """GPT2.call's attention for `block`: one masked softmax over `past` [b, 2, h, t_past, d] (or
    None) and this call's keys, OpenAI's causal mask from the lower right (query i of s sees key j
    of t when i >= j - t + s). Keys and values are rounded to `dtype`, as its cache holds them."""

    def attention(q, k, v):
        if tf.as_dtype(dtype) != tf.float32:
            k, v = (tf.cast(tf.cast(t, dtype), tf.float32) for t in (k, v))
        keys, values = k, v
        if past is not None:
            keys = tf.concat([_cast(past[:, 0], k.dtype), k], axis=-2)
            values = tf.concat([_cast(past[:, 1], v.dtype), v], axis=-2)
        s, t = tf.shape(q)[2], tf.shape(keys)[2]
        return attend(q, keys, values, (tf.range(s)[:, None] >= tf.range(t)[None, :] - t + s)[None, None]), k, v

    return attention


def blocked_attention(keys, values, first_row, cached, num_blocks, xla=True):
    """The compiled loop's attention for `block`, the same softmax computed online: queries after
    each row's `cached` [b] slots of the cache keys, values [B, h, M, d] (rows first_row..) attend
    over those slots in num_blocks blocks of BLOCK, then over this call's keys (query i sees 0..i).
    float32 throughout (a bfloat16 cache is widened block by block); xla: see `dynamic_slice`."""

    def attention(q, k, v):
        b, h, s, d = q.shape
        size = [-1 if b is None else b, h, BLOCK, d]
        scale = 1.0 / math.sqrt(d)

        def accumulate(scores, v, best, total, acc):
            new_best = tf.maximum(best, tf.reduce_max(scores, axis=-1))
            weights = tf.exp(scores - new_best[..., None])
            rescale = tf.exp(best - new_best)
            total = total * rescale + tf.reduce_sum(weights, axis=-1)
            return new_best, total, acc * rescale[..., None] + tf.matmul(weights, v)

        def step(j, best, total, acc):
            begin = [first_row, 0, j * BLOCK, 0]
            block_keys = tf.cast(dynamic_slice(keys, begin, size, xla), tf.float32)
            scores = tf.matmul(q, block_keys, transpose_b=True) * scale
            visible = (j * BLOCK + tf.range(BLOCK))[None, None, None, :] < cached[:, None, None, None]
            scores = tf.where(visible, scores, NEG_INF)
            block_values = tf.cast(dynamic_slice(values, begin, size, xla), tf.float32)
            return (j + 1, *accumulate(scores, block_values, best, total, acc))

        start = (tf.constant(0), tf.fill(tf.shape(q)[:3], tf.constant(-1e30, tf.float32)),
                 tf.zeros(tf.shape(q)[:3], tf.float32), tf.zeros(tf.shape(q), tf.float32))
        _, best, total, acc = tf.while_loop(lambda j, *_: j < num_blocks, step, start,
                                            maximum_iterations=keys.shape[2] // BLOCK)
        own = tf.matmul(q, k, transpose_b=True) * scale
        own = tf.where(tf.range(s)[:, None] >= tf.range(s)[None, :], own, NEG_INF)
        _, total, acc = accumulate(own, v, best, total, acc)
        return acc / total[..., None], tf.cast(k, keys.dtype), tf.cast(v, keys.dtype)

    return attention


def dynamic_slice(tensor, begin, size, xla=True):
    """tensor[begin : begin + size] with `begin` known only at run time (size[0] may be -1: all
    rows). Under XLA an XLA dynamic-slice (tf.slice and x[i] make XLA treat a non-constant begin
    as a compile-time constant: one compile per value); otherwise tf.slice."""
    if size[0] == -1:
        size = [tf.shape(tensor)[0], *size[1:]]
    if xla:
        return tfxla.dynamic_slice(tensor, begin, size)
    return tf.slice(tensor, tf.stack(begin), tf.stack(size))


class LayerNorm(keras.layers.Layer):
    """`layer_norm` with OpenAI's weights `g`, `b` (stored under `weight_names`: GPT2-ML's are
    gamma, beta); float32 [..., e] (the caller casts for its matmul)."""

    def __init__(self, n_embd, epsilon=1e-5, weight_names=("g", "b"), **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.g = self.add_weight(shape=(n_embd,), initializer="ones", name=weight_names[0])
        self.b = self.add_weight(shape=(n_embd,), initializer="zeros", name=weight_names[1])
        self.built = True

    def call(self, x):
        return layer_norm(x, self.g, self.b, self.epsilon)


class Conv1D(keras.layers.Layer):
    """OpenAI's `conv1d`: a dense projection x @ w + b with w stored [n_in, n_out] (OpenAI's
    checkpoint keeps a leading axis of 1, which the loader drops) under `weight_names` (GPT2-ML's:
    kernel, bias). weight_dtype int8 or float16: w is a `NarrowKernel` (`w` [n_out, n_in], and
    for int8 `w_scale` [n_out])."""

    def __init__(self, n_in, n_out, kernel_initializer, weight_names=("w", "b"), weight_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        if weight_dtype in NARROW_DTYPES:
            self.w = narrow_weight(self, (n_in, n_out), True, kernel_initializer, weight_names[0], weight_dtype)
        else:
            self.w = self.add_weight(shape=(n_in, n_out), initializer=kernel_initializer, name=weight_names[0])
        self.b = self.add_weight(shape=(n_out,), initializer="zeros", name=weight_names[1])
        self.built = True

    # Fine-tuning hook (gpt2/train/lora.py): an optional low-rank adapter with variables `a`
    # [n_in, r], `b` [r, n_out] and a float `scale`, adding (x @ a @ b) * scale. None = off.
    lora = None

    def kernel(self):
        """The weight matrix [n_in, n_out] with any LoRA adapter merged in (what the compiled
        decoder multiplies by; `call` keeps the adapter separate for training). A narrow kernel:
        its `tensors()`."""
        if isinstance(self.w, NarrowKernel):
            return self.w.tensors()
        if self.lora is None:
            return self.w
        delta = tf.matmul(self.lora.a, self.lora.b) * self.lora.scale
        return self.w + _cast(delta, self.w.dtype)

    def call(self, x):
        """x: [n, n_in] (any float dtype) -> float32 [n, n_out], multiplied in the compute dtype."""
        y = dense(x, self.kernel() if isinstance(self.w, NarrowKernel) else self.w, self.b, self.compute_dtype)
        if self.lora is not None:  # LoRA hook, see above
            dtype = self.compute_dtype
            low = tf.matmul(_cast(x, dtype), _cast(self.lora.a, dtype))
            y += matmul(low, _cast(self.lora.b, dtype)) * self.lora.scale
        return y


class _Projections(keras.layers.Layer):
    """Weights only: Conv1D projections SHAPES {name: (n_in, n_out) in n_embd} and a dropout."""

    SHAPES = {}

    def __init__(self, n_embd, dropout, kernel_initializer, weight_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        with keras.name_scope(self.name):
            for name, (n_in, n_out) in self.SHAPES.items():
                setattr(self, name, Conv1D(n_in * n_embd, n_out * n_embd, kernel_initializer, name=name,
                                           weight_dtype=weight_dtype, dtype=self.dtype_policy))
            self.dropout = keras.layers.Dropout(dropout)
        self.built = True


class Attention(_Projections):
    """Masked multi-head self-attention's weights: c_attn (q|k|v column blocks), c_proj."""

    SHAPES = {"c_attn": (1, 3), "c_proj": (1, 1)}


class MLP(_Projections):
    """The MLP's weights: c_fc (n_embd -> 4 n_embd), GELU, c_proj back to n_embd."""

    SHAPES = {"c_fc": (1, 4), "c_proj": (4, 1)}


class _Block(keras.layers.Layer):
    """What GPT-2's and GPT2-ML's blocks share: a subclass's `function` (the block step, `block` or
    `ml_block`) run on its `layer_weights()`, with its `dropout_layers()` (the attention output's
    and the MLP output's)."""

    def inference_weights(self):
        """The weights as tensors in the block function's order (LoRA adapters merged in), for the samplers."""
        def tensor(w):
            w = w.kernel() if isinstance(w, Conv1D) else w
            return w if isinstance(w, tuple) else tf.convert_to_tensor(w)  # a narrow kernel is tensors already

        return tuple(tensor(w) for w in self.layer_weights())

    def call(self, x, batch, past=None, training=None):
        """x: float32 [b * s, e]; past: [b, 2, h, t_past, d] or None ->
        (x float32 [b * s, e], present [b, 2, h, s, d]: this call's keys and values)."""
        dropout = [functools.partial(layer.call, training=training) for layer in self.dropout_layers()]
        x, k, v = self.function(x, self.layer_weights(), batch, self.n_head, self.compute_dtype,
                                cached_attention(past, self.compute_dtype), dropout)
        return x, tf.stack([k, v], axis=1)


class Block(_Block):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    @staticmethod
    def function(*args, **kwargs):
        """`block` (looked up when called, so that wrapping gpt2.layers.block reaches every driver)."""
        return block(*args, **kwargs)

    def __init__(self, n_embd, n_head, dropout, kernel_initializer, weight_dtype="float32", **kwargs):
        super().__init__(**kwargs)
        self.n_head = n_head
        with keras.name_scope(self.name):
            self.ln_1 = LayerNorm(n_embd, name="ln_1", dtype=self.dtype_policy)
            self.attn = Attention(n_embd, dropout, kernel_initializer, weight_dtype, name="attn",
                                  dtype=self.dtype_policy)
            self.ln_2 = LayerNorm(n_embd, name="ln_2", dtype=self.dtype_policy)
            self.mlp = MLP(n_embd, dropout, kernel_initializer, weight_dtype, name="mlp", dtype=self.dtype_policy)
        self.built = True

    def layer_weights(self):
        """`block`'s weights for Keras' call: the attention's Conv1D layers (whose call keeps a LoRA
        adapter separate), the MLP's kernels with any adapter merged in (as BENCHMARKS' LoRA runs)."""
        attn, mlp_ = self.attn, self.mlp
        return (self.ln_1.g, self.ln_1.b, attn.c_attn, attn.c_attn.b, attn.c_proj, attn.c_proj.b,
                self.ln_2.g, self.ln_2.b, mlp_.c_fc.kernel(), mlp_.c_fc.b, mlp_.c_proj.kernel(), mlp_.c_proj.b)

    def dropout_layers(self):
        return self.attn.dropout, self.mlp.dropout


class MLBlock(_Block):
    """GPT2-ML's (Grover's) block (see `ml_block`), its weights under Grover's names: query_layer,
    key_layer, value_layer, context_projection_layer, LayerNorm_mlp_ln0, intermediate, output,
    LayerNorm_mlp_ln1 (dense layers: kernel [n_in, n_out], bias; LayerNorms: gamma, beta)."""

    @staticmethod
    def function(*args, **kwargs):
        """`ml_block` (looked up when called, as Block's)."""
        return ml_block(*args, **kwargs)

    PROJECTIONS = ("query_layer", "key_layer", "value_layer", "context_projection_layer")

    def __init__(self, n_embd, n_head, n_inner, dropout, kernel_initializer, **kwargs):
        super().__init__(**kwargs)
        self.n_head = n_head

        def dense_layer(n_in, n_out, name):
            return Conv1D(n_in, n_out, kernel_initializer, weight_names=("kernel", "bias"), name=name,
                          dtype=self.dtype_policy)

        def norm(name):
            return LayerNorm(n_embd, weight_names=("gamma", "beta"), name=name, dtype=self.dtype_policy)

        with keras.name_scope(self.name):
            self.projections = [dense_layer(n_embd, n_embd, name) for name in self.PROJECTIONS]
            self.attn_dropout = keras.layers.Dropout(dropout)
            self.ln0 = norm("LayerNorm_mlp_ln0")
            self.intermediate = dense_layer(n_embd, n_inner, "intermediate")
            self.output_layer = dense_layer(n_inner, n_embd, "output")  # Keras' Layer.output is taken
            self.mlp_dropout = keras.layers.Dropout(dropout)
            self.ln1 = norm("LayerNorm_mlp_ln1")
        self.built = True

    def layer_weights(self):
        """`ml_block`'s weights for Keras' call: the attention's Conv1D layers, the MLP's kernels
        with any adapter merged in (as Block's)."""
        attention = [w for layer in self.projections for w in (layer, layer.b)]
        return (*attention, self.ln0.g, self.ln0.b, self.intermediate.kernel(), self.intermediate.b,
                self.output_layer.kernel(), self.output_layer.b, self.ln1.g, self.ln1.b)

    def dropout_layers(self):
        return self.attn_dropout, self.mlp_dropout
