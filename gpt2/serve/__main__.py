"""`python -m gpt2.serve`: see gpt2.serve.cli."""

import sys

from gpt2.serve.cli import main

sys.exit(main())
