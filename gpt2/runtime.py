"""Process-level helpers that library code and the command-line tools share, without TensorFlow:
quieting TensorFlow's start-up logs (and importing it so), and the process's umask."""

import contextlib
import importlib
import os
import sys

from gpt2 import compile_cache


def current_umask():
    """The process's umask (reading it means setting it: it is set back at once), so that a file
    made by tempfile (mode 0600) can get the mode a plain open() would give: 0o666 & ~umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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

        def quiet_exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            with _stderr_caught():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


@contextlib.contextmanager
def _stderr_caught():
    """Runs the block with file descriptor 2 pointed at a temporary file, whose content is written
    to stderr if the block raises an exception (not for Ctrl-C). Without a real descriptor 2
    (embedded interpreters) the block runs plainly."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
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
