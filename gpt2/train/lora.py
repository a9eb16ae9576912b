"""Low-rank adapters (LoRA) on GPT-2's projections: c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj
(GPT2-ML's blocks: query_layer, key_layer, value_layer, context_projection_layer, intermediate, output).

An adapted projection computes x @ w + b + (x @ a @ b_lora) * scale with a [n_in, r] drawn from
U(-1/sqrt(n_in), 1/sqrt(n_in)), b_lora [r, n_out] starting at zero (so training starts from the
unchanged model) and scale = alpha / r. Only the adapters train; `merge` folds them into w, so the
saved model is a plain checkpoint of its kind.

Shapes: n_in, n_out = the projection's input and output widths, r = rank.
"""

import contextlib

import numpy as np
import tensorflow as tf

# The projections that get adapters, by their path inside a block (GPT-2's; GPT2-ML's: ML_TARGETS).
TARGETS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
ML_TARGETS = ("query_layer", "key_layer", "value_layer", "context_projection_layer", "intermediate", "output")


class Adapter:
    """One projection's adapter: Keras variables `a` [n_in, r], `b` [r, n_out] and `scale`.

    A plain object on purpose: Keras does not track it, so the model's own weights (and the
    OpenAI variable list) stay exactly GPT-2's."""

    def __init__(self, a, b, scale):
        self.a, self.b, self.scale = a, b, scale


def projections(model):
    """(path, Conv1D) of every adaptable projection, e.g. ('h0/attn/c_attn', layer); a GPT2-ML
    model's all six of each block, e.g. ('layer00/query_layer', layer)."""
    from gpt2.layers import MLBlock

    found = []
    for i, block in enumerate(model.blocks):
        if isinstance(block, MLBlock):
            layers = dict(zip(ML_TARGETS, [*block.projections, block.intermediate, block.output_layer]))
            found += [(f"{block.name}/{path}", layers[path]) for path in ML_TARGETS]
            continue
        layers = {"attn/c_attn": block.attn.c_attn, "attn/c_proj": block.attn.c_proj,
                  "mlp/c_fc": block.mlp.c_fc, "mlp/c_proj": block.mlp.c_proj}
        found += [(f"h{i}/{path}", layers[path]) for path in TARGETS]
    return found


def add_adapters(model, rank, alpha=None, seed=0):
    """Adds rank-`rank` adapters to every projection of `model` (create the model and call this
    under the same tf.distribute strategy scope). alpha defaults to rank (scale 1). Returns the
    adapter variables, the only ones to train."""
    import keras

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.check_trainable("a LoRA adapter")
    scale = float(alpha if alpha is not None else rank) / rank
    rng = np.random.default_rng([seed, rank])
    variables = []
    for path, layer in projections(model):
        if layer.lora is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        n_in, n_out = layer.w.shape
        bound = 1.0 / np.sqrt(n_in)
        a = keras.Variable(rng.uniform(-bound, bound, (n_in, rank)).astype(np.float32), name="lora_a")
        b = keras.Variable(np.zeros((rank, n_out), np.float32), name="lora_b")
        layer.lora = Adapter(a, b, scale)
        variables += [a, b]
    return variables


def adapter_variables(model):
    """The adapter variables of `model` ([] without adapters), in a fixed order."""
    return [v for _, layer in projections(model) if layer.lora is not None for v in (layer.lora.a, layer.lora.b)]


def merge(model):
    """Folds every adapter into its projection's weights (w += a @ b * scale) and removes it:
    the model computes the same logits and is a plain GPT-2 again."""
    for _, layer in projections(model):
        if layer.lora is not None:
            lora = layer.lora
            layer.w.assign_add(tf.matmul(tf.convert_to_tensor(lora.a), tf.convert_to_tensor(lora.b)) * lora.scale)
            layer.lora = None


@contextlib.contextmanager
def merged(model, restore_weights=None):
    """Within the block, `model` holds the merged weights and no adapters (e.g. to save it);
    afterwards the adapters and the exact weights are back: restore_weights(list of (path, Conv1D))
    puts back those layers' weights (e.g. from their checkpoint), else they wait in host memory."""
    adapted = [(path, layer) for path, layer in projections(model) if layer.lora is not None]
    saved = None if restore_weights is not None else [layer.w.numpy() for _, layer in adapted]
    adapters = [layer.lora for _, layer in adapted]
    merge(model)
    try:
        yield model
    finally:
        if saved is not None:
            for (_, layer), value in zip(adapted, saved):
                layer.w.assign(value)
        else:
            restore_weights(adapted)
        for (_, layer), adapter in zip(adapted, adapters):
            layer.lora = adapter
