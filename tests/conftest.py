"""Shared by the suite, laid out like the packages (tests/sampling/, tests/serve/, ...): the
environment every test runs in, and the tiny model's fixtures."""

import atexit
import json
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The session's own compilation cache (subprocesses inherit it), not the user's.
if "GPT2_CACHE_DIR" not in os.environ:
    os.environ["GPT2_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GPT2_CACHE_DIR"], True)

# The sampler tests exercise the compiled loop (what the server and long jobs run); the
# uncompiled sampler that short jobs start on has its own tests (test_direct.py), which turn it on.
os.environ.setdefault("GPT2_DIRECT_TOKENS", "0")

from paths import TINY_MODEL  # noqa: E402 - tests/paths.py, next to this file


@pytest.fixture(scope="session")
def reference():
    with open(os.path.join(TINY_MODEL, "reference.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_model():
    import gpt2

    return gpt2.load_model(TINY_MODEL)
