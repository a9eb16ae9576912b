"""Reads and writes OpenAI's original GPT-2 checkpoint folders, with no conversion step; also
loads Hugging Face GPT-2 folders (gpt2.hf) through the same `load_model`.

A model folder holds `hparams.json`, a `checkpoint` state file naming the prefix (`model.ckpt`), and
the TF checkpoint `model.ckpt.index` + `model.ckpt.data-00000-of-00001` with variables named
`model/wte`, `model/wpe`, `model/h{i}/ln_1/g`, `model/h{i}/attn/c_attn/w` ([1, n_embd, 3 n_embd]),
..., `model/ln_f/b`. OpenAI's `model.ckpt.meta` (a TF1 graph) is neither needed nor written.

    python -m gpt2.checkpoint --random 124M DIR [--seed 0]   # random weights, real shape
"""

import argparse
import atexit
import contextlib
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

from gpt2 import compile_cache
from gpt2.cli import current_umask, quiet_tensorflow
from gpt2.hparams import OLD_NAMES, PRESETS, HParams, summarize

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
    with open(state_file, "rb") as f:
        data = f.read(1 << 20)  # a state file is a few lines
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{state_file}: not a checkpoint state file (binary data, not UTF-8 text at byte {error.start}); "
            f'it should hold a line model_checkpoint_path: "model.ckpt"; download the model again'
        ) from None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            prefix = value.strip().strip('"')
    if not prefix:
        raise CheckpointError(f"{state_file}: no model_checkpoint_path line")
    prefix = prefix if os.path.isabs(prefix) else os.path.join(model_dir, prefix)
    for path in [prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-*")]:
        if os.path.exists(path) and not os.path.isfile(path):
            raise CheckpointError(f"{path}: is a folder, not a checkpoint file; download the model again")
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointError(f"{prefix}.index: checkpoint index not found; download the model again")
    if not glob.glob(glob.escape(prefix) + ".data-*"):
        raise CheckpointError(f"{prefix}.data-00000-of-00001: checkpoint data not found; download the model again")
    return prefix


def _read_index(prefix):
    import tensorflow as tf

    try:
        return tf.train.load_checkpoint(_tf_prefix(prefix))
    except (tf.errors.OpError, ValueError) as error:
        message = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{prefix}.index: unreadable ({message}); download the model again") from None


# Characters TensorFlow's checkpoint ops read as a glob pattern in a prefix (they look the index up
# with GetMatchingPaths), so a folder such as "finetune[v2]" would not match itself.
_GLOB_CHARS = "*?[" if os.name == "nt" else "*?[\\"
_aliases = {}  # prefix -> the same checkpoint through links in a temporary folder


def _tf_prefix(prefix):
    """`prefix` as TensorFlow's checkpoint ops can read it: unchanged, unless it holds glob
    characters; then links to its files in a temporary folder (removed at exit) stand in for it."""
    if not any(char in prefix for char in _GLOB_CHARS):
        return prefix
    if prefix in _aliases and os.path.exists(_aliases[prefix] + ".index"):
        return _aliases[prefix]
    alias_dir = tempfile.mkdtemp(prefix="gpt2-checkpoint-")
    atexit.register(shutil.rmtree, alias_dir, True)
    alias = os.path.join(alias_dir, CHECKPOINT_PREFIX)
    for path in [prefix + ".index", *glob.glob(glob.escape(prefix) + ".data-*")]:
        target = alias + path[len(prefix):]
        try:
            os.symlink(os.path.abspath(path), target)
        except OSError:
            try:
                os.link(path, target)
            except OSError as error:
                raise CheckpointError(
                    f"{prefix}: TensorFlow cannot read a checkpoint whose path holds any of {_GLOB_CHARS} "
                    f"and no link to it can be made here ({error.strerror or error}); rename the folder"
                ) from None
    _aliases[prefix] = alias
    return alias


# A TF1 training run (OpenAI's train.py forks, gpt-2-simple) saves its optimizer's state beside the
# weights: per weight W the slots W/Adam and W/Adam_1 (or another optimizer's), and its counters.
OPTIMIZER_SLOT_SUFFIXES = ("/Adam", "/Adam_1", "/Momentum", "/RMSProp", "/RMSProp_1", "/Adagrad")
OPTIMIZER_COUNTERS = ("beta1_power", "beta2_power", "global_step")


def optimizer_slots(names, weights):
    """The names among `names` that are a training run's optimizer slots of `weights`, or its counters."""
    return sorted(
        name for name in names
        if name in OPTIMIZER_COUNTERS
        or any(name.endswith(suffix) and name[: -len(suffix)] in weights for suffix in OPTIMIZER_SLOT_SUFFIXES)
    )


def check_model_dir(model_dir, skip_optimizer_slots=False):
    """Checks a model folder without reading the weights; returns its HParams.

    hparams.json must parse, and the checkpoint index must hold exactly the variables and shapes
    that those hparams imply (a fine-tuned model of any shape passes); with `skip_optimizer_slots`
    a training run's optimizer slots beside them (W/Adam, W/Adam_1, beta1_power, ...) are allowed
    and ignored. Raises CheckpointError (or FileNotFoundError/ValueError from hparams) with every
    problem listed in one line. A Hugging Face folder gets the same checks of its config.json and
    safetensors headers.
    """
    if _is_hf_dir(model_dir):
        with open_weights(model_dir) as weights:
            return weights.hparams
    hparams = HParams.from_json(os.path.join(model_dir, "hparams.json"))
    prefix = _checkpoint_prefix(model_dir)
    reader = _read_index(prefix)
    found = reader.get_variable_to_shape_map()
    expected = variable_shapes(hparams)
    slots = optimizer_slots(set(found) - set(expected), expected)
    if slots and not skip_optimizer_slots:
        example = next((name for name in slots if "/" in name), slots[0])
        raise CheckpointError(
            f"{prefix}: holds {len(slots)} optimizer slots of a training run besides the weights (e.g. "
            f"{example!r}); load it with skip_optimizer_slots=True, or write a copy without them: "
            f"python -m gpt2.convert --to openai --skip-optimizer-slots {model_dir} NEW_FOLDER"
        )
    found = {name: shape for name, shape in found.items() if name not in slots}
    misshaped = [
        f"{name} {list(found[name])} (expected {expected[name]})"
        for name in sorted(set(expected) & set(found))
        if list(found[name]) != expected[name]
    ]
    problems = mismatch_problems(sorted(set(expected) - set(found)), sorted(set(found) - set(expected)), misshaped)
    if problems:
        raise CheckpointError(f"{prefix}: does not match {model_dir}/hparams.json: {'; '.join(problems)}")
    dtypes = reader.get_variable_to_dtype_map()
    _check_data_size(prefix, expected, {name: dtype for name, dtype in dtypes.items() if name in found})
    return hparams


def mismatch_problems(missing, unexpected, misshaped):
    """The parts of a one-line error about tensors a folder lacks, should not have, or holds in
    the wrong shape (each list cut short with a count when long)."""
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if misshaped:
        problems.append(f"wrong shape: {summarize(misshaped, sep=', ')}")
    return problems


def file_sha256(path):
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed(names, limit=5):
    """A list of variable names for a message: all of them if few, else a count and the first three."""
    if len(names) <= limit:
        return repr(names)
    return f"{len(names)} variables ({', '.join(names[:3])}, ...)"


def _check_data_size(prefix, shapes, dtypes):
    """A data file smaller than the tensors it must hold was cut short; weights must be floats."""
    not_float = [f"{name} ({dtype.name})" for name, dtype in sorted(dtypes.items()) if not dtype.is_floating]
    if not_float:
        raise CheckpointError(
            f"{prefix}: GPT-2 weights must be floating point, but {summarize(not_float, sep=', ')} are not"
        )
    data_files = glob.glob(glob.escape(prefix) + ".data-*")
    size = sum(os.path.getsize(path) for path in data_files)
    needed = sum(int(np.prod(shape)) * dtypes[name].size for name, shape in shapes.items())
    if size < needed:
        raise CheckpointError(
            f"{data_files[0]}: truncated ({size} bytes, the variables need {needed}); download the model again"
        )


def _restore(prefix, name, dtype):
    """One tensor of a checkpoint as float32 (a float16 or bfloat16 checkpoint is cast on reading)."""
    import tensorflow as tf

    try:
        (value,) = tf.raw_ops.RestoreV2(
            prefix=_tf_prefix(prefix), tensor_names=[name], shape_and_slices=[""], dtypes=[dtype]
        )
    except tf.errors.OpError as error:
        message = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{prefix}: cannot read {name} ({message}); download the model again") from None
    return value if dtype == tf.float32 else tf.cast(value, tf.float32)


def _check_fits_in_memory(hparams, source, bytes_per_weight=4):
    """Raises CheckpointError if the weights of `hparams` alone exceed this machine's memory."""
    needed = bytes_per_weight * hparams.parameter_count
    total = _physical_memory()
    if total is not None and needed > total:
        raise CheckpointError(
            f"{source}: the model's {hparams.parameter_count:,} weights need {needed / 2**20:,.0f} MiB of "
            f"memory, more than this machine's {total / 2**20:,.0f} MiB; check its hparams.json"
        )


def _physical_memory():
    """Total physical memory in bytes, or None where it cannot be told."""
    try:
        if sys.platform == "win32":
            import ctypes

            class MemoryStatus(ctypes.Structure):
                _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
                    (name, ctypes.c_ulonglong)
                    for name in ("total", "avail", "total_page", "avail_page", "total_virt", "avail_virt", "ext")
                ]

            status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
            return status.total if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


DTYPES = ("float32", "bfloat16", "mixed_bfloat16")


def load_model(name_or_dir, models_dir="models", dtype="float32", dropout=0.0, before_weights=None,
               skip_optimizer_slots=False):
    """Loads a GPT-2 folder (`name_or_dir` is a folder, or a name under `models_dir`) in OpenAI's
    layout or Hugging Face's (config.json + model.safetensors, see gpt2.hf).

    dtype: "float32", "bfloat16" to hold the weights in bfloat16 (half the memory) and run the
    matmuls in it, or "mixed_bfloat16" (float32 weights, bfloat16 matmuls: for training); see
    gpt2.GPT2. dropout: the rate used when called with training=True.
    before_weights(model): called with the model built but no weight read yet, e.g. to compile
    the sampler first (`gpt2.sampling.api.prepare`), so the memory compiling takes is free
    again before the weights need theirs. skip_optimizer_slots: load a checkpoint that a TF1
    training run saved with its optimizer's slots (W/Adam, ...), ignoring them (else refused).

    Returns a `gpt2.GPT2` with the folder's weights. The variables start uninitialised (their
    memory untouched) and each tensor is read and handed to its variable one at a time:
    loading holds the weights once (plus, for a Hugging Face folder, the largest tensor).
    Turns on the compilation cache (gpt2.compile_cache), as the samplers do.
    """
    compile_cache.enable()  # before TensorFlow's first function call reads XLA's flags
    import tensorflow as tf

    from gpt2.model import GPT2

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_dir(name_or_dir, models_dir)
    with open_weights(model_dir, skip_optimizer_slots) as weights:
        _check_fits_in_memory(weights.hparams, model_dir, 2 if dtype == "bfloat16" else 4)
        model = GPT2(weights.hparams, random_init=False, dtype=dtype, dropout=dropout)
        if before_weights is not None:
            before_weights(model)
        for name, variable in model_variables(model).items():
            # No other reference to the value: the variable adopts its buffer instead of copying
            # it, and the uninitialised buffer it drops was never touched (see GPT2 random_init).
            value = tf.reshape(_as_tensor(weights.read(name)), variable.shape)
            variable.assign(value if value.dtype == variable.dtype else tf.cast(value, variable.dtype))
            del value
    model.source_dir = os.path.abspath(model_dir)  # save_checkpoint copies its encoder files
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


def open_weights(model_dir, skip_optimizer_slots=False):
    """The weights of a model folder in either layout, checked but not yet read: an object with
    `hparams`, `read(name)` (OpenAI variable name -> float32 tensor of its variable_shapes shape)
    and `close()`; a context manager. A Hugging Face folder needs the safetensors package.
    skip_optimizer_slots: see check_model_dir."""
    if _is_hf_dir(model_dir):
        from gpt2.hf import HFTensors

        return HFTensors(model_dir)
    return _OpenAIWeights(model_dir, skip_optimizer_slots)


class _OpenAIWeights:
    """OpenAI's checkpoint as a tensor source (see open_weights): each read restores one tensor
    straight into TensorFlow memory."""

    def __init__(self, model_dir, skip_optimizer_slots=False):
        self.hparams = check_model_dir(model_dir, skip_optimizer_slots)
        self._prefix = _checkpoint_prefix(model_dir)
        self._dtypes = _read_index(self._prefix).get_variable_to_dtype_map()

    def read(self, name):
        return _restore(self._prefix, name, self._dtypes[name])

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


def save_checkpoint(model, model_dir, encoder_dir=None):
    """Writes `model` as a complete OpenAI GPT-2 folder: hparams.json, checkpoint,
    model.ckpt.{index,data-00000-of-00001}, encoder.json and vocab.bpe.

    The BPE files come from `encoder_dir` if given (and holding both), else from the folder the
    model was loaded from, else those already in `model_dir` stay, else the GPT-2 files bundled
    with the `encoder` package.
    Overwriting a checkpoint is atomic: an interruption at any point leaves the old or the new
    one loadable (see _write_model_dir). Raises OSError in one line if writing fails (e.g. the
    disk is full), with the previous checkpoint left as it was.
    """
    import tensorflow as tf

    variables = model_variables(model)
    shapes = variable_shapes(model.hparams)

    def write_tensors(prefix):
        tf.raw_ops.SaveV2(
            prefix=prefix, tensor_names=list(shapes), shape_and_slices=[""] * len(shapes),
            tensors=[tf.reshape(variables[name].value, shape) for name, shape in shapes.items()],
        )

    _write_model_dir(model.hparams, model_dir, write_tensors, encoder_dir or getattr(model, "source_dir", None))


def write_checkpoint(hparams, model_dir, value_of, encoder_dir=None):
    """Writes a complete model folder in OpenAI's layout from `value_of(name)`: the value of
    each of OpenAI's variables (any array of that many float32 values), asked for and written
    one at a time, so memory holds one tensor, not the model. BPE files as in save_checkpoint."""
    from gpt2.tensor_bundle import BundleWriter

    def write_tensors(prefix):
        with BundleWriter(prefix) as writer:
            for name, shape in variable_shapes(hparams).items():
                writer.add(name, np.asarray(value_of(name), np.float32).reshape(shape))

    _write_model_dir(hparams, model_dir, write_tensors, encoder_dir)


def write_random_checkpoint(preset_or_hparams, model_dir, seed=0):
    """Writes a checkpoint of a preset shape ('124M', ...) or HParams with random weights, for
    benchmarks and tests where the released weights are not available (1558M in well under 1 GB
    of memory: see write_checkpoint)."""
    hparams = PRESETS[preset_or_hparams] if isinstance(preset_or_hparams, str) else preset_or_hparams
    rng = np.random.default_rng(seed)
    shapes = variable_shapes(hparams)

    def random_value(name):
        shape = shapes[name]
        if name.endswith("/g"):
            return np.ones(shape, np.float32)
        if name.endswith("/b"):
            return np.zeros(shape, np.float32)
        value = rng.standard_normal(shape, dtype=np.float32)
        value *= np.float32(0.01 if name == "model/wpe" else 0.02)
        return value

    write_checkpoint(hparams, model_dir, random_value)


STAGING_PREFIX = ".saving-"
# gpt2.download's record of the files it fetched; a folder saved into is no longer that download.
DOWNLOAD_MANIFEST = ".download.json"
ENCODER_FILES = ("encoder.json", "vocab.bpe")


def _write_model_dir(hparams, model_dir, write_tensors, encoder_dir):
    """Writes a model folder; `write_tensors(prefix)` writes the checkpoint files of `prefix`.

    An interruption at any point leaves the old checkpoint or the new one loadable:
    1. everything new is written into a staging folder inside `model_dir` (and synced to disk);
    2. hparams.json and the BPE files are moved in (hparams.json unchanged, checked first: a
       folder holding another shape is refused), then the `checkpoint` state file is replaced in
       one rename by one naming the staged prefix: from here on the new checkpoint loads;
    3. the old model.ckpt.* files are deleted, the staged ones linked (or copied) under those names,
       and the state file switched to model.ckpt in one more rename; the staging folder goes.
    If step 3 fails the new checkpoint stays loadable from its staging folder (a warning says so).
    """
    import tensorflow as tf

    os.makedirs(model_dir, exist_ok=True)
    _refuse_other_shape(hparams, model_dir)
    encoder_sources = _encoder_sources(model_dir, encoder_dir)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir)
    staged = os.path.join(staging, CHECKPOINT_PREFIX)
    live = False  # True while the state file names the staged checkpoint
    try:
        try:
            write_tensors(staged)
            hparams.to_json(os.path.join(staging, "hparams.json"))
            for name, source in encoder_sources:
                shutil.copyfile(source, os.path.join(staging, name))
            for path in _bundle_files(staged) + [os.path.join(staging, "hparams.json")]:
                _fsync(path)
            for name in ["hparams.json", *(name for name, _ in encoder_sources)]:
                os.replace(os.path.join(staging, name), os.path.join(model_dir, name))
            _write_state(model_dir, os.path.relpath(staged, model_dir))
            live = True
        except (OSError, tf.errors.OpError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            reason = reason.strip().splitlines()[0] if reason.strip() else type(error).__name__
            raise OSError(
                error.errno if isinstance(error, OSError) else None,
                f"cannot save the checkpoint in {model_dir}: {reason}; the previous checkpoint there is unchanged",
            ) from None
        try:
            _publish(model_dir, staging, staged)
            live = False
        except OSError as error:
            warnings.warn(f"{model_dir}: the checkpoint was saved under {staging} (renaming it to "
                          f"{CHECKPOINT_PREFIX} failed: {error}); it loads from there", stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(model_dir, DOWNLOAD_MANIFEST))
    finally:
        if not live:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_stale_staging(model_dir)


def _publish(model_dir, staging, staged):
    """Step 3 of _write_model_dir: the live staged checkpoint gets the usual names."""
    final = os.path.join(model_dir, CHECKPOINT_PREFIX)
    for path in _bundle_files(final):
        os.remove(path)  # no longer named by the state file
    for path in _bundle_files(staged):
        target = final + path[len(staged):]
        try:
            os.link(path, target)
        except OSError:  # a file system without hard links
            copy = os.path.join(staging, "copy")
            shutil.copyfile(path, copy)
            _fsync(copy)
            os.replace(copy, target)
    _write_state(model_dir, CHECKPOINT_PREFIX)


def _refuse_other_shape(hparams, model_dir):
    """Raises CheckpointError if `model_dir` holds a checkpoint whose hparams differ from `hparams`
    (replacing it could not be atomic: hparams.json and the weights would change in two steps)."""
    if not os.path.isfile(os.path.join(model_dir, "checkpoint")):
        return
    try:
        old = HParams.from_json(os.path.join(model_dir, "hparams.json"))
    except (OSError, ValueError):
        return  # nothing loadable to protect
    if old != hparams:
        changed = ", ".join(
            f"{name} {getattr(old, name)} -> {getattr(hparams, name)}"
            for name in old.__dataclass_fields__ if getattr(old, name) != getattr(hparams, name)
        )
        raise CheckpointError(
            f"{model_dir} holds a model of another shape ({changed}); save into a new folder or delete it first"
        )


def _encoder_sources(model_dir, encoder_dir):
    """(name, source path) of the BPE files to copy into `model_dir`; none if it keeps its own.
    From `encoder_dir` (OpenAI's names, or Hugging Face's vocab.json + merges.txt, the same
    files), else the GPT-2 files bundled with the `encoder` package."""
    from encoder import encoder_files_for_model_dir
    from encoder.encoder import PACKAGE_DIR

    if encoder_dir is None:
        if all(os.path.isfile(os.path.join(model_dir, name)) for name in ENCODER_FILES):
            return []
        encoder_dir = PACKAGE_DIR
    sources = encoder_files_for_model_dir(encoder_dir)
    own = [os.path.join(model_dir, name) for name in ENCODER_FILES]
    if all(os.path.exists(path) for path in own) and all(
            os.path.realpath(a) == os.path.realpath(b) for a, b in zip(sources, own)):
        return []
    return list(zip(ENCODER_FILES, sources))


def _bundle_files(prefix):
    """The index and data files of a checkpoint prefix that exist."""
    files = [prefix + ".index"] if os.path.isfile(prefix + ".index") else []
    return files + sorted(glob.glob(glob.escape(prefix) + ".data-*"))


def _write_state(model_dir, prefix):
    """Replaces `model_dir/checkpoint` in one rename by a state file naming `prefix` (relative)."""
    prefix = prefix.replace(os.sep, "/")
    path = os.path.join(model_dir, "checkpoint")
    with tempfile.NamedTemporaryFile("w", dir=model_dir, prefix=".checkpoint-", delete=False,
                                     encoding="utf-8") as f:
        f.write(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')
        f.flush()
        os.fsync(f.fileno())
    try:
        os.chmod(f.name, 0o666 & ~current_umask())  # tempfile's 0600 -> the mode of the other files
        os.replace(f.name, path)
    except BaseException:
        os.remove(f.name)
        raise
    _fsync(model_dir)


def _remove_stale_staging(model_dir):
    """Removes what interrupted saves left behind, except the staging folder the state file names."""
    try:
        live = os.path.relpath(_checkpoint_prefix(model_dir), model_dir).replace(os.sep, "/").split("/")[0]
    except (OSError, ValueError):
        live = None
    for entry in os.listdir(model_dir):
        path = os.path.join(model_dir, entry)
        if entry.startswith(STAGING_PREFIX) and entry != live and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(".checkpoint-") and os.path.isfile(path):
            os.remove(path)


def _fsync(path):
    """Flushes a file (or, on POSIX, a folder's entries) to disk."""
    if os.path.isdir(path) and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    quiet_tensorflow()  # before TensorFlow is first imported
    try:
        write_random_checkpoint(args.random, args.model_dir, seed=args.seed)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote a random {args.random} checkpoint to {args.model_dir}")


if __name__ == "__main__":
    main()
