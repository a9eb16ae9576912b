"""Generates text with GPT-2: `python generate.py --model 124M --prompt "..."` (see --help)."""

import sys

from gpt2.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
