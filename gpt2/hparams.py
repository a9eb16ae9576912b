"""GPT-2 hyperparameters: the five numbers in OpenAI's `hparams.json`."""

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class HParams:
    """Shape of a GPT-2 model.

    n_vocab: tokens in the vocabulary; n_ctx: longest sequence (positions);
    n_embd: width of the residual stream; n_head: attention heads (must divide
    n_embd); n_layer: transformer blocks.
    """

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"hparams: {field.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"hparams: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, values, source="hparams"):
        """Builds HParams from a mapping, reporting unknown or missing keys by name."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(names - set(values))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise ValueError(f"{source}: {'; '.join(parts)} (expected {sorted(names)})")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {str(error).removeprefix('hparams: ')}") from None

    @classmethod
    def from_json(cls, path):
        """Reads OpenAI's `hparams.json`; a missing or malformed file is a one-line ValueError."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: hparams file not found")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(values, source=path)

    def to_json(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
            f.write("\n")


PRESETS = {
    "124M": HParams(n_embd=768, n_head=12, n_layer=12),
    "355M": HParams(n_embd=1024, n_head=16, n_layer=24),
    "774M": HParams(n_embd=1280, n_head=20, n_layer=36),
    "1558M": HParams(n_embd=1600, n_head=25, n_layer=48),
}

# OpenAI first published 124M and 355M as 117M and 345M.
OLD_NAMES = {"117M": "124M", "345M": "355M"}
