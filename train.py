"""Fine-tunes GPT-2: `python train.py --model 124M --dataset corpus.txt --output models/my-run` (see --help)."""

import sys

from gpt2.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
