"""Downloads released GPT-2 models: `python download_model.py 124M [355M ...]` (see --help)."""

import sys

from gpt2.download import main

if __name__ == "__main__":
    sys.exit(main())
