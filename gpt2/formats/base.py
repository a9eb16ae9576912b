"""What every model folder format shares, without TensorFlow: the error and weights types, OpenAI's
variable names and shapes (every format is read into them), one-line messages, file hashes and the
check that a model fits in memory."""

import hashlib
import json
import os
import sys

from gpt2.hparams import summarize


class CheckpointError(ValueError):
    """A model folder that cannot be read: the message says which file and what to do."""


class Weights:
    """A format's checked weights (see gpt2.formats), a context manager; close() releases its files."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def first_line(error):
    """The first line of an error's message (its kind if it has none), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def saving_format(hparams):
    """The gpt2.formats module that writes a model of `hparams` (its `save_checkpoint`):
    gpt2ml (their released layout) for GPT2MLHParams, else openai."""
    from gpt2.formats import gpt2ml, openai
    from gpt2.hparams import GPT2MLHParams

    return gpt2ml if isinstance(hparams, GPT2MLHParams) else openai


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


def refuse_other_shape(model_dir, old, new):
    """Raises CheckpointError if the shape settings `old` of the model in `model_dir` differ from
    `new` (both {name: value}): replacing it could not be atomic (its settings file and the
    weights would change in two steps)."""
    changed = ", ".join(f"{name} {old[name]} -> {new[name]}" for name in new if old[name] != new[name])
    if changed:
        raise CheckpointError(f"{model_dir} holds a model of another shape ({changed}); save into a new folder or "
                              "delete it first")


def check_variables(where, source, found, expected, more_problems=()):
    """Raises one CheckpointError ("`where`: does not match `source`: ...") listing the tensors of
    `expected` ({name: shape}) that `found` ({name: shape}) lacks, the names it should not have,
    those in the wrong shape (each list cut short with a count when long) and `more_problems`."""
    misshaped = [f"{name} {list(found[name])} (expected {expected[name]})"
                 for name in sorted(set(expected) & set(found)) if list(found[name]) != expected[name]]
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    problems = [f"missing {_listed(missing)}"] if missing else []
    problems += [f"unexpected {_listed(unexpected)}"] if unexpected else []
    problems += [f"wrong shape: {summarize(misshaped, sep=', ')}"] if misshaped else []
    problems += more_problems
    if problems:
        raise CheckpointError(f"{where}: does not match {source}: {'; '.join(problems)}")


def read_json(path, limit, expect_object=False):
    """A JSON file's value; CheckpointError (one line) for a file over `limit` bytes, invalid JSON,
    JSON nested too deeply for Python's parser or, with `expect_object`, not an object.
    FileNotFoundError passes through."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit >> 20} MiB, too large for this file; is it the right file?")
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a usable JSON file (nested too deeply)") from None
    if expect_object and not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _listed(names, limit=5):
    """A list of variable names for a message: all of them if few, else a count and the first three."""
    if len(names) <= limit:
        return repr(names)
    return f"{len(names)} variables ({', '.join(names[:3])}, ...)"


def file_sha256(path):
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_fits_in_memory(hparams, source, bytes_per_weight=4):
    """Raises CheckpointError if the weights of `hparams` alone exceed this machine's memory."""
    needed = bytes_per_weight * hparams.parameter_count
    total = physical_memory()
    if total is not None and needed > total:
        raise CheckpointError(
            f"{source}: the model's {hparams.parameter_count:,} weights need {needed / 2**20:,.0f} MiB of "
            f"memory, more than this machine's {total / 2**20:,.0f} MiB; check its hparams.json"
        )


def physical_memory():
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
