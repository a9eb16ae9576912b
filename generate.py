"""Generates text with GPT-2: `python generate.py --model 124M --prompt "..."` (see --help)."""

import os
import sys

# Quiet TensorFlow's C++ INFO/WARNING lines; must be set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpt2.generate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
