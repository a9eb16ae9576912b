"""A persistent cache of XLA-compiled programs, on by default, so later runs skip compiling.

TensorFlow-free. TensorFlow (2.16+) saves each XLA executable in the folder named by
`TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR` and loads it in later processes that
build the same program. An entry is machine code that TensorFlow runs as it finds it, so the
folder is a trust boundary, as ~/.ssh is for ssh:

* the shared folder is used only if it is owned by the current user and not writable by group or
  others (else a one-line warning and no cache); it is created 0700;
* entries live in a subfolder per kind of processor and TensorFlow build (`machine_key`): an
  entry compiled for another CPU (a home folder shared between machines) is never offered to
  TensorFlow, which would run it and could die of an illegal instruction;
* every entry is published under a name that carries a SHA-256 of the entry's name and bytes,
  verified before TensorFlow can read it: an entry that does not match (flipped bytes, code
  replaced, cut short) is deleted, and its program compiled again;
* TensorFlow's own files are written in place, and a truncated one makes every later use of that
  program fail; so each process gets a private folder inside the shared one: verified entries of
  the shared folder are hard-linked (or copied) into it at start, TensorFlow writes only there,
  and `publish` moves the new entries that are complete into the shared folder with one atomic
  rename each (after the first compile of a sampler, and at exit);
* should TensorFlow still fail to read an entry (one written bad), `recover` turns the cache off
  for the rest of the process, removes the entries it took from the shared folder, and the caller
  compiles its program again (see `gpt2.sampling.pool.Pool.run`).

    GPT2_CACHE_DIR=/path/to/dir   the shared folder (default: $XDG_CACHE_HOME/gpt2-tf2/xla, or
                                  ~/.cache/gpt2-tf2/xla); one user's processes may share it, other
                                  users need their own
    GPT2_CACHE_DIR=off            no cache (also: 0, false, no, none)

Nothing is turned on by importing `gpt2`: the command-line tools (`gpt2.runtime.import_tensorflow`)
and the compiled samplers call `enable()`, which must come before the process's first XLA
compile. A TF_XLA_FLAGS that already names a cache folder is kept (and not checked).
"""

import atexit
import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import threading
import time

ENV = "GPT2_CACHE_DIR"
OFF = {"off", "0", "false", "no", "none"}
FLAG = "--tf_xla_persistent_cache_directory"
PRIVATE_PREFIX = ".process-"
STALE_SECONDS = 7 * 24 * 3600  # private folders of dead processes are removed after this
ENTRY = re.compile(r"(?P<name>[^/\\]+\.pb)\.sha256-(?P<digest>[0-9a-f]{64})")  # a shared entry's file name
# What TensorFlow says when an entry it read is not a program (it then fails the call, and keeps
# failing it for the rest of the process): a field that fails to parse, or (DataLossError) a file
# that is neither a binary nor a text-format XlaSerializedCacheEntry.
READ_ERRORS = ("Failed to parse serialized", "XlaSerializedCacheEntry", "as binary proto")

_lock = threading.Lock()
_state = {"shared": None, "private": None, "taken": {}, "off": False}
_warned = set()


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
    the cache is off, already set by TF_XLA_FLAGS, or its folder is unusable or untrusted."""
    with _lock:
        if _state["private"] is not None:
            return _state["shared"]
        if FLAG in os.environ.get("TF_XLA_FLAGS", ""):
            return None
        root = configured_dir()
        if root is None:
            return None
        shared = os.path.join(root, machine_key())
        try:
            for folder in (root, shared):
                os.makedirs(folder, mode=0o700, exist_ok=True)
            for folder in (root, shared):
                problem = untrusted(folder)
                if problem:
                    _warn(f"not using the compilation cache {folder}: it {problem}; run `chmod 700 {folder}` if "
                          f"it is yours, or set {ENV} to a folder of your own ({ENV}=off: no cache)")
                    return None
            _remove_stale(shared)
            taken = verified_entries(shared)
            private = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=shared)
            for name, path in taken.items():
                _link_or_copy(path, os.path.join(private, name))
        except OSError:
            return None  # read-only or full disk: run without a cache
        flags = os.environ.get("TF_XLA_FLAGS", "")
        os.environ["TF_XLA_FLAGS"] = f"{flags} {FLAG}={private}".strip()
        _state.update(shared=shared, private=private, taken=taken)
        atexit.register(_finish)
        return shared


def machine_key():
    """The subfolder for this kind of machine: its architecture and a hash of the processor's
    model and feature flags and of the TensorFlow build, the things a compiled entry depends on."""
    facts = [platform.machine(), platform.system()]
    for distribution in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            facts.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = {line.split(":", 1)[0].strip(): line for line in f if ":" in line}  # the last CPU's
        facts += [lines.get(key, "") for key in ("vendor_id", "model name", "flags", "Features", "CPU part")]
    except OSError:
        facts.append(platform.processor())
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(repr(facts).encode()).hexdigest()[:16]}"


def holds_entries():
    """Whether this process found verified entries in the shared folder (TensorFlow may load its
    program from one of them rather than compile it; entries are named by hashes, so which
    program each holds is not known)."""
    return bool(_state["taken"])


def untrusted(folder):
    """Why `folder` may not hold programs this process runs ("is owned by uid 0, not you (uid
    1000)", "is writable by group and others (mode 0777)"), or None if it may. POSIX only: on
    other systems the folder's access rules are the user profile's."""
    if os.name != "posix":
        return None
    info = os.stat(folder)
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not you (uid {os.geteuid()})"
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writers:
        return f"is writable by {' and '.join(writers)} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def checksum(name, path):
    """SHA-256 (hex) of an entry's name and bytes: the name keys the sum, so an entry's sum is
    not valid for another entry."""
    digest = hashlib.sha256(name.encode() + b"\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_entries(shared):
    """{entry name: path} of the shared folder's entries whose bytes match their checksum. Every
    other entry is deleted: a mismatch, a file that is not a regular file of this user's, and an
    entry without a checksum (written before checksums, or not by this code)."""
    found = {}
    for file_name in _list(shared):
        if file_name.startswith("."):
            continue
        path = os.path.join(shared, file_name)
        match = ENTRY.fullmatch(file_name)
        if match is None:
            if file_name.endswith(".pb"):
                _remove(path)
            continue
        name = match["name"]
        if name not in found and _own_file(path) and checksum(name, path) == match["digest"]:
            found[name] = path
        else:
            _remove(path)
    return found


def publish():
    """Moves this process's new, complete entries into the shared folder (atomic per file), each
    under its checksummed name. Returns how many (0 when the cache is off)."""
    with _lock:
        shared, private = _state["shared"], _state["private"]
        if private is None or _state["off"]:
            return 0
        present = {match["name"] for match in map(ENTRY.fullmatch, _list(shared)) if match}
        published = 0
        for name in _entries(private):
            if name in present:
                continue
            source = os.path.join(private, name)
            temporary = os.path.join(shared, f".{name}.{os.getpid()}.tmp")
            try:
                _link_or_copy(source, temporary)
                os.replace(temporary, os.path.join(shared, f"{name}.sha256-{checksum(name, temporary)}"))
                published += 1
            except OSError:
                _remove(temporary)
        return published


def recover(error):
    """For a compiled call that raised `error`: True if it is TensorFlow failing to read an entry
    of this process's cache. Then the cache is off for the rest of the process (nothing more is
    read or published), the entries it took from the shared folder are deleted (the bad one is
    among them; TensorFlow does not say which), one line says so, and the caller should build its
    program again under new names (TensorFlow keeps failing the old one) and call it once more."""
    message = str(error)
    with _lock:
        private = _state["private"]
        if private is None or _state["off"] or not any(text in message for text in READ_ERRORS):
            return False
        _state["off"] = True
        for name in _list(private):
            _remove(os.path.join(private, name))
        for path in _state["taken"].values():
            _remove(path)
        shared = _state["shared"]
    _warn(f"TensorFlow could not read an entry of the compilation cache {shared} "
          f"({message.splitlines()[0][:120]}); deleted the entries it read and compiling again without the cache. "
          f"If this repeats, delete the folder's contents or set {ENV}=off")
    return True


def _warn(message):
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _finish():
    publish()
    private = _state["private"]
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


def _list(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _own_file(path):
    """A regular file (not a link) of this user's."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (os.name != "posix" or info.st_uid == os.geteuid())


def _entries(folder):
    """Names of the complete TensorFlow cache entries in a private `folder`."""
    return [name for name in _list(folder) if name.endswith(".pb") and not name.startswith(".")
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
    with contextlib.suppress(OSError):
        os.remove(path)


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
