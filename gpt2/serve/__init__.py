"""The HTTP server for one GPT-2 model, by job (importing this package does not import TensorFlow):

    protocol.py  request validation into plans, choice text (no TensorFlow)
    chat.py      the plain-text chat template (no TensorFlow)
    engine.py    continuous batching over one pool of decoding slots (TensorFlow when built)
    answers.py   choice text from the engine's tokens, OpenAI's logprobs and usage (no TensorFlow)
    api.py       the application: App.handle(Request) -> Response or event stream, the endpoints (no TensorFlow)
    httpd.py     the HTTP server: connections, deadlines, framing, access rules, writing answers (no TensorFlow)
    cli.py       `python -m gpt2.serve` / `gpt2-serve`
    static/      the playground page served at /
"""


def main(argv=None):
    """The `gpt2-serve` command (see gpt2.serve.cli)."""
    from gpt2.serve.cli import main as cli_main

    return cli_main(argv)
