"""The front door to model folders: finds one by name, picks its format (gpt2.formats: OpenAI's
checkpoint, Hugging Face's safetensors, GPT2-ML's TF1 checkpoint), loads a `gpt2.GPT2` (or
`gpt2.model.GPT2ML`) from it, saves one as OpenAI's.

    python -m gpt2.checkpoint --random 124M DIR [--seed 0]   # random weights, real shape
    python -m gpt2.checkpoint --random gpt2ml-1.5B DIR          # GPT2-ML's 1.5B, in their layout
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from gpt2 import compile_cache
from gpt2.formats import gpt2ml, hf, openai
from gpt2.formats.base import CheckpointError, check_fits_in_memory, saving_format, variable_shapes
from gpt2.formats.openai import write_checkpoint
from gpt2.hparams import GPT2ML_PRESETS, NARROW_DTYPES, OLD_NAMES, PRESETS, GPT2MLHParams, HParams

if TYPE_CHECKING:
    from gpt2.model import GPT2

__all__ = ["CheckpointError", "FORMATS", "check_model_dir", "load_model", "open_weights", "read_hparams",
           "resolve_model_dir", "save_checkpoint", "write_checkpoint", "write_random_checkpoint"]

# The folder formats (see gpt2.formats): the first that claims a folder reads it, else OpenAI's (whose
# errors say what an OpenAI folder lacks). GPT2-ML's (a TF1 checkpoint, variables under `newslm/`, and
# perhaps their config.json) comes before Hugging Face's, which would claim any config.json.
FORMATS = {"gpt2ml": gpt2ml, "hf": hf, "openai": openai}


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


def folder_format(model_dir):
    """The module of gpt2.formats that reads `model_dir` (see FORMATS)."""
    return next((module for module in FORMATS.values() if module.claims(model_dir)), openai)


def open_weights(model_dir, skip_optimizer_slots=False, config=None):
    """The weights of a model folder in any format, checked but not yet read (see gpt2.formats).
    config: a GPT2-ML folder's config (a dict or a JSON file; default: its config.json, else the
    1.5B preset); other formats refuse it."""
    module = folder_format(model_dir)
    if config is None:
        return module.open_weights(model_dir, skip_optimizer_slots)
    if module is not gpt2ml:
        raise ValueError(f"{model_dir}: config= is only for GPT2-ML folders (a TF1 checkpoint of newslm/ variables)")
    return module.open_weights(model_dir, skip_optimizer_slots, config=config)


def read_hparams(model_dir):
    """The HParams of a model folder in any format, from hparams.json or config.json alone
    (no weights read, no TensorFlow)."""
    return folder_format(model_dir).read_hparams(model_dir)


def check_model_dir(model_dir, skip_optimizer_slots=False):
    """Checks a model folder in any format without reading the weights; returns its HParams. See
    gpt2.formats.openai.check_model_dir (skip_optimizer_slots too) and gpt2.formats.hf.HFTensors."""
    with open_weights(model_dir, skip_optimizer_slots) as weights:
        return weights.hparams


DTYPES = ("float32", "bfloat16", "mixed_bfloat16", "int8", "float16")
# Bytes per weight each dtype holds (int8, float16: the projections and wte; int8's scales and the rest are few).
_WEIGHT_BYTES = {"bfloat16": 2, "int8": 1, "float16": 2}


def load_model(name_or_dir: str | os.PathLike, models_dir: str | os.PathLike = "models", dtype: str = "float32",
               dropout: float = 0.0, before_weights: Callable[[GPT2], object] | None = None,
               skip_optimizer_slots: bool = False, config: dict | str | os.PathLike | None = None) -> GPT2:
    """Loads a model folder in any format (`name_or_dir` is a folder, or a name under `models_dir`).

    dtype: "float32", "bfloat16" (weights and matmuls, half the memory), "mixed_bfloat16" (float32
    weights, bfloat16 matmuls: for training), "int8" (weight-only, a float32 scale per output
    channel, quantized tensor by tensor as read; inference only, GPT-2 folders only) or "float16"
    (weights only, no scale; a weight beyond its range is refused); see gpt2.GPT2.
    dropout: the rate used when called with training=True. before_weights(model): called with the
    model built but no weight read yet (e.g. `gpt2.sampling.api.prepare`), so the memory compiling
    takes is free again before the weights need theirs. skip_optimizer_slots: ignore a TF1 training
    run's optimizer slots (W/Adam, ...; else refused). config: a GPT2-ML folder's (see open_weights).

    Returns a `gpt2.GPT2` (a `gpt2.model.GPT2ML` for a GPT2-ML folder). The variables start
    uninitialised and each tensor is read and handed to its variable one at a time: loading holds
    the weights once (plus, for a Hugging Face folder, the largest tensor). Turns on the
    compilation cache (gpt2.compile_cache), as the samplers do.
    """
    compile_cache.enable()  # before TensorFlow's first function call reads XLA's flags
    import tensorflow as tf

    from gpt2.model import model_class

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_dir(name_or_dir, models_dir)
    options = {"dtype": "float32", "weight_dtype": dtype} if dtype in NARROW_DTYPES else {"dtype": dtype}
    with open_weights(model_dir, skip_optimizer_slots, config) as weights:
        if dtype in NARROW_DTYPES and isinstance(weights.hparams, GPT2MLHParams):
            raise ValueError(f"{model_dir}: {dtype} weights are for GPT-2 folders; load a GPT2-ML model in float32 "
                             "or bfloat16")
        check_fits_in_memory(weights.hparams, model_dir, _WEIGHT_BYTES.get(dtype, 4))
        model = model_class(weights.hparams)(weights.hparams, random_init=False, dropout=dropout, **options)
        if before_weights is not None:
            before_weights(model)
        for name, variable in model.checkpoint_variables().items():
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


def save_checkpoint(model: GPT2, model_dir: str | os.PathLike, encoder_dir: str | os.PathLike | None = None,
                    step: int = 0) -> None:
    """Writes `model` as a complete model folder, atomically, in the layout of its kind: a GPT-2 in
    OpenAI's (gpt2.formats.openai.save_checkpoint), a GPT2-ML in their released one, its files
    numbered `step` (gpt2.formats.gpt2ml.save_checkpoint). The tokenizer files come from
    `encoder_dir`, else from the folder the model was loaded from."""
    module = saving_format(model.hparams)
    module.save_checkpoint(model, model_dir, encoder_dir, **({"step": step} if module is gpt2ml else {}))


# --random's GPT2-ML shapes: gpt2ml-<their preset name>.
GPT2ML_RANDOM = {f"gpt2ml-{name}": hparams for name, hparams in GPT2ML_PRESETS.items()}


def write_random_checkpoint(preset_or_hparams: str | HParams, model_dir: str | os.PathLike, seed: int = 0) -> None:
    """Writes a checkpoint of a preset shape ('124M', ..., 'gpt2ml-1.5B') or HParams with random
    weights, for benchmarks and tests (1558M in well under 1 GB of memory: see write_checkpoint). A
    GPT2-ML shape is written in their released layout (model.ckpt-220000 with global_step and
    Adafactor's slots, config.json) without a vocabulary file: put their clue-vocab.txt beside it."""
    if isinstance(preset_or_hparams, str):
        hparams = GPT2ML_RANDOM.get(preset_or_hparams) or PRESETS[preset_or_hparams]
    else:
        hparams = preset_or_hparams
    rng = np.random.default_rng(seed)
    is_ml = isinstance(hparams, GPT2MLHParams)
    shapes = (gpt2ml.variable_shapes if is_ml else variable_shapes)(hparams)
    ones, zeros = ("/gamma",) if is_ml else ("/g",), ("/beta", "/bias") if is_ml else ("/b",)

    def random_value(name):
        shape = shapes[name]
        if name.endswith(ones):
            return np.ones(shape, np.float32)
        if name.endswith(zeros):
            return np.zeros(shape, np.float32)
        value = rng.standard_normal(shape, dtype=np.float32)
        value *= np.float32(0.01 if name == "model/wpe" else 0.02)
        return value

    if is_ml:
        gpt2ml.write_checkpoint(hparams, model_dir, random_value, step=220000, slots=True)
    else:
        write_checkpoint(hparams, model_dir, random_value)


def main(argv=None):
    from gpt2 import cli
    from gpt2.runtime import quiet_tensorflow

    parser = argparse.ArgumentParser(
        prog="python -m gpt2.checkpoint",
        description="Write a GPT-2 checkpoint with random weights in OpenAI's layout (a GPT2-ML shape: "
                    "in their released layout, with global_step and Adafactor's slots).",
    )
    parser.add_argument("--random", metavar="SHAPE", required=True, choices=[*sorted(PRESETS), *GPT2ML_RANDOM],
                        help="preset shape: " + ", ".join([*PRESETS, *GPT2ML_RANDOM]))
    parser.add_argument("model_dir", help="folder to write (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    def body(args):
        quiet_tensorflow()  # before TensorFlow is first imported
        write_random_checkpoint(args.random, args.model_dir, seed=args.seed)
        print(f"wrote a random {args.random} checkpoint to {args.model_dir}")
        return cli.EXIT_OK

    return cli.main_of(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
