"""Reads and writes OpenAI's original GPT-2 checkpoint folders, with no conversion step; also
loads Hugging Face GPT-2 folders (gpt2.hf) through the same `load_model`.

A model folder holds `hparams.json`, a `checkpoint` state file naming the prefix (`model.ckpt`), and
the TF checkpoint `model.ckpt.index` + `model.ckpt.data-00000-of-00001` with variables named
`model/wte`, `model/wpe`, `model/h{i}/ln_1/g`, `model/h{i}/attn/c_attn/w` ([1, n_embd, 3 n_embd]),
..., `model/ln_f/b`. OpenAI's `model.ckpt.meta` (a TF1 graph) is neither needed nor written.

    python -m gpt2.checkpoint --random 124M DIR [--seed 0]   # random weights, real shape
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile

import numpy as np

from gpt2.hparams import OLD_NAMES, PRESETS, HParams

CHECKPOINT_PREFIX = "model.ckpt"
DATA_FILE = CHECKPOINT_PREFIX + ".data-00000-of-00001"
INDEX_FILE = CHECKPOINT_PREFIX + ".index"


class CheckpointError(ValueError):
    """A model folder that cannot be read: the message says which file and what to do."""


def variable_shapes(hparams):
    """OpenAI's variable names and shapes for `hparams`, in the order OpenAI's model creates them."""
    e = hparams.n_embd
    shapes = {"model/wpe": [hparams.n_ctx, e], "model/wte": [hparams.n_vocab, e]}
    for i in range(hparams.n_layer):
        prefix = f"model/h{i}/"
        shapes.update({
            prefix + "ln_1/g": [e], prefix + "ln_1/b": [e],
            prefix + "attn/c_attn/w": [1, e, 3 * e], prefix + "attn/c_attn/b": [3 * e],
            prefix + "attn/c_proj/w": [1, e, e], prefix + "attn/c_proj/b": [e],
            prefix + "ln_2/g": [e], prefix + "ln_2/b": [e],
            prefix + "mlp/c_fc/w": [1, e, 4 * e], prefix + "mlp/c_fc/b": [4 * e],
            prefix + "mlp/c_proj/w": [1, 4 * e, e], prefix + "mlp/c_proj/b": [e],
        })
    shapes.update({"model/ln_f/g": [e], "model/ln_f/b": [e]})
    return shapes


def model_variables(model):
    """Maps each OpenAI variable name to the model's Keras variable."""
    variables = {"model/wte": model.wte, "model/wpe": model.wpe}
    for i, block in enumerate(model.blocks):
        layers = {
            "ln_1": block.ln_1, "attn/c_attn": block.attn.c_attn, "attn/c_proj": block.attn.c_proj,
            "ln_2": block.ln_2, "mlp/c_fc": block.mlp.c_fc, "mlp/c_proj": block.mlp.c_proj,
        }
        for path, layer in layers.items():
            for weight in ("w", "b") if hasattr(layer, "w") else ("g", "b"):
                variables[f"model/h{i}/{path}/{weight}"] = getattr(layer, weight)
    variables["model/ln_f/g"] = model.ln_f.g
    variables["model/ln_f/b"] = model.ln_f.b
    return variables


def resolve_model_dir(name_or_dir, models_dir="models"):
    """A folder path as given, else `models_dir/<name>` (old names 117M/345M map to 124M/355M)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    name = OLD_NAMES.get(name_or_dir, name_or_dir)
    model_dir = os.path.join(models_dir, name)
    if os.path.isdir(model_dir):
        return model_dir
    hint = (
        f"download it with: python download_model.py {name} --models-dir {models_dir}"
        if name in PRESETS
        else f"known models: {', '.join(PRESETS)}, or pass a model folder"
    )
    raise FileNotFoundError(f"model {name_or_dir!r} not found (looked in {model_dir}); {hint}")


def _checkpoint_prefix(model_dir):
    """The prefix named by `model_dir/checkpoint`, with its index and data files present."""
    state_file = os.path.join(model_dir, "checkpoint")
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{state_file}: checkpoint state file not found; is {model_dir} a GPT-2 model folder?")
    prefix = None
    with open(state_file, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model_checkpoint_path":
                prefix = value.strip().strip('"')
    if not prefix:
        raise CheckpointError(f"{state_file}: no model_checkpoint_path line")
    prefix = prefix if os.path.isabs(prefix) else os.path.join(model_dir, prefix)
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointError(f"{prefix}.index: checkpoint index not found; download the model again")
    if not glob.glob(glob.escape(prefix) + ".data-*"):
        raise CheckpointError(f"{prefix}.data-00000-of-00001: checkpoint data not found; download the model again")
    return prefix


def _read_index(prefix):
    import tensorflow as tf

    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        message = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{prefix}.index: unreadable ({message}); download the model again") from None


def check_model_dir(model_dir):
    """Checks a model folder without reading the weights; returns its HParams.

    hparams.json must parse, and the checkpoint index must hold exactly the variables and shapes
    that those hparams imply (a fine-tuned model of any shape passes). Raises CheckpointError (or
    FileNotFoundError/ValueError from hparams) with every problem listed in one line. A Hugging
    Face folder gets the same checks of its config.json and safetensors headers.
    """
    if _is_hf_dir(model_dir):
        with open_weights(model_dir) as weights:
            return weights.hparams
    hparams = HParams.from_json(os.path.join(model_dir, "hparams.json"))
    prefix = _checkpoint_prefix(model_dir)
    reader = _read_index(prefix)
    found = reader.get_variable_to_shape_map()
    expected = variable_shapes(hparams)
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{name} {list(found[name])} (expected {expected[name]})"
        for name in sorted(set(expected) & set(found))
        if list(found[name]) != expected[name]
    ]
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if misshaped:
        problems.append(f"wrong shape: {', '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"{prefix}: does not match {model_dir}/hparams.json: {'; '.join(problems)}")
    _check_data_size(prefix, expected)
    return hparams


def _check_data_size(prefix, shapes):
    """A data file smaller than the float32 tensors it must hold was cut short."""
    data_files = glob.glob(glob.escape(prefix) + ".data-*")
    size = sum(os.path.getsize(path) for path in data_files)
    needed = 4 * sum(int(np.prod(shape)) for shape in shapes.values())
    if size < needed:
        raise CheckpointError(
            f"{data_files[0]}: truncated ({size} bytes, the variables need {needed}); download the model again"
        )


def load_model(name_or_dir, models_dir="models", dropout=0.0, dtype=None):
    """Loads a GPT-2 folder (`name_or_dir` is a folder, or a name under `models_dir`) in OpenAI's
    layout or Hugging Face's (config.json + model.safetensors, see gpt2.hf).

    Returns a `gpt2.GPT2` with the folder's weights, `dropout` (applied when called with
    training=True, e.g. to fine-tune) and Keras dtype policy `dtype` (e.g. "mixed_bfloat16" to
    train with bfloat16 compute and float32 weights; None = float32). The model starts zeroed (no random draws)
    and each tensor is read and handed to its variable one at a time: loading holds the weights
    once plus the largest single tensor (twice that tensor for a Hugging Face folder, which is
    read into NumPy first).
    """
    import tensorflow as tf

    from gpt2.model import GPT2

    model_dir = resolve_model_dir(name_or_dir, models_dir)
    with open_weights(model_dir) as weights:
        model = GPT2(weights.hparams, dropout=dropout, random_init=False, dtype=dtype)
        for name, variable in model_variables(model).items():
            # Holding `value` during the assign makes TensorFlow copy it into the variable's own
            # buffer rather than adopt it, so the buffer freed is the value's (returned at once).
            value = _as_tensor(weights.read(name))
            variable.assign(tf.reshape(value, variable.shape))
            del value
    return model


def _as_tensor(value):
    """A TensorFlow tensor of `value`, copied once. tf.convert_to_tensor copies a NumPy array
    twice; a 64-byte aligned float32 array (what the Hugging Face reader returns) is instead
    wrapped through DLPack without a copy and then copied into TensorFlow's own memory."""
    import tensorflow as tf

    if (isinstance(value, np.ndarray) and value.dtype == np.float32 and value.flags.c_contiguous
            and value.flags.writeable and value.ctypes.data % 64 == 0):
        shared = tf.experimental.dlpack.from_dlpack(value.__dlpack__())
        return tf.raw_ops.Snapshot(input=shared)  # `shared` is held, so Snapshot copies
    return tf.convert_to_tensor(value)


def open_weights(model_dir):
    """The weights of a model folder in either layout, checked but not yet read: an object with
    `hparams`, `read(name)` (OpenAI variable name -> float32 tensor of its variable_shapes shape)
    and `close()`; a context manager. A Hugging Face folder needs the safetensors package."""
    if _is_hf_dir(model_dir):
        from gpt2.hf import HFTensors

        return HFTensors(model_dir)
    return _OpenAIWeights(model_dir)


class _OpenAIWeights:
    """OpenAI's checkpoint as a tensor source (see open_weights): each read restores one tensor
    straight into TensorFlow memory."""

    def __init__(self, model_dir):
        self.hparams = check_model_dir(model_dir)
        self._prefix = _checkpoint_prefix(model_dir)

    def read(self, name):
        import tensorflow as tf

        try:
            (value,) = tf.raw_ops.RestoreV2(
                prefix=self._prefix, tensor_names=[name], shape_and_slices=[""], dtypes=[tf.float32]
            )
        except tf.errors.OpError as error:
            message = str(error).strip().splitlines()[0]
            raise CheckpointError(f"{self._prefix}: cannot read {name} ({message}); download the model again") from None
        return value

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _is_hf_dir(model_dir):
    from gpt2.hf import is_hf_dir

    return is_hf_dir(model_dir)


def read_hparams(model_dir):
    """The HParams of a model folder in either layout, from hparams.json or config.json alone
    (no weights read, no TensorFlow)."""
    if _is_hf_dir(model_dir):
        from gpt2.hf import read_hparams as read_hf_hparams

        return read_hf_hparams(model_dir)
    return HParams.from_json(os.path.join(model_dir, "hparams.json"))


def save_checkpoint(model, model_dir):
    """Writes `model` as an OpenAI GPT-2 folder: hparams.json, checkpoint, model.ckpt.{index,data}.

    Files are written to a temporary folder first and moved into place, so an interrupted save
    never leaves a half-written checkpoint under the final names.
    """
    values = {name: variable.value for name, variable in model_variables(model).items()}
    shapes = variable_shapes(model.hparams)
    _write_checkpoint(model.hparams, model_dir, lambda name: _reshape(values[name], shapes[name]))


def _reshape(tensor, shape):
    import tensorflow as tf

    return tf.reshape(tensor, shape)


def write_random_checkpoint(preset_or_hparams, model_dir, seed=0):
    """Writes a checkpoint of a preset shape ('124M', ...) or HParams with random weights, for
    benchmarks and tests where the released weights are not available."""
    hparams = PRESETS[preset_or_hparams] if isinstance(preset_or_hparams, str) else preset_or_hparams
    rng = np.random.default_rng(seed)

    def random_value(name):
        shape = variable_shapes(hparams)[name]
        if name.endswith("/g"):
            return np.ones(shape, np.float32)
        if name.endswith("/b"):
            return np.zeros(shape, np.float32)
        scale = 0.01 if name == "model/wpe" else 0.02
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    _write_checkpoint(hparams, model_dir, random_value)


def _write_checkpoint(hparams, model_dir, value_of):
    import tensorflow as tf

    os.makedirs(model_dir, exist_ok=True)
    names = list(variable_shapes(hparams))
    staging = tempfile.mkdtemp(prefix=".saving-", dir=model_dir)
    try:
        tf.raw_ops.SaveV2(
            prefix=os.path.join(staging, CHECKPOINT_PREFIX),
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[value_of(name) for name in names],
        )
        hparams.to_json(os.path.join(staging, "hparams.json"))
        with open(os.path.join(staging, "checkpoint"), "w", encoding="utf-8") as f:
            f.write(f'model_checkpoint_path: "{CHECKPOINT_PREFIX}"\n')
            f.write(f'all_model_checkpoint_paths: "{CHECKPOINT_PREFIX}"\n')
        # The state file goes last: until it is replaced, the old checkpoint (if any) stays whole.
        for name in (DATA_FILE, INDEX_FILE, "hparams.json", "checkpoint"):
            os.replace(os.path.join(staging, name), os.path.join(model_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gpt2.checkpoint",
        description="Write a GPT-2 checkpoint with random weights in OpenAI's layout.",
    )
    parser.add_argument("--random", metavar="SHAPE", required=True, choices=sorted(PRESETS),
                        help="preset shape: " + ", ".join(PRESETS))
    parser.add_argument("model_dir", help="folder to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        write_random_checkpoint(args.random, args.model_dir, seed=args.seed)
    except OSError as error:
        sys.exit(f"error: {error}")
    print(f"wrote a random {args.random} checkpoint to {args.model_dir}")


if __name__ == "__main__":
    main()
