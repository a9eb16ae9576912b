"""Shared by the reduced-precision tests (tests/model/test_bf16.py, test_weight_formats.py)."""

import numpy as np


def naive_greedy(model, prompt, length):
    """Greedy by full forward passes; also each step's margin between the best two logits."""
    tokens, margins = list(prompt), []
    for _ in range(length):
        logits = model(np.array([tokens]))["logits"].numpy()[0, -1]
        best, second = np.sort(logits)[-1], np.sort(logits)[-2]
        margins.append(best - second)
        tokens.append(int(logits.argmax()))
    return tokens, margins
