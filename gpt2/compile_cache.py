"""A persistent cache of XLA-compiled programs, on by default, so later runs skip compiling.

TensorFlow-free. TensorFlow (2.16+) saves each XLA executable in the folder named by
`TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR` and loads it in later processes that
build the same program. Its files are written in place, and a truncated one (a process killed
mid-write, a full disk, two processes writing at once) makes every later use of that program
fail. So each process gets a private folder inside the shared one: complete entries of the
shared folder are hard-linked (or copied) into it at start, TensorFlow writes only there, and
`publish` moves the new entries that are complete into the shared folder with one atomic rename
each (after the first compile of a sampler, and at exit). An unusable folder just means no cache.

    GPT2_CACHE_DIR=/path/to/dir   the shared folder (default: $XDG_CACHE_HOME/gpt2-tf2/xla, or
                                  ~/.cache/gpt2-tf2/xla)
    GPT2_CACHE_DIR=off            no cache (also: 0, false, no, none)

`enable()` runs when `gpt2` is imported; it must come before the process's first XLA compile
(importing TensorFlow first is fine). A TF_XLA_FLAGS that already names a cache folder is kept.
"""

import atexit
import os
import shutil
import sys
import tempfile
import threading
import time

ENV = "GPT2_CACHE_DIR"
OFF = {"off", "0", "false", "no", "none"}
FLAG = "--tf_xla_persistent_cache_directory"
PRIVATE_PREFIX = ".process-"
STALE_SECONDS = 7 * 24 * 3600  # private folders of dead processes are removed after this

_lock = threading.Lock()
_state = {"shared": None, "private": None}


def default_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2-tf2", "xla")


def configured_dir():
    """The shared folder the settings ask for, or None when the cache is off."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF | {""}:
        return None
    return os.path.abspath(os.path.expanduser(value)) if value else default_dir()


def enable():
    """Turns the cache on for this process (idempotent). Returns the shared folder, or None if
    the cache is off, already set by TF_XLA_FLAGS, or its folder is unusable."""
    with _lock:
        if _state["private"] is not None:
            return _state["shared"]
        if FLAG in os.environ.get("TF_XLA_FLAGS", ""):
            return None
        shared = configured_dir()
        if shared is None:
            return None
        try:
            os.makedirs(shared, exist_ok=True)
            _remove_stale(shared)
            private = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=shared)
            for name in _entries(shared):
                _link_or_copy(os.path.join(shared, name), os.path.join(private, name))
        except OSError:
            return None  # read-only or full disk: run without a cache
        flags = os.environ.get("TF_XLA_FLAGS", "")
        os.environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={private}".strip()
        _state.update(shared=shared, private=private)
        atexit.register(_finish)
        return shared


def publish():
    """Moves this process's new, complete entries into the shared folder (atomic per file)."""
    with _lock:
        shared, private = _state["shared"], _state["private"]
        if private is None:
            return 0
        published = 0
        for name in _entries(private):
            target = os.path.join(shared, name)
            if os.path.exists(target):
                continue
            temporary = os.path.join(shared, f".{name}.{os.getpid()}.tmp")
            try:
                _link_or_copy(os.path.join(private, name), temporary)
                os.replace(temporary, target)
                published += 1
            except OSError:
                _remove(temporary)
        return published


def _finish():
    publish()
    private = _state["private"]
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


def _entries(folder):
    """Names of the complete cache entries in `folder`."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [name for name in names if name.endswith(".pb") and not name.startswith(".")
            and is_complete(os.path.join(folder, name))]


def is_complete(path):
    """True if `path` is a whole serialized protocol buffer: every top-level field's declared
    length fits exactly. (A cache entry cut short fails this; TensorFlow would fail on it.)
    Reads only the fields' headers and seeks past their contents: entries are about 15 MB each,
    and reading one whole at exit was the peak of generate.py's memory."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            position = 0
            while position < end:
                key = _read_varint(f)
                wire_type = None if key is None else key & 7
                if wire_type == 0:
                    if _read_varint(f) is None:
                        return False
                    size = 0
                elif wire_type == 2:
                    size = _read_varint(f)
                    if size is None:
                        return False
                elif wire_type in (1, 5):
                    size = 8 if wire_type == 1 else 4
                else:
                    return False
                position = f.tell() + size
                f.seek(position)
            return end > 0 and position == end
    except OSError:
        return False


def _read_varint(f):
    """The base-128 varint at the file's position, or None at its end or past 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
    return None


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _remove_stale(shared):
    """Private folders and temporary files left by processes that are gone."""
    now = time.time()
    for name in os.listdir(shared):
        path = os.path.join(shared, name)
        if not name.startswith("."):
            continue
        try:
            age = now - os.path.getmtime(path)
        except OSError:
            continue
        if name.startswith(PRIVATE_PREFIX):
            pid = name[len(PRIVATE_PREFIX):].split("-", 1)[0]
            if age > STALE_SECONDS or (pid.isdigit() and not _alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".tmp") and age > 3600:
            _remove(path)


def _alive(pid):
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would end the process on Windows; rely on age instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
