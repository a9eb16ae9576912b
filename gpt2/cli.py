"""What the command-line tools share (TensorFlow-free): exit codes, argparse with one-line
usage errors, number types, and one helper (main_of) that runs a command's body with every error
reported in one line. Library code does not import this module (see gpt2.runtime)."""

import argparse
import contextlib
import sys

DEFAULT_MODEL = "124M"
DEFAULT_MODELS_DIR = "models"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ...`) instead of the full usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def number(kind, check, requirement):
    """An argparse type: `kind(text)` that must satisfy `check`, else the message `requirement`."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


positive_int = number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")


def fail(message, code):
    """Prints `error: message` as one line on stderr and returns `code`."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a full disk, a closed or missing stdout
        sys.stdout.flush()
    print("error: " + " ".join(lines), file=sys.stderr, flush=True)
    return code


def user_errors():
    """Exception kinds that bad input raises (reported in one line, never as a traceback):
    ValueError (bad values, prompt too long, malformed files; CheckpointError is one), OSError
    (missing model, prompt file), MemoryError, DownloadError and TensorFlow's OpError (e.g. out
    of memory while loading a large model)."""
    kinds = [ValueError, OSError, MemoryError]
    download = sys.modules.get("gpt2.download")
    if download is not None:
        kinds.append(download.DownloadError)
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "errors"):
        kinds.append(tf.errors.OpError)
    return tuple(kinds)


def add_model_arguments(parser, required=False, role="the model"):
    """--model and --models-dir, worded alike by every tool (`parser` may be an argument group).
    required: no default model (the server names what it serves)."""
    default = None if required else DEFAULT_MODEL
    parser.add_argument(
        "--model", default=default, required=required, metavar="NAME_OR_DIR",
        help=f"{role}: a size (124M, 355M, 774M, 1558M; old names 117M, 345M) looked up under --models-dir, "
             "or the path of any model folder in OpenAI's or Hugging Face's layout (fine-tuned ones too)"
             + ("" if required else f" (default: {DEFAULT_MODEL})"),
    )
    parser.add_argument(
        "--models-dir", default=DEFAULT_MODELS_DIR, metavar="DIR",
        help=f"folder holding downloaded models, one subfolder per size (default: {DEFAULT_MODELS_DIR})",
    )


def say_compiling(what):
    """Tells the user on stderr why the next step takes a while: `what` (e.g. "sampler") is
    compiled with XLA, or loaded from the persistent compilation cache (gpt2.compile_cache).
    Which one cannot be known beforehand (the cache names its entries by hashes of their
    programs), so this is a heuristic: a cache whose shared folder holds any complete entry is
    taken to hold this program too, and the message says it is compiled if it is not there."""
    from gpt2 import compile_cache

    shared = compile_cache.enable()  # idempotent: the shared folder, or None with no cache
    if shared is None:
        message = f"compiling the {what}..."
    elif compile_cache.holds_entries():
        message = f"loading the compiled {what} from the compilation cache (compiling it if it is not there)..."
    else:
        message = f"compiling the {what} (saved in the compilation cache for the next run)..."
    print(message, file=sys.stderr, flush=True)


class UsageError(Exception):
    """Options that do not go together, found after parsing: `error: ...` and exit 2."""


def main_of(parser, argv, body, interrupted="interrupted", errors=None):
    """A command's main: parses `argv` (--help and usage errors print and give their exit code),
    then returns body(args), the exit code, through run. interrupted: the Ctrl-C message, or a
    function of args that gives it."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error, already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run(lambda: body(args), interrupted(args) if callable(interrupted) else interrupted, errors)


def run(body, interrupted="interrupted", errors=None):
    """body() -> exit code; each failure is one line: Ctrl-C (exit 130), a UsageError (2), bad
    input (user_errors(), or `errors`: a tuple of kinds, or a function returning one: 1) and a
    missing TensorFlow (1). A parser.error() that body called (already printed) gives its exit code."""
    try:
        return body()
    except KeyboardInterrupt:
        return fail(interrupted, EXIT_INTERRUPTED)
    except UsageError as error:
        return fail(error, EXIT_USAGE)
    except SystemExit as exit_:
        if isinstance(exit_.code, int):
            return exit_.code
        raise
    except Exception as error:  # noqa: BLE001 - only the kinds bad input raises are caught
        if isinstance(error, (errors() if callable(errors) else errors) or user_errors()):
            return fail(error, EXIT_ERROR)
        from gpt2 import TENSORFLOW_MISSING, is_tensorflow_missing

        if is_tensorflow_missing(error):
            return fail(TENSORFLOW_MISSING, EXIT_ERROR)
        raise
