"""`python -m gpt2.serve`: see gpt2.serve.cli."""

from gpt2.serve.cli import main

main()
