"""GPT-2 as a Keras model: embeddings, n_layer pre-LN blocks, final LayerNorm, tied output logits.

b = batch, s = positions in this call, e = n_embd, h = n_head, d = head_dim, L = n_layer, V = n_vocab.
"""

import keras
import tensorflow as tf

from gpt2.hparams import HParams
from gpt2.layers import Block, LayerNorm


class GPT2(keras.Model):
    """OpenAI's GPT-2.

    `model(tokens, past=None)` returns a dict like OpenAI's `model.model`: `logits` [b, s, V] and
    `present` [b, L, 2, h, s, d] (keys and values of this call, to pass back as `past`). With
    `return_hidden_states=True` it also holds `hidden_states`: L + 1 tensors [b, s, e], the
    embeddings and the output of each block (before the final LayerNorm).

    `dropout` (embeddings, attention and MLP outputs) applies only when called with
    `training=True`. Weights start as OpenAI's initialisation (normal, std 0.02; wpe 0.01);
    `random_init=False` starts them at zero instead, for weights that are about to be loaded.
    """

    def __init__(self, hparams, dropout=0.0, random_init=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(hparams, HParams):
            raise TypeError(f"GPT2 expects gpt2.HParams, got {type(hparams).__name__}")
        self.hparams = hparams

        def normal(stddev):
            return keras.initializers.RandomNormal(stddev=stddev) if random_init else "zeros"

        self.wte = self.add_weight(shape=(hparams.n_vocab, hparams.n_embd), initializer=normal(0.02), name="wte")
        self.wpe = self.add_weight(shape=(hparams.n_ctx, hparams.n_embd), initializer=normal(0.01), name="wpe")
        self.embedding_dropout = keras.layers.Dropout(dropout)
        self.blocks = [
            Block(hparams.n_embd, hparams.n_head, dropout, normal(0.02), name=f"h{i}")
            for i in range(hparams.n_layer)
        ]
        self.ln_f = LayerNorm(hparams.n_embd, name="ln_f")
        self.built = True

    def _embed(self, tokens, positions):
        """tokens, positions: int [b, s] -> [b, s, e]."""
        return tf.gather(self.wte, tokens) + tf.gather(self.wpe, positions)

    def logits(self, h):
        """Hidden states after ln_f [..., e] -> logits [..., V] (output tied to the token embedding)."""
        return tf.matmul(h, self.wte, transpose_b=True)

    def call(self, tokens, past=None, return_hidden_states=False, training=None):
        """tokens: int [b, s]; past: [b, L, 2, h, t_past, d] or None (see class docstring)."""
        tokens = tf.convert_to_tensor(tokens)
        batch, seq = tf.shape(tokens)[0], tf.shape(tokens)[1]
        past_len = 0 if past is None else tf.shape(past)[-2]
        positions = tf.broadcast_to(past_len + tf.range(seq), [batch, seq])
        x = self.embedding_dropout(self._embed(tokens, positions), training=training)
        hidden_states = [x]
        presents = []
        for i, block in enumerate(self.blocks):
            if self.recompute and training and past is None:  # fine-tuning hook, see `recompute`
                x, present = _recomputed(block)(x)
                presents.append(present)
                hidden_states.append(x)
                continue
            x, present = block(x, past=None if past is None else past[:, i], training=training)
            presents.append(present)
            hidden_states.append(x)
        outputs = {
            "logits": self.logits(self.ln_f(x)),
            "present": tf.stack(presents, axis=1),
        }
        if return_hidden_states:
            outputs["hidden_states"] = hidden_states
        return outputs

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

    def empty_cache(self, batch, length):
        """A zeroed key/value cache for `call_cached`: per layer (keys, values), each [b, h, length, d]."""
        shape = [batch, self.hparams.n_head, length, self.hparams.head_dim]
        return tuple((tf.zeros(shape), tf.zeros(shape)) for _ in self.blocks)

    def call_cached(self, tokens, positions, cache, index, mask):
        """One forward pass against a fixed-shape cache, for compiled decoding.

        tokens, positions: int [b, s]; cache: from `empty_cache`; new keys/values go to slots
        index..index+s-1; mask: bool [b, 1, s, cache_len], True where a query may see a slot.
        Returns (hidden states after ln_f [b, s, e], updated cache). Apply `logits` to the rows needed.
        """
        x = self._embed(tokens, positions)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.call_cached(x, layer_cache, index, mask)
            new_cache.append(layer_cache)
        return self.ln_f.call(x), tuple(new_cache)


def next_token_cross_entropy(tokens, logits):
    """Mean cross-entropy of logits [b, s, V] at position t against tokens [b, s] at t + 1, in float32."""
    logits = tf.cast(logits[:, :-1], tf.float32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=logits))


def _recomputed(block):
    """`block` as x [b, s, e] -> (x, present) for training, its activations recomputed in the
    backward pass (tf.recompute_grad). Dropout masks come from seed generators that advance on
    each call; they are reset to their forward-pass state so the recomputation draws the same masks."""
    generators = [layer.seed_generator for layer in block._flatten_layers()
                  if getattr(layer, "seed_generator", None) is not None]
    states = [tf.identity(generator.state.value) for generator in generators]  # read now

    def run(x):
        for generator, state in zip(generators, states):
            generator.state.assign(state)
        return block(x, training=True)

    return tf.recompute_grad(run)
