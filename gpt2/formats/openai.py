"""OpenAI's GPT-2 checkpoint folders, read, checked and written with no conversion step.

A model folder holds `hparams.json`, a `checkpoint` state file naming the prefix (`model.ckpt`), and
the TF checkpoint `model.ckpt.index` + `model.ckpt.data-00000-of-00001` with variables named
`model/wte`, `model/wpe`, `model/h{i}/ln_1/g`, `model/h{i}/attn/c_attn/w` ([1, n_embd, 3 n_embd]),
..., `model/ln_f/b` (gpt2.formats.base.variable_shapes). OpenAI's `model.ckpt.meta` (a TF1 graph) is
neither needed nor written. A TF1 training run's optimizer slots beside the weights are named and,
on request, skipped. Writing stages the new files and publishes them atomically (publish_model_dir).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING

import numpy as np

from gpt2.formats import base
from gpt2.formats.base import CheckpointError, Weights, check_variables, first_line, model_variables, variable_shapes
from gpt2.formats.bundle import BundleWriter
from gpt2.hparams import HParams, summarize
from gpt2.runtime import current_umask

if TYPE_CHECKING:
    from gpt2.model import GPT2

CHECKPOINT_PREFIX = "model.ckpt"
DATA_FILE = CHECKPOINT_PREFIX + ".data-00000-of-00001"
INDEX_FILE = CHECKPOINT_PREFIX + ".index"


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
    for path in [prefix + ".index", *_data_files(prefix)]:
        if os.path.exists(path) and not os.path.isfile(path):
            raise CheckpointError(f"{path}: is a folder, not a checkpoint file; download the model again")
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointError(f"{prefix}.index: checkpoint index not found; download the model again")
    if not _data_files(prefix):
        raise CheckpointError(f"{prefix}.data-00000-of-00001: checkpoint data not found; download the model again")
    return prefix


def _read_index(prefix):
    import tensorflow as tf

    try:
        return tf.train.load_checkpoint(_tf_prefix(prefix))
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(f"{prefix}.index: unreadable ({first_line(error)}); download the model again") from None


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
    for path in [prefix + ".index", *_data_files(prefix)]:
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
    """Checks a model folder without reading the weights; returns its HParams. The index must hold
    exactly the variables and shapes hparams.json implies; with `skip_optimizer_slots` a training
    run's optimizer slots (W/Adam, W/Adam_1, beta1_power, ...) are allowed and ignored. Raises
    CheckpointError (or FileNotFoundError/ValueError from hparams) listing every problem in one line."""
    return _checked(model_dir, skip_optimizer_slots)[0]


def _checked(model_dir, skip_optimizer_slots):
    """check_model_dir's checks; (hparams, checkpoint prefix, dtype of each variable)."""
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
    check_variables(prefix, f"{model_dir}/hparams.json", found, expected)
    dtypes = reader.get_variable_to_dtype_map()
    _check_data_size(prefix, expected, {name: dtype for name, dtype in dtypes.items() if name in found})
    return hparams, prefix, dtypes


def _data_files(prefix):
    return glob.glob(glob.escape(prefix) + ".data-*")


def _check_data_size(prefix, shapes, dtypes):
    """A data file smaller than the tensors it must hold was cut short; weights must be floats."""
    not_float = [f"{name} ({dtype.name})" for name, dtype in sorted(dtypes.items()) if not dtype.is_floating]
    if not_float:
        raise CheckpointError(
            f"{prefix}: GPT-2 weights must be floating point, but {summarize(not_float, sep=', ')} are not"
        )
    data_files = _data_files(prefix)
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
        raise CheckpointError(f"{prefix}: cannot read {name} ({first_line(error)}); download the model again") from None
    return value if dtype == tf.float32 else tf.cast(value, tf.float32)


def claims(model_dir):
    """True for a folder with OpenAI's hparams.json (the format of any folder no other one claims)."""
    return os.path.isfile(os.path.join(model_dir, "hparams.json"))


def read_hparams(model_dir):
    """The HParams of hparams.json alone (no weights read, no TensorFlow)."""
    return HParams.from_json(os.path.join(model_dir, "hparams.json"))


def open_weights(model_dir, skip_optimizer_slots=False):
    """The checked weights of an OpenAI folder (see gpt2.formats): each read restores one tensor
    straight into TensorFlow memory. skip_optimizer_slots: see check_model_dir."""
    return CheckpointWeights(*_checked(model_dir, skip_optimizer_slots))


class CheckpointWeights(Weights):
    """A checked TF checkpoint (OpenAI's or GPT2-ML's) as a tensor source, by its variable names."""

    def __init__(self, hparams, prefix, dtypes):
        self.hparams, self._prefix, self._dtypes = hparams, prefix, dtypes

    def read(self, name):
        return _restore(self._prefix, name, self._dtypes[name])


def save_checkpoint(model: GPT2, model_dir: str | os.PathLike, encoder_dir: str | os.PathLike | None = None) -> None:
    """Writes `model` as a complete OpenAI GPT-2 folder, atomically (see publish_model_dir):
    hparams.json, checkpoint, model.ckpt.{index,data-00000-of-00001}, encoder.json and vocab.bpe.
    The BPE files come from `encoder_dir` if given (and holding both), else from the folder the
    model was loaded from, else those already in `model_dir` stay, else the `encoder` package's."""
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

    def write_tensors(prefix):
        with BundleWriter(prefix) as writer:
            for name, shape in variable_shapes(hparams).items():
                writer.add(name, np.asarray(value_of(name), np.float32).reshape(shape))

    _write_model_dir(hparams, model_dir, write_tensors, encoder_dir)


STAGING_PREFIX = ".saving-"
# gpt2.download's record of the files it fetched; a folder saved into is no longer that download.
DOWNLOAD_MANIFEST = ".download.json"
ENCODER_FILES = ("encoder.json", "vocab.bpe")


def _write_model_dir(hparams, model_dir, write_tensors, encoder_dir):
    """Writes an OpenAI model folder; `write_tensors(prefix)` writes the checkpoint files of
    `prefix`. hparams.json is checked first: a folder holding another shape is refused (replacing
    it could not be atomic: hparams.json and the weights would change in two steps)."""
    os.makedirs(model_dir, exist_ok=True)
    _refuse_other_shape(hparams, model_dir)
    encoder_sources = _encoder_sources(model_dir, encoder_dir)

    def write_staged(staging, staged):
        write_tensors(staged)
        hparams.to_json(os.path.join(staging, "hparams.json"))
        for name, source in encoder_sources:
            shutil.copyfile(source, os.path.join(staging, name))

    publish_model_dir(model_dir, write_staged, ["hparams.json", *(name for name, _ in encoder_sources)])


def publish_model_dir(model_dir, write_staged, moved, name=CHECKPOINT_PREFIX):
    """Writes checkpoint `name` (OpenAI's model.ckpt, GPT2-ML's model.ckpt-N) and the files `moved`
    into `model_dir`; `write_staged(staging, staged)` writes the checkpoint files of prefix `staged`
    and the files `moved` into the folder `staging`.

    An interruption at any point leaves the old checkpoint or the new one loadable:
    1. everything new is written into a staging folder inside `model_dir` (and synced to disk);
    2. the `moved` files are moved in, then the `checkpoint` state file is replaced in one rename
       by one naming the staged prefix: from here on the new checkpoint loads;
    3. the old checkpoint files are deleted, the staged ones linked (or copied) under `name`, and
       the state file switched to `name` in one more rename; the staging folder goes.
    If step 3 fails the new checkpoint stays loadable from its staging folder (a warning says so).
    Raises OSError in one line if writing fails, with the previous checkpoint left as it was.
    """
    import tensorflow as tf

    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir)
    staged = os.path.join(staging, name)
    live = False  # True while the state file names the staged checkpoint
    try:
        try:
            write_staged(staging, staged)
            for path in _bundle_files(staged) + [os.path.join(staging, file) for file in moved]:
                _fsync(path)
            for file in moved:
                os.replace(os.path.join(staging, file), os.path.join(model_dir, file))
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
            _publish(model_dir, staging, staged, name)
            live = False
        except OSError as error:
            warnings.warn(f"{model_dir}: the checkpoint was saved under {staging} (renaming it to "
                          f"{name} failed: {error}); it loads from there", stacklevel=4)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(model_dir, DOWNLOAD_MANIFEST))
    finally:
        if not live:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_stale_staging(model_dir)


def _publish(model_dir, staging, staged, name):
    """Step 3 of publish_model_dir: the live staged checkpoint gets the final names (prefix `name`),
    then the state file names them."""
    final = os.path.join(model_dir, name)
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
    _write_state(model_dir, name)


def _refuse_other_shape(hparams, model_dir):
    """base.refuse_other_shape for the checkpoint and hparams.json in `model_dir`, if any."""
    if not os.path.isfile(os.path.join(model_dir, "checkpoint")):
        return
    try:
        old = HParams.from_json(os.path.join(model_dir, "hparams.json"))
    except (OSError, ValueError):
        return  # nothing loadable to protect
    base.refuse_other_shape(model_dir, dataclasses.asdict(old), dataclasses.asdict(hparams))


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

