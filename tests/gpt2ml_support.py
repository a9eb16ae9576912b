"""Tiny random GPT2-ML folders in their exact layout (imcaspar/gpt2-ml's released files: the TF1
checkpoint with global_step and Adafactor slots, config.json), with a small WordPiece vocabulary
built here (their clue-vocab.txt cannot be fetched): ids as in theirs for [PAD] 0, [UNK] 100,
[CLS] 101, [SEP] 102, [MASK] 103, then CJK characters, chat's role words and some punctuation."""

import os

import numpy as np

from gpt2.formats import gpt2ml
from gpt2.hparams import GPT2MLHParams

HPARAMS = GPT2MLHParams(n_vocab=300, n_ctx=40, n_embd=16, n_head=4, n_layer=2, n_inner=24)
VOCAB_FILE = "clue-vocab.txt"


def vocab(n_vocab=HPARAMS.n_vocab):
    """The test vocabulary: n_vocab tokens, one a line in the file."""
    tokens = ["[PAD]", *[f"[unused{i}]" for i in range(1, 100)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [*"宇宙的意义是，。：！？", "user", "assistant", "system", ":", "a", "b", "##c", "1", "##2"]
    more = (ch for ch in map(chr, range(0x4E00, 0x9FFF)) if ch not in tokens)
    tokens += [next(more) for _ in range(n_vocab - len(tokens))]
    assert len(tokens) == n_vocab and len(set(tokens)) == n_vocab
    return tokens


def random_weights(hparams=HPARAMS, seed=0):
    """Weights with LayerNorm scales and biases away from 1 and 0, so each one matters."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in gpt2ml.variable_shapes(hparams).items():
        value = rng.standard_normal(shape) * (0.3 if name.endswith(("kernel", "_embed")) else 0.1)
        weights[name] = (value + 1.0 if name.endswith("gamma") else value).astype(np.float32)
    return weights


def write_folder(path, hparams=HPARAMS, seed=0, step=220000, with_vocab=True):
    """Writes a GPT2-ML folder as released (model.ckpt-STEP with global_step and Adafactor's
    slots, config.json) and the test vocabulary; returns the weights {their name: float32 array}."""
    weights = random_weights(hparams, seed)
    gpt2ml.write_checkpoint(hparams, str(path), weights.__getitem__, step=step, slots=True)
    if with_vocab:
        with open(os.path.join(path, VOCAB_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(vocab(hparams.n_vocab)) + "\n")
    return weights
