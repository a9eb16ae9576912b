import json
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY_MODEL = os.path.join(DATA, "tiny-model")


@pytest.fixture(scope="session")
def reference():
    with open(os.path.join(TINY_MODEL, "reference.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_model():
    import gpt2

    return gpt2.load_model(TINY_MODEL)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test (still run by default and in CI)")
