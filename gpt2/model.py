"""GPT-2 as a Keras model: embeddings, n_layer pre-LN blocks, final LayerNorm, tied output logits;
GPT2ML, GPT2-ML's (Grover's) variant: normalised embeddings, its blocks, no final LayerNorm.

Every driver (GPT2.call, the compiled loop, the uncompiled sampler) runs a model through the same
four steps: `embed`, `block_step` on each block's weights, `final`, `logits`.

b = batch, s = positions in this call, e = n_embd, h = n_head, d = head_dim, L = n_layer, V = n_vocab.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from gpt2.hparams import NARROW_DTYPES, GPT2MLHParams, HParams
from gpt2.layers import Block, LayerNorm, MLBlock, NarrowKernel, layer_norm, matmul, narrow_matmul, narrow_weight


def _uninitialized(shape, dtype=None):
    """An initializer that allocates without writing: untouched pages cost no memory until the
    loaded values replace them."""
    return tf.raw_ops.Empty(shape=shape, dtype=dtype or "float32", init=False)

# The model's one tensor input, as Keras' export and tf.saved_model.save declare it.
TOKENS_SPEC = tf.TensorSpec([None, None], tf.int32, name="tokens")


@keras.saving.register_keras_serializable(package="gpt2")
class GPT2(keras.Model):
    """OpenAI's GPT-2.

    `model(tokens, past=None)` returns a dict like OpenAI's `model.model`: `logits` [b, s, V]
    (float32) and `present` [b, L, 2, h, s, d] (keys and values of this call, to pass back as
    `past`); with `return_hidden_states=True` also `hidden_states`: L + 1 float32 [b, s, e], the
    embeddings and each block's output (before the final LayerNorm).

    `dropout` applies only with `training=True`. Weights start as OpenAI's initialisation
    (normal, std 0.02; wpe 0.01); `random_init=False` leaves them uninitialised (their memory
    untouched) for weights about to be loaded, so loading holds them once. `dtype`: a Keras dtype
    policy, "float32", "bfloat16" or "mixed_bfloat16" (float32 weights, bfloat16 matmuls, for
    training); the residual stream, LayerNorm statistics, softmax and logits are float32 in all.
    `weight_dtype` "int8" or "float16" (float32 policy, inference only; not GPT2-ML): projection
    kernels and wte held narrow (`gpt2.layers.NarrowKernel`: int8 with a float32 scale per output
    channel, or float16, which XLA widens inside the product), all arithmetic float32; float16
    models also hold the samplers' key/value cache in float16 (`cache_dtype`).
    Variable paths are OpenAI's names (`model/h0/attn/c_attn/w`, with the default name).
    """

    HPARAMS = HParams
    BLOCK = Block  # its `function` is the block step every driver runs (block_step)

    def __init__(self, hparams: HParams | dict, dropout: float = 0.0, random_init: bool = True, name: str = "model",
                 weight_dtype: str = "float32", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        if weight_dtype not in ("float32", *NARROW_DTYPES):
            raise ValueError(f"weight_dtype must be float32, {', '.join(NARROW_DTYPES)}, got {weight_dtype!r}")
        if weight_dtype != "float32" and (tf.as_dtype(self.compute_dtype) != tf.float32 or self.HPARAMS is not HParams):
            raise ValueError(f"{weight_dtype} weights are for GPT-2 models with the float32 dtype policy")
        self.weight_dtype = weight_dtype
        if isinstance(hparams, dict):
            hparams = self.HPARAMS.from_dict(hparams)
        if not isinstance(hparams, self.HPARAMS):
            raise TypeError(f"{type(self).__name__} expects gpt2.{self.HPARAMS.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams
        self.dropout_rate = dropout

        def normal(stddev):
            return keras.initializers.RandomNormal(stddev=stddev) if random_init else _uninitialized

        self._make_layers(hparams, dropout, normal)
        self.built = True

    def _make_layers(self, hparams, dropout, normal):
        """Creates the weights; normal(stddev): their initializer."""
        if self.weight_dtype in NARROW_DTYPES:
            self.wte = narrow_weight(self, (hparams.n_vocab, hparams.n_embd), False, normal(0.02), "wte",
                                     self.weight_dtype)
        else:
            self.wte = self.add_weight(shape=(hparams.n_vocab, hparams.n_embd), initializer=normal(0.02), name="wte")
        self.wpe = self.add_weight(shape=(hparams.n_ctx, hparams.n_embd), initializer=normal(0.01), name="wpe")
        with keras.name_scope(self.name):
            self.embedding_dropout = keras.layers.Dropout(dropout)
            self.blocks = [Block(hparams.n_embd, hparams.n_head, dropout, normal(0.02), self.weight_dtype,
                                 name=f"h{i}", dtype=self.dtype_policy) for i in range(hparams.n_layer)]
            self.ln_f = LayerNorm(hparams.n_embd, name="ln_f", dtype=self.dtype_policy)

    @property
    def default_jit_compile(self):
        """Whether the compiled sampler and scorer use XLA by default: yes in float32; no in
        bfloat16, where XLA's CPU dots are several times slower than oneDNN's."""
        return tf.as_dtype(self.compute_dtype) == tf.float32

    @property
    def cache_dtype(self) -> tf.DType:
        """The dtype the samplers hold the key/value cache in: 16-bit for 16-bit models (bfloat16
        under the bfloat16 policies, float16 for float16 weights), float32 otherwise (float32, int8).
        Attention reads it back as float32."""
        return tf.float16 if self.weight_dtype == "float16" else tf.as_dtype(self.compute_dtype)

    def get_config(self):
        config = {"hparams": dataclasses.asdict(self.hparams), "dropout": self.dropout_rate, "name": self.name,
                  "dtype": keras.saving.serialize_keras_object(self.dtype_policy), "trainable": self.trainable}
        if self.weight_dtype != "float32":
            config["weight_dtype"] = self.weight_dtype
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):
            dtype = keras.saving.deserialize_keras_object(dtype)
        return cls(cls.HPARAMS.from_dict(config.pop("hparams")), dtype=dtype, random_init=False, **config)

    # Keras export. A subclassed model records no input signature until it is called, so both
    # export paths are given `tokens` int32 [b, s]; outputs are those of `call` (logits, present).

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `Model.export`, its `serve(tokens)` returning `model(tokens)`."""
        return super().export(filepath, format=format, verbose=verbose,
                              input_signature=[TOKENS_SPEC] if input_signature is None else input_signature, **kwargs)

    @tf.function(input_signature=[TOKENS_SPEC], autograph=False)
    def serve(self, tokens):
        """`model(tokens)` for int32 tokens [b, s] as a tf.function: `tf.saved_model.save(model, DIR)`
        saves it as `serve` and as the `serving_default` signature."""
        return self(tokens)

    def embed(self, tokens, positions):
        """tokens, positions: int [...] -> float32 [..., e]."""
        words = self.wte.gather(tokens) if isinstance(self.wte, NarrowKernel) else tf.gather(self.wte, tokens)
        x = words + tf.gather(self.wpe, positions)
        return tf.cast(x, tf.float32) if x.dtype != tf.float32 else x

    def block_step(self, x, weights, batch, dtype, attention, dropout=None):
        """The block step (gpt2.layers.block, GPT2ML's ml_block) on x float32 [b * s, e] with one
        block's `inference_weights()`; see gpt2.layers.block. Returns (x, k, v)."""
        return self.BLOCK.function(x, weights, batch, self.hparams.n_head, dtype, attention, dropout)

    def final(self, x):
        """The last block's output [..., e] -> the hidden states the logits read (GPT-2: ln_f)."""
        return self.ln_f.call(x)

    def checkpoint_variables(self):
        """{name in the folder format's checkpoint: Keras variable} (OpenAI's names)."""
        from gpt2.formats.base import model_variables

        return model_variables(self)

    def logits(self, h, few_rows=False):
        """Hidden states after ln_f [..., e] -> float32 logits [..., V] (tied to the token embedding).
        few_rows: h holds a handful of rows (a speculative verification pass); the float product is
        then (wte h^T)^T, since TensorFlow's CPU product of [n, e] (1 < n) by wte^T copies the whole
        transposed embedding first (154 MB for 124M, ~0.5 s) on every call, and this reads wte as it lies."""
        dtype = self.compute_dtype
        flat = tf.reshape(h, [-1, h.shape[-1]])
        if isinstance(self.wte, NarrowKernel):
            logits = narrow_matmul(flat, *self.wte.tensors())  # reads wte's rows as they lie either way
        else:
            wte = self.wte if self.wte.dtype == dtype else tf.cast(self.wte, dtype)
            flat = flat if flat.dtype == dtype else tf.cast(flat, dtype)
            logits = tf.transpose(matmul(wte, flat, transpose_b=True)) if few_rows else matmul(flat, wte,
                                                                                                  transpose_b=True)
        return tf.reshape(logits, tf.concat([tf.shape(h)[:-1], [self.hparams.n_vocab]], 0))

    def __call__(self, tokens, past=None, *args, **kwargs):
        # Checked before Keras' __call__, which would wrap the error in a many-line report.
        seq = getattr(tokens, "shape", np.shape(tokens))
        past_len = 0 if past is None else getattr(past, "shape", np.shape(past))[-2]
        if len(seq) == 2 and seq[1] is not None and past_len is not None and seq[1] + past_len > self.hparams.n_ctx:
            raise ValueError(f"{seq[1] + past_len} positions do not fit the model's context of {self.hparams.n_ctx} "
                             "tokens; shorten the input (gpt2.perplexity scores longer texts)")
        return super().__call__(tokens, past, *args, **kwargs)

    def call(self, tokens, past=None, return_hidden_states=False, training=None):
        """tokens: int [b, s]; past: [b, L, 2, h, t_past, d] or None (see class docstring)."""
        if training:
            self.check_trainable("training")
        tokens = tf.convert_to_tensor(tokens)
        if tokens.dtype not in (tf.int32, tf.int64):
            tokens = tf.cast(tokens, tf.int32)
        batch, seq = tf.shape(tokens)[0], tf.shape(tokens)[1]
        past_len = 0 if past is None else tf.shape(past)[-2]
        positions = past_len + tf.range(seq)
        x = self.embedding_dropout.call(self.embed(tokens, positions[None]), training=training)
        x = tf.reshape(x, [-1, self.hparams.n_embd])
        hidden_states = [x]
        presents = []
        for i, block in enumerate(self.blocks):
            if self.recompute and training and past is None:  # fine-tuning hook, see `recompute`
                x, present = _recomputed(block, batch)(x)
            else:
                x, present = block.call(x, batch, past=None if past is None else past[:, i], training=training)
            presents.append(present)
            hidden_states.append(x)
        h = self.final(x)
        outputs = {"logits": tf.reshape(self.logits(h), [batch, seq, self.hparams.n_vocab]),
                   "present": tf.stack(presents, axis=1)}
        if return_hidden_states:
            outputs["hidden_states"] = [tf.reshape(state, [batch, seq, self.hparams.n_embd]) for state in hidden_states]
        return outputs

    def check_trainable(self, purpose="training"):
        """Raises a one-line ValueError if the weights cannot be trained (int8, float16)."""
        if self.weight_dtype != "float32":
            raise ValueError(f"{purpose} needs trainable weights and this model holds {self.weight_dtype} weights "
                             "(inference only); load it with dtype='float32' (or bfloat16)")

    # Fine-tuning hook (gpt2/train): when set, calls with training=True keep only each block's
    # input and recompute its activations in the backward pass (gradient checkpointing).
    recompute = False

    def next_token_loss(self, tokens, training=None):
        """Mean next-token cross-entropy of int tokens [b, s] (s >= 2): position t predicts t + 1."""
        tokens = tf.convert_to_tensor(tokens)
        return next_token_cross_entropy(tokens, self(tokens, training=training)["logits"])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras `fit`/`evaluate` hook: the next-token loss of int token windows x [b, s] from the
        model's output on them, so `model.compile(optimizer=...)` + `model.fit(windows)` trains."""
        return next_token_cross_entropy(x, y_pred["logits"])

    # Keras' Trainer assigns `self.loss` (None, or compile()'s loss argument), which would hide a
    # plain `loss` method; this property keeps `model.loss(tokens)` working and stores what Keras sets.
    @property
    def loss(self):
        """`model.loss(tokens)`: the mean next-token cross-entropy (see `next_token_loss`)."""
        return self.next_token_loss

    @loss.setter
    def loss(self, compiled_loss):
        self._compiled_loss_argument = compiled_loss


@keras.saving.register_keras_serializable(package="gpt2")
class GPT2ML(GPT2):
    """GPT2-ML (imcaspar/gpt2-ml, Grover's model): GPT2's interface and drivers with its own steps:
    LayerNorm'ed embeddings (`embed`), gpt2.layers.ml_block, no final LayerNorm, logits tied to
    word_embed. Keras paths are Grover's TF1 variable names (`newslm/layer00/query_layer/kernel`,
    ...): the checkpoint loads and saves by name."""

    HPARAMS = GPT2MLHParams
    BLOCK = MLBlock

    def __init__(self, hparams, dropout=0.0, random_init=True, name="newslm", **kwargs):
        super().__init__(hparams, dropout=dropout, random_init=random_init, name=name, **kwargs)

    def _make_layers(self, hparams, dropout, normal):
        with keras.name_scope(self.name):
            self.embeddings = _MLEmbeddings(hparams, normal, name="embeddings", dtype=self.dtype_policy)
            self.embedding_dropout = keras.layers.Dropout(dropout)
            self.blocks = [MLBlock(hparams.n_embd, hparams.n_head, hparams.n_inner, dropout, normal(0.02),
                                   name=f"layer{i:02d}", dtype=self.dtype_policy) for i in range(hparams.n_layer)]

    @property
    def wte(self):
        return self.embeddings.word_embed

    @property
    def wpe(self):
        return self.embeddings.pos_embed

    def embed(self, tokens, positions):
        """tokens, positions: int [...] -> float32 LayerNorm(word_embed[tokens] + pos_embed[positions]) [..., e]."""
        norm = self.embeddings.norm
        return layer_norm(super().embed(tokens, positions), norm.g, norm.b, norm.epsilon)

    def final(self, x):
        return x

    def checkpoint_variables(self):
        """{Grover's variable name: Keras variable}: the Keras paths are those names."""
        return {variable.path: variable for variable in self.weights}


class _MLEmbeddings(keras.layers.Layer):
    """GPT2-ML's `embeddings` scope: word_embed [V, e], pos_embed [n_ctx, e], LayerNorm_embed_norm."""

    def __init__(self, hparams, normal, **kwargs):
        super().__init__(**kwargs)
        e = hparams.n_embd
        self.word_embed = self.add_weight(shape=(hparams.n_vocab, e), initializer=normal(0.02), name="word_embed")
        self.pos_embed = self.add_weight(shape=(hparams.n_ctx, e), initializer=normal(0.02), name="pos_embed")
        with keras.name_scope(self.name):
            self.norm = LayerNorm(e, weight_names=("gamma", "beta"), name="LayerNorm_embed_norm",
                                  dtype=self.dtype_policy)
        self.built = True


def model_class(hparams):
    """The model class of an HParams: GPT2ML for GPT2MLHParams, else GPT2."""
    return GPT2ML if isinstance(hparams, GPT2MLHParams) else GPT2


def next_token_cross_entropy(tokens, logits):
    """Mean cross-entropy of logits [b, s, V] at position t against tokens [b, s] at t + 1, in float32."""
    logits = tf.cast(logits[:, :-1], tf.float32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=logits))


def _recomputed(block, batch):
    """`block` as x [b * s, e] -> (x, present) for training, its activations recomputed in the
    backward pass (tf.recompute_grad). Dropout masks come from seed generators that advance on
    each call; they are reset to their forward-pass state so the recomputation draws the same masks."""
    generators = [layer.seed_generator for layer in block._flatten_layers()
                  if getattr(layer, "seed_generator", None) is not None]
    states = [tf.identity(generator.state.value) for generator in generators]  # read now

    def run(x):
        for generator, state in zip(generators, states):
            generator.state.assign(state)
        return block.call(x, batch, training=True)

    return tf.recompute_grad(run)
