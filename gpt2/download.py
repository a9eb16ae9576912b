"""Downloads released GPT-2 checkpoints (OpenAI's, or a mirror's) into `models/<name>/`, verified.

Nothing unverified is ever kept under a final name. Each file is streamed to `<file>.part`, checked,
and only then renamed (os.replace) onto its final name; a file that fails a check is deleted and
fetched again. The checks, per file:

- every file: exactly the size the server announced (Content-Length / Content-Range), and no
  `text/html` answer (a login or error page served with status 200);
- `encoder.json`, `vocab.bpe`: size and sha256 of GPT-2's BPE files (the same for every model,
  and byte-identical to the copies bundled in `encoder/`);
- `hparams.json`: parses into bounded HParams; `checkpoint`: a state file naming `model.ckpt`;
- `model.ckpt.data-00000-of-00001`: exactly 4 bytes per weight of those hparams (2 for a
  float16 mirror); `model.ckpt.index`: ends in the table footer TensorFlow writes;
  `model.ckpt.meta`: parses as a TensorFlow MetaGraphDef. The `.meta` is optional: a server
  without it (404) is fine, since nothing here reads it;
- then the whole folder: the index holds exactly the variables and shapes of hparams.json, and
  the data file is large enough for them (gpt2.formats.openai.check_model_dir).

A sidecar `.download.json` records the size, sha256, modification time and the server's ETag /
Last-Modified of each file once it is complete. Later runs compare each file's size and mtime
with it (re-hashing when they changed) and fetch again what changed on disk; a file fetched again
from the same server version (same ETag) must have the recorded sha256. A folder from an older
downloader without the sidecar (or any file this tool did not fetch) must also match the server:
GPT-2's BPE files by their sha256, the others by the size and MD5 (Content-MD5) a HEAD request
announces; a file that does not, or that the server gives no MD5 for, is fetched again.

An interrupted `.part` is resumed only with `If-Range` and the validator (a strong ETag, else
Last-Modified) recorded when it was started, so a server whose file changed meanwhile answers 200
with the whole new file and a resume is never spliced from two versions; a `.part` without a
recorded validator is restarted. A lock file (`.download.lock`, fcntl/msvcrt, released by the OS
if the process dies) makes a second download into the same folder wait for the first. A host
name that does not resolve fails at once, and a failed download leaves no empty folder behind.
"""

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time

import requests
import tqdm

from encoder.encoder import OPENAI_FILES
from gpt2.formats.base import file_sha256
from gpt2.formats.openai import DATA_FILE, check_model_dir
from gpt2.formats.openai import DOWNLOAD_MANIFEST as MANIFEST
from gpt2.hparams import OLD_NAMES, PRESETS, HParams

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "GPT2_BASE_URL"
# hparams.json comes before the data file, whose size check needs it.
FILES = ("checkpoint", "encoder.json", "hparams.json", DATA_FILE, "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
OPTIONAL_FILES = ("model.ckpt.meta",)
NEEDED_FILES = ("checkpoint", "hparams.json", DATA_FILE, "model.ckpt.index")  # to load the weights
# (size, sha256) of the files that are the same in every released model.
KNOWN_FILES = OPENAI_FILES
LOCK_FILE = ".download.lock"
CHUNK_SIZE = 1 << 18
MAX_BACKOFF = 60.0
_TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")  # last 8 bytes of a TensorFlow index


class DownloadError(Exception):
    """A download or model-directory check failed; the message is one line for the user."""


class _TransientError(Exception):
    """A failure worth retrying (server error, short body, unusable resume)."""


class _BadContent(Exception):
    """The server sent something other than the file (an HTML page, the wrong bytes)."""


def resolve_name(name):
    """Returns the current name of a released model; old names get a notice on stderr."""
    if name in OLD_NAMES:
        new_name = OLD_NAMES[name]
        print(f"note: {name} is the old name of {new_name}; downloading {new_name}", file=sys.stderr)
        return new_name
    if name not in PRESETS:
        old = ", ".join(f"{old} = {new}" for old, new in OLD_NAMES.items())
        raise DownloadError(f"unknown model {name!r}; valid names: {', '.join(PRESETS)} (old names: {old})")
    return name


def resolve_base_url(base_url=None):
    """`base_url` if given, else $GPT2_BASE_URL if set, else OpenAI's; without a trailing '/'."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"base URL {url!r} must start with http:// or https:// (--base-url, ${BASE_URL_ENV})")
    return url


def missing_files(model_dir):
    """What a download into `model_dir` still lacks: a short description, or "" if nothing.

    Looks only at names on disk (no hashing, no network): the files loading needs that are absent
    (encoder.json and vocab.bpe are bundled, the .meta is optional), and the `.part` files an
    interrupted download left."""
    missing = [name for name in NEEDED_FILES if not os.path.isfile(os.path.join(model_dir, name))]
    parts = [name for name in FILES if os.path.isfile(os.path.join(model_dir, name + ".part"))]
    described = [f"missing {', '.join(missing)}"] if missing else []
    return "; ".join(described + ([f"{', '.join(parts)} partly downloaded"] if parts else []))


def download_model(name: str, models_dir: str | os.PathLike = "models", base_url: str | None = None,
                   progress: bool = True, retries: int = 5, backoff: float = 1.0,
                   timeout: float | tuple[float, float] = (10.0, 60.0)) -> str:
    """Downloads model `name` into `<models_dir>/<name>/`, verifies it and returns that path.

    name: "124M", "355M", "774M" or "1558M" (old names "117M", "345M" are accepted).
    base_url: server root holding `<name>/<file>`; default $GPT2_BASE_URL, else OpenAI's.
    progress: show a tqdm bar per file on stderr.
    retries: extra attempts per file after a connection error, stall, short body or 5xx, sleeping
        `backoff * 2**k` seconds (capped at 60) before each; an attempt that enlarged the partial file resets
        the count, so a slow but moving download of a big file is never abandoned.
    timeout: (connect, read) seconds for requests; `read` bounds a stall between bytes.
    Files already present are verified (see the module docstring), not fetched again, so
    running it again completes or repairs a folder. Raises DownloadError with a one-line
    message on any failure; a `.part` is resumed by the next call.
    """
    name = resolve_name(name)
    base_url = resolve_base_url(base_url)
    model_dir = os.path.join(models_dir, name)
    created = [path for path in (models_dir, model_dir) if not os.path.isdir(path)]
    os.makedirs(model_dir, exist_ok=True)
    lock = _FolderLock(model_dir)
    try:
        lock.acquire(on_wait=lambda: print(
            f"waiting for another download into {model_dir} to finish (lock: {lock.path})",
            file=sys.stderr, flush=True))
        manifest = _Manifest(model_dir)
        with requests.Session() as session:
            for filename in FILES:
                _ensure_file(session, manifest, model_dir, filename, f"{base_url}/{name}/{filename}",
                             label=f"{name}/{filename}", progress=progress, retries=retries, backoff=backoff,
                             timeout=timeout)
        try:  # the folder against its own hparams.json (the index only, not the weights)
            check_model_dir(model_dir)
        except (OSError, ValueError) as error:  # CheckpointError is a ValueError
            raise DownloadError(f"{error} (downloaded files kept in {model_dir}: the server's files do not fit "
                                "together)") from None
        return model_dir
    finally:
        lock.release()
        if not set(os.listdir(model_dir)) - {MANIFEST}:  # nothing was downloaded: leave no empty folders behind
            with contextlib.suppress(OSError):
                os.remove(os.path.join(model_dir, MANIFEST))
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _ensure_file(session, manifest, model_dir, filename, url, **options):
    """Leaves a verified `filename` in `model_dir`: checks the one there, else (re)fetches it."""
    path = os.path.join(model_dir, filename)
    previous = manifest.files.get(filename)
    if os.path.isfile(path):
        problem = _check_present(path, filename, previous, manifest)
        unknown = problem is None and previous is None
        if unknown:  # plausible, but not fetched by this tool: ask the server
            problem = _compare_with_server(session, manifest, path, filename, url, options["timeout"])
        if problem is None:
            return
        print(f"warning: {path}: {problem}; fetching it again", file=sys.stderr, flush=True)
        if not unknown:  # an unknown file is kept until the fetched one has passed every check (os.replace)
            os.remove(path)
            manifest.forget(filename)
    _download_file(session, manifest, url, path, previous=previous, **options)


def _check_present(path, filename, record, manifest):
    """None if the file at `path` is good, else what is wrong with it (recording it if new)."""
    stat = os.stat(path)
    if record is not None:
        if stat.st_size != record["size"]:
            return f"{stat.st_size} bytes, but {record['size']} were downloaded"
        if stat.st_mtime_ns == record["mtime_ns"]:
            return None
        if file_sha256(path) != record["sha256"]:
            return "changed since it was downloaded (sha256 differs)"
        manifest.record(filename, path, record["sha256"], record)
        return None
    return _content_problem(filename, path)


def _compare_with_server(session, manifest, path, filename, url, timeout):
    """None once a file this tool did not fetch (e.g. left by an older downloader, or put there by
    hand) is shown to be the server's (by sha256, or size and MD5: see the module docstring and
    _server_md5), and recorded; else why it is not."""
    if filename in KNOWN_FILES:  # _content_problem compared its sha256 with GPT-2's
        manifest.record(filename, path, file_sha256(path), {})
        return None
    try:
        response = session.head(url, headers={"Accept-Encoding": "identity"}, timeout=timeout, allow_redirects=True)
    except requests.RequestException:
        return "not fetched by this tool, and the server could not be asked for its size"
    if response.status_code != 200:
        return f"not fetched by this tool, and the server answered HTTP {response.status_code} when asked for its size"
    length, size = response.headers.get("Content-Length", ""), os.path.getsize(path)
    if not length.isdigit() or int(length) != size:
        return f"not fetched by this tool: {size} bytes, but the server's file has {length or 'an unknown size'}"
    md5 = _server_md5(response.headers)
    if md5 is None:
        return "not fetched by this tool, and the server gives no checksum (Content-MD5) to compare it with"
    md5_digest, sha256_digest = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5_digest.update(block)
            sha256_digest.update(block)
    if md5_digest.digest() != md5:
        return "not fetched by this tool, and its MD5 differs from the server's"
    validators = {"etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
    manifest.record(filename, path, sha256_digest.hexdigest(), dict(validators, url=url))
    return None


def _server_md5(headers):
    """The 16-byte MD5 a server states for a file (Content-MD5, or x-goog-hash md5=), else None."""
    values = [headers.get("Content-MD5", "")]
    values += [part.strip()[4:] for part in headers.get("x-goog-hash", "").split(",") if part.strip()[:4] == "md5="]
    for value in values:
        with contextlib.suppress(ValueError, binascii.Error):
            digest = base64.b64decode(value.strip(), validate=True)
            if len(digest) == 16:
                return digest
    return None


def _content_problem(filename, path):
    """None if `path` holds a plausible `filename`, else a short description of the problem."""
    size = os.path.getsize(path)
    if filename in KNOWN_FILES:
        known_size, known_sha256 = KNOWN_FILES[filename]
        if size != known_size or file_sha256(path) != known_sha256:
            return f"not GPT-2's {filename} (size or sha256 differs)"
    elif filename == "hparams.json":
        try:
            HParams.from_json(path)
        except ValueError as error:
            return f"not a valid hparams file ({str(error).removeprefix(path + ': ')})"
    elif filename == "checkpoint":
        with open(path, "rb") as f:
            lines = f.read(1 << 16).splitlines()
        if b'model_checkpoint_path: "model.ckpt"' not in lines or not all(
            re.fullmatch(rb'\w+: ("[^"]*"|[-+.\w]+)', line) for line in lines
        ):
            return 'not a checkpoint state file naming "model.ckpt"'
    elif filename == DATA_FILE:
        weights = HParams.from_json(os.path.join(os.path.dirname(path), "hparams.json")).parameter_count
        if size not in (4 * weights, 2 * weights):
            return f"{size} bytes, but the {weights:,} weights of hparams.json take {4 * weights} as float32"
    elif filename == "model.ckpt.index":
        with open(path, "rb") as f:
            f.seek(max(size - 8, 0))
            if size < 48 or f.read(8) != _TABLE_MAGIC:
                return "not a TensorFlow checkpoint index (no table footer)"
    elif filename == "model.ckpt.meta":
        from google.protobuf.message import DecodeError
        from tensorflow.core.protobuf.meta_graph_pb2 import MetaGraphDef

        try:
            with open(path, "rb") as f:
                MetaGraphDef.FromString(f.read())
        except (DecodeError, RuntimeError, ValueError):
            return "not a TensorFlow MetaGraphDef"
    return None


def _download_file(session, manifest, url, path, *, previous, label, progress, retries, backoff, timeout):
    """Fetches `url` into `path` via `path.part`, retrying transient failures; the file is renamed
    onto `path` only after passing every check."""
    part = path + ".part"
    filename = os.path.basename(path)
    failures = bad = 0
    while True:
        before = _size(part)
        try:
            validators = _fetch(session, manifest, url, part, label=label, progress=progress, timeout=timeout)
            if validators is None:  # an optional file the server does not have
                print(f"note: {url}: not on the server (optional, not needed)", file=sys.stderr, flush=True)
                return
            digest = file_sha256(part)
            problem = _content_problem(filename, part)
            if problem is None and previous and previous.get("etag") and previous["etag"] == validators["etag"] \
                    and previous["sha256"] != digest:
                problem = "sha256 differs from the earlier download of the same server version"
            if problem and filename == DATA_FILE:  # its announced size is the server's: no retry helps
                _remove(part)
                manifest.forget(filename)
                raise DownloadError(f"{url}: {problem}; the server's files do not fit together (check --base-url)")
            if problem:
                raise _BadContent(problem)
            break
        except _BadContent as error:
            _remove(part)
            manifest.forget(filename)
            bad += 1
            if bad > 1:
                raise DownloadError(f"{url}: {error} (twice); check --base-url") from None
            print(f"warning: {url}: {error}; fetching it again", file=sys.stderr, flush=True)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _TransientError) as error:
            if _name_not_resolved(error):
                host = requests.utils.urlparse(url).hostname
                raise DownloadError(
                    f"cannot download {url}: the host name {host} does not resolve; check the network "
                    "connection or --base-url (offline: see the README's \"Without network\")"
                ) from None
            failures = 0 if _size(part) > before else failures + 1
            reason = _reason(error, timeout)
            if failures > retries:
                kept = f"; the {_size(part)} bytes in {part} are resumed next run" if _size(part) else ""
                raise DownloadError(
                    f"cannot download {url}: {reason} (gave up after {failures} attempts without progress); "
                    f"check the network connection or --base-url{kept}"
                ) from None
            delay = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF)
            print(f"warning: {url}: {reason}; retrying in {delay:g}s", file=sys.stderr)
            time.sleep(delay)
        except requests.RequestException as error:  # e.g. a --base-url without http(s)://
            raise DownloadError(f"{url}: {error}") from None
    os.replace(part, path)
    manifest.record(filename, path, digest, dict(validators, url=url))


def _fetch(session, manifest, url, part, *, label, progress, timeout):
    """One attempt: streams `url` into `part`, resuming from its size where that is safe.

    Returns the server's validators {"etag", "last_modified"} once `part` holds exactly the
    announced number of bytes, or None for an optional file the server does not have; raises
    _TransientError, _BadContent (or a requests error) for anything worth another attempt."""
    filename = os.path.basename(part)[: -len(".part")]
    started = manifest.partial.get(filename, {})
    condition = _if_range(started)
    offset = _size(part) if condition else 0
    headers = {"Accept-Encoding": "identity"}  # byte counts and ranges refer to the raw file
    if offset:
        headers.update({"Range": f"bytes={offset}-", "If-Range": condition})
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 404:
            if filename in OPTIONAL_FILES:
                return None
            raise DownloadError(f"{url}: not found (HTTP 404); check --base-url and the model name")
        if status == 416 or (status == 206 and not _same_version(response, offset, started)):
            _remove(part)
            manifest.start(filename, {})
            raise _TransientError(f"server refused to resume at byte {offset}; restarting the file")
        if status >= 500 or status == 429:
            raise _TransientError(f"server error (HTTP {status})")
        if status not in (200, 206):
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
        if response.headers.get("Content-Type", "").split(";")[0].strip().lower() == "text/html":
            raise _BadContent("the server answered with an HTML page, not the file")
        validators = {"etag": response.headers.get("ETag"), "last_modified": response.headers.get("Last-Modified")}
        if status == 200:  # a fresh start, a changed file or a server ignoring Range: from byte 0
            offset = 0
            manifest.start(filename, dict(validators, size=_total_size(response, 0)))
        total = _total_size(response, offset)
        with open(part, "ab" if offset else "wb") as f, tqdm.tqdm(
                desc=label, total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress) as bar:
            for chunk in response.iter_content(CHUNK_SIZE):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = _size(part)
    if total is not None and size != total:
        raise _TransientError(f"connection closed after {size} of {total} bytes")
    return validators


def _if_range(started):
    """The If-Range value for resuming a part started with these validators ('' if unsafe).

    A weak ETag (W/"...") may not be used for byte ranges; Last-Modified is the fallback."""
    etag = started.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return started.get("last_modified") or ""


def _same_version(response, offset, started):
    """A 206 answer continues our part: it starts at `offset`, and its ETag and total size (where
    given) are those the part was started with."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not match or int(match.group(1)) != offset:
        return False
    etag = response.headers.get("ETag")
    if etag and started.get("etag") and etag != started["etag"]:
        return False
    return not (match.group(2) != "*" and started.get("size") and int(match.group(2)) != started["size"])


def _total_size(response, offset):
    """Full size of the file as announced by the server, or None if it did not say."""
    if response.status_code == 206:
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
        if total != "*":
            return int(total)
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _name_not_resolved(error):
    """True if a requests error comes from a host name that does not resolve (DNS)."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror) or type(current).__name__ == "NameResolutionError":
            return True
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None)]
        pending += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
    return False


def _reason(error, timeout):
    """Short description of a transient failure (requests' own messages span whole chains)."""
    if isinstance(error, _TransientError):
        return str(error)
    if isinstance(error, requests.ConnectTimeout):
        return f"connection timed out after {timeout[0]:g}s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "connection closed mid-file"
    if isinstance(error, requests.Timeout) or "Read timed out" in str(error):  # stalled headers or body
        return f"no data for {timeout[1]:g}s"
    # Any other requests.ConnectionError: keep the innermost OS message, e.g. "Connection refused".
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return f"cannot connect ({match.group(1).strip()})" if match else "cannot connect"


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class _Manifest:
    """The sidecar `.download.json`: `files` (name -> size, sha256, mtime_ns, etag, last_modified,
    url of a complete file) and `partial` (name -> validators and size a `.part` was started with).
    Every change is written at once (to a temporary name, then renamed)."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, MANIFEST)
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self.files, self.partial = dict(data["files"]), dict(data["partial"])
        except (OSError, ValueError, KeyError, TypeError):
            self.files, self.partial = {}, {}

    def record(self, filename, path, sha256, extra):
        stat = os.stat(path)
        keep = {key: extra.get(key) for key in ("etag", "last_modified", "url")}
        self.files[filename] = dict(keep, size=stat.st_size, sha256=sha256, mtime_ns=stat.st_mtime_ns)
        self.partial.pop(filename, None)
        self._save()

    def start(self, filename, validators):
        self.partial[filename] = validators
        self._save()

    def forget(self, filename):
        self.files.pop(filename, None)
        self.partial.pop(filename, None)
        self._save()

    def _save(self):
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"files": self.files, "partial": self.partial}, f, indent=1, sort_keys=True)
        os.replace(temporary, self.path)


class _FolderLock:
    """An exclusive lock on a model folder: the file `.download.lock` in it, locked with
    fcntl.flock (POSIX) or msvcrt.locking (Windows). The operating system drops the lock when
    its process ends, so a crashed download never leaves a stale lock."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._fd = None

    def acquire(self, on_wait, poll=0.2):
        """Takes the lock, calling `on_wait()` once and polling if another process holds it."""
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the holder failed and removed the empty folder
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                continue
            if _lock(fd) and self._still_linked(fd):
                self._fd = fd
                return
            os.close(fd)
            if not waited:
                on_wait()
                waited = True
            time.sleep(poll)

    def _still_linked(self, fd):
        """False if the holder before us removed the lock file while we waited on it (POSIX)."""
        if os.name == "nt":
            return True
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        """Deletes the lock file and drops the lock (on POSIX the file goes first, while still
        held; a process waiting on it notices, see _still_linked). Nothing if not acquired."""
        if self._fd is None:
            return
        if os.name != "nt":
            _remove(self.path)
        _lock(self._fd, unlock=True)
        os.close(self._fd)
        self._fd = None
        if os.name == "nt":
            with contextlib.suppress(OSError):  # another process has it open: it stays
                os.remove(self.path)


def _lock(fd, unlock=False):
    """Takes the lock on `fd` without waiting (False if another process holds it), or drops it."""
    try:
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK if unlock else msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        if unlock:
            raise
        return False


def main(argv=None):
    """CLI: `download_model.py 124M [355M ...]`. Returns the exit code (0 ok, 1 error)."""
    from gpt2 import cli
    from gpt2.runtime import quiet_tensorflow

    parser = argparse.ArgumentParser(
        prog="download_model.py", epilog=f"default server: {DEFAULT_BASE_URL}",
        description="Download released GPT-2 models into MODELS_DIR/<name>/ and verify them. Interrupted downloads "
                    "resume; files already present are verified, not fetched again, so running it again completes "
                    "or repairs a folder.")
    parser.add_argument("names", nargs="+", metavar="name",
                        help=f"model size: {', '.join(PRESETS)} (old names {', '.join(OLD_NAMES)} are accepted)")
    parser.add_argument("--models-dir", default="models", help="where to put the models (default: models)")
    parser.add_argument("--base-url", help=f"server holding <name>/<file>, e.g. a mirror (default: ${BASE_URL_ENV} "
                                           "if set, else OpenAI's)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars (default: shown)")

    def body(args):
        quiet_tensorflow()  # before TensorFlow is first imported
        names = list(dict.fromkeys(resolve_name(name) for name in args.names))
        for name in names:
            model_dir = download_model(name, models_dir=args.models_dir, base_url=args.base_url,
                                       progress=not args.no_progress)
            print(f"{name}: ready in {model_dir}")
        return cli.EXIT_OK

    return cli.main_of(parser, argv, body, "interrupted; run the same command again to resume")
