"""GPT-2 hyperparameters: the five numbers in OpenAI's `hparams.json`.

Each number is bounded (LIMITS, MAX_PARAMETERS) well above the largest released model (1558M:
n_vocab 50257, n_ctx 1024, n_embd 1600, n_head 25, n_layer 48, 1.56e9 parameters), so a mistyped
or hostile `hparams.json` is refused at once instead of allocating gigabytes, and error messages
stay one short line however many problems there are.
"""

from __future__ import annotations

import dataclasses
import json
import os

# The weight-only dtypes (load_model(dtype=...), GPT2(weight_dtype=...)): float32 arithmetic on projection
# kernels and wte held narrow (gpt2.layers.NarrowKernel).
NARROW_DTYPES = ("int8", "float16")

# Upper bounds per field, and on the total number of weights (2**36 float32 = 256 GiB).
LIMITS = {"n_vocab": 1 << 22, "n_ctx": 1 << 20, "n_embd": 1 << 16, "n_head": 1 << 10, "n_layer": 1 << 10,
          "n_inner": 1 << 18}
MAX_PARAMETERS = 1 << 36
# A real hparams.json is about 90 bytes; anything this big is not one.
MAX_FILE_BYTES = 1 << 16


def summarize(problems, limit=3, sep="; "):
    """Joins problem descriptions with `sep`, keeping the first `limit` and counting the rest."""
    problems = list(problems)
    shown = sep.join(problems[:limit])
    return shown if len(problems) <= limit else f"{shown}{sep}and {len(problems) - limit} more"


def short_repr(value, width=40):
    """repr(value) cut to `width` characters (a huge number or string stays readable)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclasses.dataclass(frozen=True)
class HParams:
    """Shape of a GPT-2 model.

    n_vocab: tokens in the vocabulary; n_ctx: longest sequence (positions);
    n_embd: width of the residual stream; n_head: attention heads (must divide
    n_embd); n_layer: transformer blocks. Each must be a positive integer up to
    LIMITS[name], and the model at most MAX_PARAMETERS weights; ValueError otherwise.
    """

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self):
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{field.name} must be a positive integer, got {short_repr(value)}")
            elif value > LIMITS[field.name]:
                problems.append(f"{field.name} must be at most {LIMITS[field.name]}, got {short_repr(value)}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not problems and self.parameter_count > MAX_PARAMETERS:
            problems.append(f"these shapes make {self.parameter_count:,} weights, more than the {MAX_PARAMETERS:,} "
                            "allowed")
        if problems:
            raise ValueError(f"hparams: {summarize(problems)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def parameter_count(self) -> int:
        """Number of weights (float32 each in OpenAI's checkpoints), computed without allocating them."""
        e = self.n_embd
        per_layer = 12 * e * e + 13 * e  # attn 4e^2 + 4e, mlp 8e^2 + 5e, two layer norms 4e
        return (self.n_vocab + self.n_ctx) * e + self.n_layer * per_layer + 2 * e

    @classmethod
    def from_dict(cls, values: dict, source: str = "hparams") -> HParams:
        """Builds HParams from a mapping, reporting unknown or missing keys by name."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names), key=str)
        missing = [name for name in names if name not in values]
        if unknown or missing:
            parts = []
            if unknown:
                shown = ", ".join(short_repr(key) for key in unknown[:3])
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                parts.append(f"unknown keys [{shown}]{more}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise ValueError(f"{source}: {'; '.join(parts)} (expected {sorted(names)})")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {str(error).removeprefix('hparams: ')}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> HParams:
        """Reads OpenAI's `hparams.json`; a missing or malformed file is a one-line ValueError."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: hparams file not found")
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: {size:,} bytes is too big for an hparams file (a JSON object of five numbers)")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, too many digits
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        except RecursionError:
            raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
        return cls.from_dict(values, source=path)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
            f.write("\n")


PRESETS = {
    "124M": HParams(n_embd=768, n_head=12, n_layer=12),
    "355M": HParams(n_embd=1024, n_head=16, n_layer=24),
    "774M": HParams(n_embd=1280, n_head=20, n_layer=36),
    "1558M": HParams(n_embd=1600, n_head=25, n_layer=48),
}


@dataclasses.dataclass(frozen=True)
class GPT2MLHParams(HParams):
    """Shape of a GPT2-ML (Grover) model: HParams' five numbers (from their config's vocab_size
    (the embedding's rows), max_position_embeddings, hidden_size, num_attention_heads,
    num_hidden_layers) and n_inner, their intermediate_size (the MLP's width)."""

    n_inner: int = 6144

    @property
    def parameter_count(self):
        e, i = self.n_embd, self.n_inner
        per_layer = 4 * e * e + 4 * e + 2 * e * i + i + e + 4 * e  # q, k, v, projection; MLP; two LayerNorms
        return (self.n_vocab + self.n_ctx) * e + 2 * e + self.n_layer * per_layer


# imcaspar/gpt2-ml's released 1.5B model (configs/mega.json).
GPT2ML_PRESETS = {"1.5B": GPT2MLHParams(n_vocab=8021, n_ctx=1024, n_embd=1536, n_head=24, n_layer=48, n_inner=6144)}

# OpenAI first published 124M and 355M as 117M and 345M.
OLD_NAMES = {"117M": "124M", "345M": "355M"}
