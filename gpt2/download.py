"""Downloads released GPT-2 checkpoints (OpenAI's, or a mirror's) into `models/<name>/`.

Every file is streamed to `<file>.part` next to its final name and renamed onto the
final name (os.replace) only once its size matches the size the server announced.
So a file under its final name is complete by construction, and that is the whole
test for "already downloaded": existing final names are skipped without asking the
server. A `.part` left by an interrupted run is resumed with an HTTP Range request
(or restarted, if the server ignores Range). After the files are in place the model
directory is checked with gpt2.checkpoint.check_model_dir against its own hparams.json
(not a preset: a mirror may serve a fine-tuned variant with other shapes under the
same name).
"""

import argparse
import os
import re
import sys
import time

import requests
import tqdm

from gpt2.checkpoint import check_model_dir
from gpt2.hparams import OLD_NAMES, PRESETS

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "GPT2_BASE_URL"
FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
CHUNK_SIZE = 1 << 18
MAX_BACKOFF = 60.0


class DownloadError(Exception):
    """A download or model-directory check failed; the message is one line for the user."""


class _TransientError(Exception):
    """A failure worth retrying (server error, short body, unusable resume)."""


def resolve_name(name):
    """Returns the current name of a released model; old names get a notice on stderr."""
    if name in OLD_NAMES:
        new_name = OLD_NAMES[name]
        print(f"note: {name} is the old name of {new_name}; downloading {new_name}", file=sys.stderr)
        return new_name
    if name not in PRESETS:
        old = ", ".join(f"{old} = {new}" for old, new in OLD_NAMES.items())
        raise DownloadError(
            f"unknown model {name!r}; valid names: {', '.join(PRESETS)} (old names: {old})"
        )
    return name


def resolve_base_url(base_url=None):
    """`base_url` if given, else $GPT2_BASE_URL if set, else OpenAI's; without a trailing '/'."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"base URL {url!r} must start with http:// or https:// (--base-url, ${BASE_URL_ENV})")
    return url


def download_model(
    name,
    models_dir="models",
    base_url=None,
    progress=True,
    retries=5,
    backoff=1.0,
    timeout=(10.0, 60.0),
):
    """Downloads model `name` into `<models_dir>/<name>/`, checks it and returns that path.

    name: "124M", "355M", "774M" or "1558M" (old names "117M", "345M" are accepted).
    base_url: server root holding `<name>/<file>`; default $GPT2_BASE_URL, else OpenAI's.
    progress: show a tqdm bar per file on stderr.
    retries: extra attempts per file after a connection error, stall, short body or
        5xx, sleeping `backoff * 2**k` seconds (capped at 60) before each; an attempt
        that enlarged the partial file resets the count, so a slow but moving
        download of a big file is never abandoned.
    timeout: (connect, read) seconds for requests; `read` bounds a stall between bytes.
    Raises DownloadError with a one-line message on any failure; downloaded files are
    kept (a `.part` is resumed by the next call).
    """
    name = resolve_name(name)
    base_url = resolve_base_url(base_url)
    model_dir = os.path.join(models_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    with requests.Session() as session:
        for filename in FILES:
            path = os.path.join(model_dir, filename)
            if not os.path.exists(path):
                _download_file(
                    session,
                    f"{base_url}/{name}/{filename}",
                    path,
                    label=f"{name}/{filename}",
                    progress=progress,
                    retries=retries,
                    backoff=backoff,
                    timeout=timeout,
                )
    _verify_model_dir(model_dir)
    return model_dir


def _download_file(session, url, path, *, label, progress, retries, backoff, timeout):
    """Fetches `url` into `path` via `path.part`, retrying transient failures."""
    part = path + ".part"
    failures = 0
    while True:
        before = _size(part)
        try:
            _fetch(session, url, part, label=label, progress=progress, timeout=timeout)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _TransientError) as error:
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


def _fetch(session, url, part, *, label, progress, timeout):
    """One attempt: streams `url` into `part`, resuming from its size where the server allows.

    Returns once `part` holds exactly the announced number of bytes; raises
    _TransientError (or a requests error) for anything worth another attempt.
    """
    offset = _size(part)
    headers = {"Accept-Encoding": "identity"}  # byte counts and ranges refer to the raw file
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 404:
            raise DownloadError(f"{url}: not found (HTTP 404); check --base-url and the model name")
        if status == 416 or (status == 206 and _range_start(response) != offset):
            _truncate(part)
            raise _TransientError(f"server refused to resume at byte {offset}; restarting the file")
        if status >= 500 or status == 429:
            raise _TransientError(f"server error (HTTP {status})")
        if status not in (200, 206):
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
        if status == 200:  # no Range sent, or the server ignored it: start over
            offset = 0
        total = _total_size(response, offset)
        with open(part, "ab" if offset else "wb") as f, tqdm.tqdm(
            desc=label,
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
        ) as bar:
            for chunk in response.iter_content(CHUNK_SIZE):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = _size(part)
    if total is not None and size != total:
        raise _TransientError(f"connection closed after {size} of {total} bytes")


def _range_start(response):
    """First byte of a 206 response's Content-Range (None if unreadable)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _total_size(response, offset):
    """Full size of the file as announced by the server, or None if it did not say."""
    if response.status_code == 206:
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
        if total != "*":
            return int(total)
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


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
    # Any other requests.ConnectionError: keep the innermost OS message,
    # e.g. "Connection refused" or "Name or service not known".
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return f"cannot connect ({match.group(1).strip()})" if match else "cannot connect"


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def _truncate(path):
    open(path, "wb").close()


def _verify_model_dir(model_dir):
    """Checks the downloaded folder against its own hparams.json (index only, not the weights).

    Raises DownloadError (one line) on any problem, leaving the files in place.
    """
    try:
        return check_model_dir(model_dir)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        raise DownloadError(
            f"{error} (downloaded files kept; delete {model_dir} to fetch them again)"
        ) from None


def main(argv=None):
    """CLI: `download_model.py 124M [355M ...]`. Returns the exit code (0 ok, 1 error)."""
    parser = argparse.ArgumentParser(
        prog="download_model.py",
        description=(
            "Download released GPT-2 models into MODELS_DIR/<name>/. Interrupted downloads "
            "resume; files already present are skipped."
        ),
        epilog=f"default server: {DEFAULT_BASE_URL}",
    )
    parser.add_argument(
        "names", nargs="+", metavar="name",
        help=f"model size: {', '.join(PRESETS)} (old names {', '.join(OLD_NAMES)} are accepted)",
    )
    parser.add_argument("--models-dir", default="models", help="where to put the models (default: models)")
    parser.add_argument(
        "--base-url",
        help=f"server holding <name>/<file>, e.g. a mirror (default: ${BASE_URL_ENV} if set, else OpenAI's)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)
    try:
        names = list(dict.fromkeys(resolve_name(name) for name in args.names))
        for name in names:
            model_dir = download_model(
                name, models_dir=args.models_dir, base_url=args.base_url, progress=not args.no_progress
            )
            print(f"{name}: ready in {model_dir}")
    except (DownloadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
