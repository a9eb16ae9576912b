"""GPT2-ML folders (imcaspar/gpt2-ml, Grover's model): its released TF1 training checkpoint, read as it is.

A folder holds `model.ckpt-220000.{index,data-00000-of-00001,meta}` (a `checkpoint` state file naming
the prefix is optional: without one, the `model.ckpt-N.index` of the highest N is read) and, optionally,
their config JSON (`configs/mega.json`) saved as `config.json`; without it the 1.5B preset
(gpt2.hparams.GPT2ML_PRESETS) applies. The vocabulary size always comes from word_embed's shape.

Variables (V = n_vocab, c = n_ctx, e = n_embd, i = n_inner, NN = layer, two digits):

    newslm/embeddings/word_embed [V, e], pos_embed [c, e], LayerNorm_embed_norm/{gamma,beta} [e]
    newslm/layerNN/{query_layer,key_layer,value_layer,context_projection_layer}/{kernel [e, e], bias [e]}
    newslm/layerNN/LayerNorm_mlp_ln0/{gamma,beta}, intermediate/{kernel [e, i], bias [i]},
    newslm/layerNN/output/{kernel [i, e], bias [e]}, LayerNorm_mlp_ln1/{gamma,beta}

The training checkpoint also holds `global_step` and Adafactor's slots (W/adafactor_vr, W/adafactor_vc,
W/adafactor_v): always skipped. Anything else is refused in one line.
"""

import glob
import json
import os
import re

from gpt2.formats import openai
from gpt2.formats.base import CheckpointError, check_variables, read_json, refuse_other_shape
from gpt2.formats.bundle import DATA_SUFFIX, BundleWriter
from gpt2.hparams import GPT2ML_PRESETS, GPT2MLHParams

CONFIG_FILE = "config.json"
PRESET = "1.5B"
SKIPPED = ("global_step",)
SLOT_SUFFIXES = ("/adafactor_vr", "/adafactor_vc", "/adafactor_v")
# GroverConfig's defaults for the keys that shape the model (those a save compares).
_CONFIG_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "max_position_embeddings": 512}
_STEP = re.compile(r"model\.ckpt-(\d+)\.index")


def variable_shapes(hparams):
    """Grover's variable names and shapes for `hparams`, in the order its model creates them."""
    e, i = hparams.n_embd, hparams.n_inner
    shapes = {"newslm/embeddings/word_embed": [hparams.n_vocab, e], "newslm/embeddings/pos_embed": [hparams.n_ctx, e],
              "newslm/embeddings/LayerNorm_embed_norm/gamma": [e], "newslm/embeddings/LayerNorm_embed_norm/beta": [e]}
    for n in range(hparams.n_layer):
        prefix = f"newslm/layer{n:02d}/"
        for name in ("query_layer", "key_layer", "value_layer", "context_projection_layer"):
            shapes.update({prefix + name + "/kernel": [e, e], prefix + name + "/bias": [e]})
        shapes.update({
            prefix + "LayerNorm_mlp_ln0/gamma": [e], prefix + "LayerNorm_mlp_ln0/beta": [e],
            prefix + "intermediate/kernel": [e, i], prefix + "intermediate/bias": [i],
            prefix + "output/kernel": [i, e], prefix + "output/bias": [e],
            prefix + "LayerNorm_mlp_ln1/gamma": [e], prefix + "LayerNorm_mlp_ln1/beta": [e],
        })
    return shapes


def _index_files(model_dir):
    return sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.index")))


def claims(model_dir):
    """True for a folder without OpenAI's hparams.json that holds their config.json (GroverConfig's
    hidden_size) or a step-numbered `model.ckpt-N.index` (an OpenAI folder without its hparams.json,
    `model.ckpt.index`, stays OpenAI's, whose error names the missing file)."""
    if os.path.isfile(os.path.join(model_dir, "hparams.json")):
        return False
    if any(_STEP.fullmatch(os.path.basename(path)) for path in _index_files(model_dir)):
        return True
    try:
        config = _read_config(os.path.join(model_dir, CONFIG_FILE))
    except (OSError, CheckpointError):
        return False
    return isinstance(config, dict) and "hidden_size" in config and "model_type" not in config


def checkpoint_prefix(model_dir):
    """The prefix the `checkpoint` state file names, else that of the one `*.index` (or of
    `model.ckpt-N.index` with the highest N)."""
    if os.path.isfile(os.path.join(model_dir, "checkpoint")):
        return openai._checkpoint_prefix(model_dir)
    indexes = _index_files(model_dir)
    steps = {int(m.group(1)): path for path in indexes if (m := _STEP.fullmatch(os.path.basename(path)))}
    if len(indexes) == 1:
        return indexes[0][: -len(".index")]
    if steps:
        return steps[max(steps)][: -len(".index")]
    raise CheckpointError(f"{model_dir}: holds {len(indexes)} checkpoint indexes and no `checkpoint` state file "
                          "naming one; keep one model.ckpt-N.* or add the state file")


def _read_config(path):
    """Their config JSON as a dict, or None if there is none."""
    from gpt2.formats.hf import MAX_CONFIG_BYTES

    try:
        return read_json(path, MAX_CONFIG_BYTES, expect_object=True)
    except FileNotFoundError:
        return None


def hparams_from_config(config, n_vocab, source=CONFIG_FILE):
    """GPT2MLHParams of their config dict (GroverConfig's keys; vocab_size is not used: `n_vocab`,
    word_embed's rows, is); CheckpointError for an activation other than their GELU."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (GPT2-ML uses 'gelu')")
    value = {**_CONFIG_DEFAULTS, **config}.get
    try:
        return GPT2MLHParams(n_vocab=n_vocab, n_ctx=value("max_position_embeddings"), n_embd=value("hidden_size"),
                             n_head=value("num_attention_heads"), n_layer=value("num_hidden_layers"),
                             n_inner=value("intermediate_size"))
    except ValueError as error:
        raise CheckpointError(f"{source}: {str(error).removeprefix('hparams: ')}") from None


def _checked(model_dir, config=None):
    """(hparams, prefix, dtypes) of a checked GPT2-ML folder. config: a dict or a JSON file's path
    (default: the folder's config.json, else the 1.5B preset)."""
    prefix = checkpoint_prefix(model_dir)
    reader = openai._read_index(prefix)
    found = reader.get_variable_to_shape_map()
    embed = found.get("newslm/embeddings/word_embed")
    if embed is None or len(embed) != 2:
        raise CheckpointError(f"{prefix}: no newslm/embeddings/word_embed [V, e]; is {model_dir} a GPT2-ML checkpoint?")
    source = config if isinstance(config, str) else os.path.join(model_dir, CONFIG_FILE)
    values = _read_config(source) if not isinstance(config, dict) else config
    if values is None and isinstance(config, str):
        raise FileNotFoundError(f"{config}: config file not found")
    if values is None:
        source = f"the built-in {PRESET} preset (no {CONFIG_FILE} in {model_dir})"
        values = config_of(GPT2ML_PRESETS[PRESET])
    hparams = hparams_from_config(values, int(embed[0]), source)
    expected = variable_shapes(hparams)
    skipped = {name for name in found if name in SKIPPED or (
        name.endswith(SLOT_SUFFIXES) and name.rsplit("/", 1)[0] in expected)}
    found = {name: shape for name, shape in found.items() if name not in skipped}
    check_variables(prefix, source, found, expected)
    dtypes = reader.get_variable_to_dtype_map()
    openai._check_data_size(prefix, expected, {name: dtypes[name] for name in expected})
    return hparams, prefix, dtypes


def read_hparams(model_dir, config=None):
    """The GPT2MLHParams of a folder (reads the checkpoint's index for the vocabulary size, no weights)."""
    return _checked(model_dir, config)[0]


def open_weights(model_dir, skip_optimizer_slots=False, config=None):
    """The checked weights of a GPT2-ML folder (see gpt2.formats); Adafactor's slots and global_step
    are always skipped (skip_optimizer_slots is accepted for the common signature)."""
    return openai.CheckpointWeights(*_checked(model_dir, config))


def config_of(hparams):
    """Their config JSON (GroverConfig's keys, as configs/mega.json) for `hparams`."""
    return {"vocab_size": hparams.n_vocab, "hidden_size": hparams.n_embd, "num_hidden_layers": hparams.n_layer,
            "num_attention_heads": hparams.n_head, "intermediate_size": hparams.n_inner, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": hparams.n_ctx, "initializer_range": 0.02}


def save_checkpoint(model, model_dir, encoder_dir=None, step=0):
    """Writes a GPT2ML `model` as a GPT2-ML folder in their released layout, loadable by their code:
    model.ckpt-STEP.{index,data-00000-of-00001} (float32 variables under their names, and
    global_step = STEP), config.json, their vocabulary file (from `encoder_dir`, else from the
    folder the model was loaded from; none there: the folder keeps its own) and a `checkpoint`
    state file naming model.ckpt-STEP. The other model.ckpt-N files in the folder are removed.

    Atomic as gpt2.formats.openai.save_checkpoint (see publish_model_dir); a folder holding a
    checkpoint of another shape is refused first, so config.json never changes under old weights.
    Raises OSError in one line if writing fails.
    """
    import shutil

    import tensorflow as tf

    from encoder.wordpiece import wordpiece_vocab_file

    step = int(step)
    os.makedirs(model_dir, exist_ok=True)
    _refuse_other_shape(model.hparams, model_dir)
    source = encoder_dir or getattr(model, "source_dir", None)
    vocab = source and wordpiece_vocab_file(source)
    if vocab and os.path.realpath(vocab) == os.path.realpath(os.path.join(model_dir, os.path.basename(vocab))):
        vocab = None  # the folder's own
    name = f"model.ckpt-{step}"
    moved = [CONFIG_FILE, *([os.path.basename(vocab)] if vocab else [])]

    def write_staged(staging, staged):
        variables = model.checkpoint_variables()
        tensors = [tf.cast(variable.value, tf.float32) for variable in variables.values()]
        tf.raw_ops.SaveV2(prefix=staged, tensor_names=[*variables, "global_step"],
                          shape_and_slices=[""] * (len(tensors) + 1), tensors=[*tensors, tf.constant(step, tf.int64)])
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config_of(model.hparams), f, indent=2)
            f.write("\n")
        if vocab:
            shutil.copyfile(vocab, os.path.join(staging, moved[1]))

    openai.publish_model_dir(model_dir, write_staged, moved, name)
    for path in glob.glob(os.path.join(glob.escape(model_dir), "model.ckpt-*")):
        match = re.fullmatch(r"(model\.ckpt-\d+)\.(index|meta|data-\d+-of-\d+)", os.path.basename(path))
        if match and match.group(1) != name:
            os.remove(path)  # an older step, no longer named by the state file


def _refuse_other_shape(hparams, model_dir):
    """base.refuse_other_shape for a GPT2-ML checkpoint and its config.json in `model_dir`, if any."""
    try:
        checkpoint_prefix(model_dir)
        old = _read_config(os.path.join(model_dir, CONFIG_FILE))
    except (OSError, CheckpointError):
        return  # nothing loadable to protect
    if old is not None:
        new = config_of(hparams)
        refuse_other_shape(model_dir, {**_CONFIG_DEFAULTS, **old}, {key: new[key] for key in _CONFIG_DEFAULTS})


def write_checkpoint(hparams, model_dir, value_of, step=0, slots=False, extra=None):
    """Writes a GPT2-ML folder in their released layout: model.ckpt-{step}.{index,data-00000-of-00001}
    and config.json (their keys). value_of(name): each weight's value (float32). slots: also write
    global_step and Adafactor's slots (vr/vc for matrices, v for vectors) as their training does;
    extra: {name: array} more tensors (tests). Each file is written under a temporary name first."""
    import numpy as np

    os.makedirs(model_dir, exist_ok=True)
    config = config_of(hparams)
    staged = os.path.join(model_dir, f".staging-model.ckpt-{step}")
    with BundleWriter(staged) as writer:
        for name, shape in variable_shapes(hparams).items():
            writer.add(name, np.asarray(value_of(name), np.float32).reshape(shape))
            if slots and len(shape) == 2:
                writer.add(name + "/adafactor_vr", np.ones(shape[:1], np.float32))
                writer.add(name + "/adafactor_vc", np.ones(shape[1:], np.float32))
            elif slots:
                writer.add(name + "/adafactor_v", np.ones(shape, np.float32))
        if slots:
            writer.add("global_step", np.array(step, np.int64))
        for name, value in (extra or {}).items():
            writer.add(name, value)
    with open(os.path.join(model_dir, ".staging-config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(model_dir, ".staging-config.json"), os.path.join(model_dir, CONFIG_FILE))
    final = os.path.join(model_dir, f"model.ckpt-{step}")
    os.replace(staged + DATA_SUFFIX, final + DATA_SUFFIX)
    os.replace(staged + ".index", final + ".index")
