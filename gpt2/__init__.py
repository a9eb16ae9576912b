"""OpenAI's GPT-2 in TensorFlow 2 / Keras 3, reading and writing OpenAI's original checkpoints.

TensorFlow is imported on first use of a name that needs it, so command-line tools answer
`--help` and usage errors without paying for it. Importing the package changes nothing else: the
compilation cache (gpt2/compile_cache.py) is turned on by the tools and the compiled samplers.
"""

import importlib

from gpt2.hparams import PRESETS, HParams

_LAZY = {
    "GPT2": "gpt2.model",
    "CheckpointError": "gpt2.checkpoint",
    "load_model": "gpt2.checkpoint",
    "save_checkpoint": "gpt2.checkpoint",
    "write_random_checkpoint": "gpt2.checkpoint",
    "generate": "gpt2.sampling.api",
    "sample_sequence": "gpt2.sampling.api",
    "stream": "gpt2.sampling.api",
    "SamplingSettings": "gpt2.sampling.settings",
    "SettingsError": "gpt2.sampling.settings",
    "download_model": "gpt2.download",
    "score": "gpt2.scoring",
    "perplexity": "gpt2.scoring",
    "finetune": "gpt2.train.trainer",
    # speculative decoding: sample_sequence(..., draft=DraftModel(small_model) or PromptLookup())
    "DraftModel": "gpt2.sampling.speculative",
    "PromptLookup": "gpt2.sampling.speculative",
}

__all__ = ["HParams", "PRESETS", *_LAZY]

# What the command-line tools say when TensorFlow is missing (it comes through an extra, see setup.py).
TENSORFLOW_MISSING = (
    "TensorFlow is not installed; install this project with its TensorFlow build: pip install '.[cpu]' "
    "(or '.[gpu]' for NVIDIA GPUs on Linux) in the project folder"
)


def is_tensorflow_missing(error):
    """True if `error` is the ImportError of a missing TensorFlow (or Keras, which comes with it)."""
    return isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in ("tensorflow", "keras")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
