"""What the command-line tools share (TensorFlow-free): exit codes, argparse with one-line
usage errors, number types, one-line error reports, and quieting TensorFlow's start-up logs."""

import argparse
import contextlib
import importlib
import os
import sys

from gpt2 import compile_cache

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
    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):  # a full disk, a closed or missing stdout
        pass
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


def current_umask():
    """The process's umask (reading it means setting it: it is set back at once), so that a file
    made by tempfile (mode 0600) can get the mode a plain open() would give: 0o666 & ~umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def quiet_tensorflow():
    """Keeps TensorFlow's start-up chatter off the screen, unless the user set their own
    TF_CPP_MIN_LOG_LEVEL. Must run before TensorFlow is imported; the import itself may come
    later, anywhere (a tool checks its paths first, and imports TensorFlow only when it needs it).

    TensorFlow logs at error level what is not an error for a user (every hit of the XLA
    compilation cache, missing CUDA drivers on a CPU machine): the level keeps only fatal ones.
    TensorFlow 2.21 also prints a few lines while it is imported whatever the level (oneDNN and
    CUDA lines, logged before absl::InitializeLog, tensorflow/tensorflow#102212): the first import
    of `tensorflow` after this call runs with file descriptor 2 caught, and what it caught is shown
    only if the import fails."""
    if any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        return  # already set up, the import has not happened yet
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _QuietImport())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow():
    """quiet_tensorflow(), turns on the compilation cache (gpt2.compile_cache), then imports
    TensorFlow, for tools that need it at once."""
    quiet_tensorflow()
    compile_cache.enable()
    importlib.import_module("tensorflow")


class _QuietImport:
    """A sys.meta_path finder that runs the import of the `tensorflow` package (the module and
    everything it imports) with file descriptor 2 caught; it removes itself once that ran."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        for finder in [finder for finder in sys.meta_path if finder is not self]:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as it would without this finder
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            return spec
        remove = self._remove

        def quiet_exec_module(module):
            remove()
            with _stderr_caught():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec

    def _remove(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


@contextlib.contextmanager
def _stderr_caught():
    """Runs the block with file descriptor 2 pointed at a temporary file, whose content is written
    to stderr if the block raises an exception (not for Ctrl-C). Without a real descriptor 2
    (embedded interpreters) the block runs plainly."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    import tempfile

    try:
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            except Exception:
                os.dup2(saved, 2)
                caught.seek(0)
                sys.stderr.write(caught.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


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


def parse(parser, argv):
    """(args, None), or (None, exit code) for --help or a usage error (already printed)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as exit_:
        return None, exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def run(body, interrupted="interrupted", errors=None):
    """body() -> exit code; Ctrl-C and bad input (user_errors(), or `errors`) become one line."""
    try:
        return body()
    except KeyboardInterrupt:
        return fail(interrupted, EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - only the kinds bad input raises are caught
        if isinstance(error, errors or user_errors()):
            return fail(error, EXIT_ERROR)
        raise
