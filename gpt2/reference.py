"""The reference path: how GPT-2 makes text, in the fewest lines. Read this first.

Each token is the model's plain forward pass over the whole window (`model(tokens)`: no cache),
the logits at its last position, the sampling settings in the project's order, one token. The
fast paths (README "How it works") compute the same thing with a key/value cache, and the tests
hold them to this: greedy tokens exactly, the settings by their formulas.

Shapes: V = n_vocab.
"""

import numpy as np

from gpt2.sampling.settings import SamplingSettings, check_window_keep


def process(logits, settings, prompt, generated):
    """The settings on float64 logits [V], in order (gpt2.sampling.settings): repetition penalty,
    presence and frequency penalties, logit bias, temperature, top-k, top-p (-inf = removed)."""
    s, logits, penalty = settings, logits.copy(), settings.repetition_penalty
    for token in set(prompt) | set(generated):
        logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
    for token in set(generated):
        logits[token] -= s.presence_penalty + s.frequency_penalty * generated.count(token)
    for token, bias in s.logit_bias:
        logits[token] += bias
    if s.greedy:
        return logits
    logits /= s.temperature
    if 0 < s.top_k < len(logits):  # keep the k largest
        logits[logits < np.sort(logits)[-s.top_k]] = -np.inf
    if s.top_p < 1.0:  # keep the largest whose probabilities sum to at most top_p (at least one)
        ordered = np.sort(logits)[::-1]
        cumulative = np.cumsum(softmax(ordered))
        logits[logits < ordered[max(np.sum(cumulative <= s.top_p) - 1, 0)]] = -np.inf
    return logits


def softmax(logits):
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def generate(model, prompt, length, settings=None, rng=None, window_keep=None):
    """`length` new token ids after `prompt` (a list of ids). settings: a SamplingSettings
    (default: greedy); rng: a numpy Generator or seed for the draws (None: fresh entropy).
    Past n_ctx the window slides: it becomes its last `window_keep` tokens (default n_ctx // 2)."""
    settings = settings or SamplingSettings(temperature=0)
    rng = np.random.default_rng(rng)
    n_ctx = model.hparams.n_ctx
    window, generated = list(prompt), []
    for _ in range(length):
        logits = model(np.array([window], np.int32))["logits"].numpy()[0, -1].astype(np.float64)
        logits = process(logits, settings, prompt, generated)
        token = int(np.argmax(logits)) if settings.greedy else int(rng.choice(len(logits), p=softmax(logits)))
        generated.append(token)
        window.append(token)
        if len(window) > n_ctx:
            window = window[-check_window_keep(window_keep, n_ctx):]
    return generated
