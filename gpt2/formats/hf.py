"""Hugging Face GPT-2 folders (`config.json` + safetensors weights), read and written with NumPy.

No torch or transformers: the `safetensors` package (the optional extra `gpt2-tf2[hf]`) reads
and writes the tensors, imported only when a folder's weights are touched. A folder is
`config.json` (model_type "gpt2") with `model.safetensors`, or shards
`model-0000x-of-0000y.safetensors` listed by `model.safetensors.index.json`.

Names (V = n_vocab, c = n_ctx = n_positions, e = n_embd, i = block; HF -> OpenAI):

    wte.weight [V, e]                  model/wte
    wpe.weight [c, e]                  model/wpe
    h.i.ln_1.weight, .bias [e]         model/hi/ln_1/g, b      (ln_2 and ln_f alike)
    h.i.attn.c_attn.weight [e, 3e]     model/hi/attn/c_attn/w [1, e, 3e]   (+ .bias [3e])
    h.i.attn.c_proj.weight [e, e]      model/hi/attn/c_proj/w [1, e, e]
    h.i.mlp.c_fc.weight [e, 4e]        model/hi/mlp/c_fc/w [1, e, 4e]
    h.i.mlp.c_proj.weight [4e, e]      model/hi/mlp/c_proj/w [1, 4e, e]

Hugging Face's Conv1D stores [in, out] like OpenAI, without the leading axis: the bytes are the
same. The hub's original files use the names above and may hold the causal-mask buffers
`h.i.attn.bias` / `h.i.attn.masked_bias` (ignored); `save_pretrained` adds the prefix
`transformer.` and writes `lm_head.weight` only if it is not tied to wte (then it must equal wte).
"""

import json
import os
import re

import numpy as np

from gpt2.formats.base import CheckpointError, Weights, check_variables, first_line, read_json, variable_shapes
from gpt2.hparams import HParams

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
HINT = "{} Hugging Face folders needs the safetensors package: pip install 'gpt2-tf2[hf]'"
EOT_ID = 50256
# Arrays from `HFTensors.read` start on this boundary (TensorFlow's buffer alignment), so that
# load_model can hand them to TensorFlow without a copy.
ALIGNMENT = 64

_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
# What an index may name as a shard: a plain file name (no separator or drive) ending .safetensors.
_SHARD_NAME = re.compile(r"[^/\\:\x00]+\.safetensors")
# config.json of the hub's models is about 1 KB; an index lists a few hundred tensors.
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 16 << 20
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# Weights in other formats that this reader refuses, with the reason.
_OTHER_FORMATS = {
    "pytorch_model.bin": "a pickle, which can run code when loaded, and reading it would need torch",
    "pytorch_model.bin.index.json": "pickles, which can run code when loaded, and reading them would need torch",
    "tf_model.h5": "a TF1-era Keras file in another layout",
    "flax_model.msgpack": "a Flax file",
}

# GPT2Config's defaults for the keys that shape the model or its numerics (used when absent).
_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
}
# Both name the tanh approximation of GELU that OpenAI's GPT-2 uses.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def claims(model_dir):
    """True for a folder in Hugging Face's layout: a config.json and no OpenAI hparams.json."""
    return os.path.isfile(os.path.join(model_dir, CONFIG_FILE)) and not os.path.isfile(
        os.path.join(model_dir, "hparams.json")
    )


def open_weights(model_dir, skip_optimizer_slots=False):
    """The checked weights of a Hugging Face folder (see gpt2.formats); it holds no optimizer slots."""
    return HFTensors(model_dir)


def hf_names(hparams):
    """OpenAI variable name -> Hugging Face tensor name (without the `transformer.` prefix)."""
    names = {"model/wte": "wte.weight", "model/wpe": "wpe.weight",
             "model/ln_f/g": "ln_f.weight", "model/ln_f/b": "ln_f.bias"}
    suffix = {"g": "weight", "b": "bias", "w": "weight"}
    for name in variable_shapes(hparams):
        if name.startswith("model/h"):
            block, *path, weight = name.removeprefix("model/h").split("/")
            names[name] = ".".join(["h", block, *path, suffix[weight]])
    return names


def hf_shape(shape):
    """An OpenAI variable shape without the leading 1 of its Conv1D weights."""
    return shape[1:] if len(shape) == 3 else shape


def read_config(model_dir):
    """The config.json of a Hugging Face folder as a dict; one-line errors for a bad file."""
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        return read_json(path, MAX_CONFIG_BYTES, expect_object=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; is {model_dir} a Hugging Face model folder?") from None


def hparams_from_config(config, source=CONFIG_FILE):
    """HParams of a Hugging Face GPT-2 config dict; CheckpointError for another model or options
    this model does not implement (each named)."""
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, not 'gpt2': only GPT-2 models can be loaded")
    value = {**_DEFAULTS, **config}.get
    unsupported = []
    if value("activation_function") not in _GELU_TANH:
        unsupported.append(f"activation_function {value('activation_function')!r} (GPT-2 uses 'gelu_new')")
    if value("layer_norm_epsilon") != 1e-5:
        unsupported.append(f"layer_norm_epsilon {value('layer_norm_epsilon')!r} (GPT-2 uses 1e-05)")
    n_embd = value("n_embd")
    if value("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None):
        unsupported.append(f"n_inner {value('n_inner')!r} (GPT-2 uses 4 * n_embd)")
    for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if value(key) != _DEFAULTS[key]:
            unsupported.append(f"{key} {value(key)!r}")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported GPT-2 options: {', '.join(unsupported)}")
    n_ctx = config.get("n_positions", config.get("n_ctx", _DEFAULTS["n_positions"]))
    try:
        return HParams(n_vocab=value("vocab_size"), n_ctx=n_ctx, n_embd=n_embd,
                       n_head=value("n_head"), n_layer=value("n_layer"))
    except ValueError as error:
        raise CheckpointError(f"{source}: {str(error).removeprefix('hparams: ')}") from None


# The transformers release whose `save_pretrained` layout config_from_hparams reproduces (it
# writes `dtype`; releases before 4.56 wrote the same value as `torch_dtype`).
TRANSFORMERS_VERSION = "5.25.0"  # the release whose GPT2Config output the tests hold


def config_from_hparams(hparams):
    """The config.json transformers writes for GPT-2 at this shape: `GPT2Config(...).to_diff_dict()`
    (its own settings and the base keys it always writes, n_ctx included, which tools such as
    llama.cpp's convert_hf_to_gguf.py read), plus the `architectures` and `dtype` that a model's
    `save_pretrained` adds."""
    return {
        "activation_function": "gelu_new", "add_cross_attention": False, "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": EOT_ID, "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": EOT_ID,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": hparams.n_ctx,
        "n_embd": hparams.n_embd, "n_head": hparams.n_head, "n_inner": None, "n_layer": hparams.n_layer,
        "n_positions": hparams.n_ctx, "pad_token_id": None, "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "tie_word_embeddings": True, "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True, "vocab_size": hparams.n_vocab,
    }


def read_hparams(model_dir):
    """HParams from a Hugging Face folder's config.json (reads no weights, needs no safetensors)."""
    return hparams_from_config(read_config(model_dir), os.path.join(model_dir, CONFIG_FILE))


def weight_files(model_dir):
    """The safetensors files of a Hugging Face folder: [model.safetensors] or its shards.

    A folder with weights only in another format (pytorch_model.bin, ...) is refused, saying why.
    """
    single = os.path.join(model_dir, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            shards = list(read_json(index, MAX_INDEX_BYTES)["weight_map"].values())
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
        for shard in shards:
            # A shard is a file of this folder: no path (../.., /etc/...), only a safetensors file name.
            if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
                raise CheckpointError(
                    f"{index}: shard {shard!r} is not a .safetensors file name in the folder (no paths allowed); "
                    "refusing the index"
                )
        shards = sorted(set(shards))
        paths = [os.path.join(model_dir, shard) for shard in shards]
        missing = [shard for shard, path in zip(shards, paths) if not os.path.isfile(path)]
        if missing:
            raise CheckpointError(f"{index}: shards not found: {', '.join(missing)}; download them again")
        return paths
    if any(_SHARD.fullmatch(name) for name in os.listdir(model_dir)):
        raise CheckpointError(f"{index}: not found; the sharded weights need their index")
    for name, why in _OTHER_FORMATS.items():
        if os.path.isfile(os.path.join(model_dir, name)):
            raise CheckpointError(
                f"{os.path.join(model_dir, name)}: only safetensors weights are read ({name} is {why}); "
                f"get the folder's {WEIGHTS_FILE} instead"
            )
    raise CheckpointError(f"{single}: not found; is {model_dir} a Hugging Face GPT-2 folder?")


class HFTensors(Weights):
    """The weights of a Hugging Face GPT-2 folder, read one tensor at a time. Opening checks
    config.json and every tensor's name, shape and dtype from the files' headers (and that an
    lm_head.weight, if any, equals wte); `read` casts float16 and bfloat16 values."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.hparams = read_hparams(model_dir)
        self._names = hf_names(self.hparams)
        self._shapes = variable_shapes(self.hparams)
        self._files = {}
        self._where = {}  # HF name as stored -> open safe_open handle
        try:
            self._open(weight_files(model_dir))
            self._check()
        except BaseException:
            self.close()
            raise

    def _open(self, paths):
        try:
            import safetensors
        except ImportError:
            raise CheckpointError(HINT.format("reading")) from None
        for path in paths:
            try:
                try:  # pread(2) where safetensors can (0.8 on): a memory map counts the file as resident until closed
                    handle = safetensors.safe_open(path, framework="np", backend="pread")
                except TypeError:
                    handle = safetensors.safe_open(path, framework="np")
            except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, ...: one line
                raise CheckpointError(
                    f"{path}: unreadable safetensors file ({first_line(error)}); download it again") from None
            self._files[path] = handle
            for key in handle.keys():
                self._where.setdefault(key, handle)

    def _check(self):
        prefix = PREFIX if any(key.startswith(PREFIX) for key in self._where) else ""
        expected = {prefix + hf: hf_shape(self._shapes[openai]) for openai, hf in self._names.items()}
        self._stored = {openai: prefix + hf for openai, hf in self._names.items()}
        found, wrong_dtype = {}, []  # the shapes of expected keys; unexpected keys (mask buffers aside): None
        for key in sorted(self._where):
            if key in expected:
                part = self._where[key].get_slice(key)
                found[key] = part.get_shape()
                if part.get_dtype() not in _FLOAT_DTYPES:
                    wrong_dtype.append(f"{key} {part.get_dtype()}")
            elif key != LM_HEAD and not _MASK_BUFFER.fullmatch(key.removeprefix(prefix)):
                found[key] = None
        check_variables(self._weights_name(), os.path.join(self.model_dir, CONFIG_FILE), found, expected,
                        [f"not floating point: {', '.join(wrong_dtype)}"] if wrong_dtype else [])
        if LM_HEAD in self._where and not np.array_equal(self._get(LM_HEAD), self.read("model/wte")):
            raise CheckpointError(
                f"{self._weights_name()}: {LM_HEAD} differs from {prefix}wte.weight: GPT-2 ties its output "
                "layer to the token embedding, so a model with its own output layer is not GPT-2"
            )

    def _weights_name(self):
        paths = list(self._files)
        return paths[0] if len(paths) == 1 else os.path.join(self.model_dir, INDEX_FILE)

    def _get(self, key):
        """Tensor `key` as stored (any dtype)."""
        try:
            return self._where[key].get_tensor(key)
        except Exception as error:  # noqa: BLE001 - a damaged file: one line naming it
            raise CheckpointError(
                f"{self.model_dir}: cannot read {key} ({first_line(error)}); download it again") from None

    def read(self, name):
        """OpenAI variable `name` as a new float32 array of OpenAI's shape whose data starts on an
        ALIGNMENT boundary (values stored as float16/bfloat16 are cast)."""
        stored = self._get(self._stored[name])
        value = aligned_empty(self._shapes[name])
        np.copyto(value, stored.reshape(value.shape), casting="same_kind")
        return value

    def close(self):
        """Releases the open files."""
        for handle in self._files.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._files.clear()
        self._where.clear()


def aligned_empty(shape):
    """An uninitialised C-contiguous float32 array whose data starts on an ALIGNMENT boundary."""
    size = int(np.prod(shape))
    raw = np.empty(4 * size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + 4 * size].view(np.float32).reshape(shape)


def write_hf_weights(hparams, value_of, model_dir):
    """Writes config.json, model.safetensors (save_pretrained's names: `transformer.` prefix, no
    lm_head since it is tied) and generation_config.json into the existing folder `model_dir`;
    `value_of(openai_name)` gives each variable's values (any float32 array-like of its shape)."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise CheckpointError(HINT.format("writing")) from None
    tensors = {}
    for name, hf in hf_names(hparams).items():
        value = np.asarray(value_of(name), dtype=np.float32)
        tensors[PREFIX + hf] = np.ascontiguousarray(value.reshape(hf_shape(variable_shapes(hparams)[name])))
    save_file(tensors, os.path.join(model_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(os.path.join(model_dir, CONFIG_FILE), config_from_hparams(hparams))
    _write_json(os.path.join(model_dir, GENERATION_CONFIG_FILE),
                {"_from_model_config": True, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
                 "transformers_version": TRANSFORMERS_VERSION})


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
