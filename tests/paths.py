"""Folders the tests read, for test modules in any subfolder (tests/ is on sys.path: its
conftest.py is there)."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DATA = os.path.join(TESTS, "data")
TINY_MODEL = os.path.join(DATA, "tiny-model")
