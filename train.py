"""Fine-tunes GPT-2: `python train.py --model 124M --dataset corpus.txt --output models/my-run` (see --help)."""

import os
import sys

# Quiet TensorFlow's C++ INFO/WARNING lines; must be set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpt2.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
