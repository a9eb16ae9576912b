"""Tiny random GPT2-ML folders in their exact layout (imcaspar/gpt2-ml's released files: the TF1
checkpoint with global_step and Adafactor slots, config.json), with a small WordPiece vocabulary
built here (their clue-vocab.txt cannot be fetched): ids as in theirs for [PAD] 0, [UNK] 100,
[CLS] 101, [SEP] 102, [MASK] 103, then CJK characters, chat's role words and some punctuation."""

import math
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


def write_folder(path, hparams=HPARAMS, seed=0, step=220000, with_vocab=True, weights=None):
    """Writes a GPT2-ML folder as released (model.ckpt-STEP with global_step and Adafactor's
    slots, config.json) and the test vocabulary; returns the weights {their name: float32 array}
    (random_weights(hparams, seed) unless given)."""
    weights = random_weights(hparams, seed) if weights is None else weights
    gpt2ml.write_checkpoint(hparams, str(path), weights.__getitem__, step=step, slots=True)
    if with_vocab:
        with open(os.path.join(path, VOCAB_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(vocab(hparams.n_vocab)) + "\n")
    return weights


def numpy_forward(weights, tokens, hparams=HPARAMS):
    """Their forward pass in float64 (train/modeling.py, GroverModel): logits [s, V] of one row."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    erf = np.vectorize(math.erf)

    def norm(x, scope):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[scope + "/gamma"] + w[scope + "/beta"]

    def dense(x, scope):
        return x @ w[scope + "/kernel"] + w[scope + "/bias"]

    s, h, d = len(tokens), hparams.n_head, hparams.n_embd // hparams.n_head
    x = w["newslm/embeddings/word_embed"][tokens] + w["newslm/embeddings/pos_embed"][:s]
    x = norm(x, "newslm/embeddings/LayerNorm_embed_norm")
    mask = np.tril(np.ones([s, s]))
    for layer in range(hparams.n_layer):
        scope = f"newslm/layer{layer:02d}/"
        q, k, v = (dense(x, scope + name).reshape(s, h, d).transpose(1, 0, 2)
                   for name in ("query_layer", "key_layer", "value_layer"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = scores * mask - 1e10 * (1 - mask)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(s, h * d)
        x = x + dense(context, scope + "context_projection_layer")
        inner = dense(norm(x, scope + "LayerNorm_mlp_ln0"), scope + "intermediate")
        inner = inner * 0.5 * (1.0 + erf(inner / math.sqrt(2.0)))
        x = norm(x + dense(inner, scope + "output"), scope + "LayerNorm_mlp_ln1")
    return x @ w["newslm/embeddings/word_embed"].T


def pad_loving(weights, hparams=HPARAMS, seed=1):
    """`weights` changed so that [PAD] (0) is the most likely next token after any prompt without
    it, by far: the last block's output LayerNorm gives about 5 u (u a unit vector) and
    word_embed[0] is 5 u. A ban on [PAD] is then all that keeps greedy decoding from drawing it."""
    u = np.random.default_rng(seed).standard_normal(hparams.n_embd)
    u /= np.linalg.norm(u)
    last = f"newslm/layer{hparams.n_layer - 1:02d}/LayerNorm_mlp_ln1/"
    weights = dict(weights)
    weights[last + "gamma"] = np.full(hparams.n_embd, 0.01, np.float32)
    weights[last + "beta"] = (5 * u).astype(np.float32)
    embed = weights["newslm/embeddings/word_embed"].copy()
    embed[0] = 5 * u
    weights["newslm/embeddings/word_embed"] = embed
    return weights
