"""OpenAI's GPT-2 in TensorFlow 2 / Keras 3, reading and writing OpenAI's original checkpoints."""

from gpt2.checkpoint import CheckpointError, load_model, save_checkpoint, write_random_checkpoint
from gpt2.hparams import PRESETS, HParams
from gpt2.model import GPT2
from gpt2.sample import generate, sample_sequence

__all__ = [
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "HParams",
    "generate",
    "load_model",
    "sample_sequence",
    "save_checkpoint",
    "write_random_checkpoint",
]
