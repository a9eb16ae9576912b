"""Sampling from GPT-2: settings (TensorFlow-free), logit processors, token choice, the compiled
decode loop over a pool of slots, and the public functions.

    settings.py    SamplingSettings, SettingsError, Row (one request row), row seeds, context checks (no TensorFlow)
    processors.py  penalties, logit bias, temperature, top-k / top-p
    choose.py      greedy or one exact draw per row from its own random stream; log-probabilities
    decoder.py     the compiled loop: prompt ingestion, decoding, the window sliding past n_ctx
    direct.py      the uncompiled sampler short jobs start on (no compile wait)
    pool.py        the loop's state in variables, rows admitted into and released from slots
    speculative.py speculative decoding of one row on the uncompiled sampler (a draft model, prompt lookup)
    api.py         sample_sequence, stream, generate, sample_rows

Importing this package does not import TensorFlow; the names below load their module on use.
"""

import importlib

_LAZY = {
    "SamplingSettings": "gpt2.sampling.settings",
    "SettingsError": "gpt2.sampling.settings",
    "row_seeds": "gpt2.sampling.settings",
    "Row": "gpt2.sampling.settings",
    "sample_sequence": "gpt2.sampling.api",
    "sample_rows": "gpt2.sampling.api",
    "stream": "gpt2.sampling.api",
    "generate": "gpt2.sampling.api",
    "DraftModel": "gpt2.sampling.speculative",
    "PromptLookup": "gpt2.sampling.speculative",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2.sampling' has no attribute {name!r}")
