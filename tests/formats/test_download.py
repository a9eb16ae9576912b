"""Tests for gpt2/download.py against a local mirror (127.0.0.1 only, never the internet).

The mirror serves the tiny-model fixture under the name "124M", like a mirror that
hosts a fine-tuned variant whose shapes differ from the 124M preset.
"""

import base64
import hashlib
import http.server
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from gpt2 import download
from gpt2.download import DownloadError, download_model, main

import paths  # tests/paths.py: the folders the tests read

FIXTURE = Path(paths.TESTS) / "data" / "tiny-model"
BIG = "model.ckpt.data-00000-of-00001"
# Where a cut connection stops inside BIG (6.5 MB). The client may drop the last
# incomplete chunk it was reading, so CUT exceeds download.CHUNK_SIZE to leave a partial file.
CUT = 700_000


class Mirror:
    """Threaded HTTP server on 127.0.0.1 serving the fixture as /124M/<file>.

    ranges: honour `Range: bytes=N-` with 206 (else ignore it and answer 200).
    if_range: honour `If-Range` (a validator other than the file's current ETag or Last-Modified
      makes the answer 200 with the whole file); False: ignore it, like a broken server.
    etags / last_modified: send a strong ETag (from the content) / a fixed Last-Modified date.
    plan[file]: iterator of actions for successive requests of that file, then normal:
      ("cut", n)      announce the full Content-Length, send bytes only up to file
                      offset n, then close the connection;
      ("unsized", n)  announce no Content-Length, send bytes up to offset n, then close;
      ("status", s)   answer with HTTP status s and no body;
      ("html", s)     answer 200 with an HTML page (Content-Type text/html if s, else none);
      ("stall", sec)  send the headers, then nothing for `sec` seconds, then close;
      ("slow", sec)   wait `sec` seconds before answering.
    requests: (file, Range header or None) of every request, in order; if_ranges: the If-Range
    headers of those requests.
    """

    def __init__(self, ranges=True, files=None, if_range=True, etags=True, last_modified=None, content_md5=True):
        self.ranges, self.if_range, self.etags, self.last_modified = ranges, if_range, etags, last_modified
        self.content_md5 = content_md5
        self.files = files or {name: (FIXTURE / name).read_bytes() for name in download.FILES}
        self.plan = {}
        self.requests = []
        self.if_ranges = []
        self.heads = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.handle(self)

            def do_HEAD(self):
                mirror.head(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def etag(self, name):
        return '"' + hashlib.sha256(self.files[name]).hexdigest()[:16] + '"'

    def head(self, request):
        """HEAD: the file's size, validators and (content_md5) its Content-MD5, as Azure Blob Storage answers."""
        prefix, _, name = request.path.rpartition("/")
        self.heads.append(name)
        if prefix != "/124M" or name not in self.files:
            request.send_error(404)
            return
        data = self.files[name]
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        if self.etags:
            request.send_header("ETag", self.etag(name))
        if self.content_md5:
            request.send_header("Content-MD5", base64.b64encode(hashlib.md5(data).digest()).decode())
        request.end_headers()

    def handle(self, request):
        prefix, _, name = request.path.rpartition("/")
        range_header = request.headers.get("Range")
        self.requests.append((name, range_header))
        self.if_ranges.append(request.headers.get("If-Range"))
        if prefix != "/124M" or name not in self.files:
            request.send_error(404)
            return
        action, arg = next(self.plan.get(name, iter(())), (None, None))
        if action == "slow":
            time.sleep(arg)
        if action == "status":
            request.send_response(arg)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        if action == "html":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            request.send_response(200)
            if arg:
                request.send_header("Content-Type", "text/html; charset=utf-8")
            request.send_header("Content-Length", str(len(page)))
            request.end_headers()
            request.wfile.write(page)
            return
        data = self.files[name]
        validators = [v for v in (self.etags and self.etag(name), self.last_modified) if v]
        condition = request.headers.get("If-Range")
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if self.ranges and match and not (self.if_range and condition and condition not in validators):
            start = int(match.group(1))
            if start >= len(data):
                request.send_response(416)
                request.send_header("Content-Range", f"bytes */{len(data)}")
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            request.send_response(200)
        if action != "unsized":
            request.send_header("Content-Length", str(len(data) - start))
        if self.etags:
            request.send_header("ETag", self.etag(name))
        if self.last_modified:
            request.send_header("Last-Modified", self.last_modified)
        request.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        request.end_headers()
        if action == "stall":
            threading.Event().wait(arg)
            request.close_connection = True
            return
        end = max(start, arg) if action in ("cut", "unsized") else len(data)
        request.wfile.write(data[start:end])
        request.wfile.flush()
        if action in ("cut", "unsized"):
            request.connection.shutdown(socket.SHUT_RDWR)
            request.close_connection = True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def no_env_base_url(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)


@pytest.fixture
def mirror():
    server = Mirror()
    yield server
    server.close()


@pytest.fixture
def no_range_mirror():
    server = Mirror(ranges=False)
    yield server
    server.close()


def fetch(base_url, models_dir, name="124M", **kwargs):
    """download_model with fast retries and no progress bars."""
    options = dict(progress=False, retries=2, backoff=0.01, timeout=(2.0, 2.0))
    options.update(kwargs)
    return download_model(name, models_dir=str(models_dir), base_url=base_url, **options)


def assert_same_as_fixture(model_dir, files=download.FILES):
    for name in files:
        assert (Path(model_dir) / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    assert not list(Path(model_dir).glob("*.part"))
    assert sorted(p.name for p in Path(model_dir).iterdir()) == sorted([*files, ".download.json"])


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_full_download_is_byte_identical(mirror, tmp_path):
    model_dir = fetch(mirror.url, tmp_path)
    assert model_dir == os.path.join(str(tmp_path), "124M")
    assert_same_as_fixture(model_dir)
    assert sorted(name for name, _ in mirror.requests) == sorted(download.FILES)
    assert all(range_header is None for _, range_header in mirror.requests)


def test_second_run_downloads_nothing(mirror, tmp_path):
    fetch(mirror.url, tmp_path)
    mirror.requests.clear()
    fetch(mirror.url, tmp_path)
    assert mirror.requests == []


def test_interrupted_run_resumes_with_range(mirror, tmp_path):
    # The connection drops mid-file, then the server fails (an attempt that made
    # progress does not use up a retry, so retries=0 still makes the second attempt).
    mirror.plan[BIG] = iter([("cut", CUT), ("status", 503)])
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(mirror.url, tmp_path, retries=0)
    part = tmp_path / "124M" / (BIG + ".part")
    partial = part.stat().st_size
    assert 0 < partial <= CUT
    assert not (tmp_path / "124M" / BIG).exists()

    mirror.requests.clear()
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert mirror.requests[0] == (BIG, f"bytes={partial}-")


def test_cut_connection_is_retried_within_one_call(mirror, tmp_path, capsys):
    mirror.plan[BIG] = iter([("cut", CUT), ("status", 503)])
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    big_requests = [range_header for name, range_header in mirror.requests if name == BIG]
    assert big_requests[0] is None
    assert len(big_requests) == 3 and big_requests[1] == big_requests[2] is not None
    err = capsys.readouterr().err
    assert "retrying" in err and "HTTP 503" in err


def test_server_without_range_support_restarts_the_file(no_range_mirror, tmp_path):
    no_range_mirror.plan[BIG] = iter([("cut", CUT), ("status", 503)])
    with pytest.raises(DownloadError):
        fetch(no_range_mirror.url, tmp_path, retries=0)
    partial = (tmp_path / "124M" / (BIG + ".part")).stat().st_size
    assert partial > 0
    no_range_mirror.requests.clear()
    assert_same_as_fixture(fetch(no_range_mirror.url, tmp_path))
    assert no_range_mirror.requests[0] == (BIG, f"bytes={partial}-")  # asked, got 200


def test_part_without_a_recorded_validator_is_restarted(mirror, tmp_path):
    # A .part left by an older version (no ETag recorded): resuming it could splice two versions.
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    (model_dir / "hparams.json.part").write_bytes(b'{"n_vocab": 1')
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert [r for r in mirror.requests if r[0] == "hparams.json"] == [("hparams.json", None)]


def test_file_short_on_every_attempt_fails_without_final_file(no_range_mirror, tmp_path):
    no_range_mirror.plan[BIG] = itertools.repeat(("cut", CUT))
    with pytest.raises(DownloadError) as info:
        fetch(no_range_mirror.url, tmp_path, retries=2)
    message = str(info.value)
    assert "\n" not in message
    assert f"{no_range_mirror.url}/124M/{BIG}" in message and "3 attempts without progress" in message
    assert not (tmp_path / "124M" / BIG).exists()
    # The first attempt makes progress; the 3 restarts that only re-fetch the same bytes do not.
    assert [name for name, _ in no_range_mirror.requests].count(BIG) == 4


def test_stall_times_out_and_is_retried(mirror, tmp_path, capsys):
    mirror.plan["model.ckpt.index"] = iter([("stall", 1.0)])
    assert_same_as_fixture(fetch(mirror.url, tmp_path, timeout=(2.0, 0.2)))
    assert "no data for 0.2s" in capsys.readouterr().err


def test_404_names_the_url(mirror, tmp_path):
    del mirror.files["vocab.bpe"]
    with pytest.raises(DownloadError) as info:
        fetch(mirror.url, tmp_path)
    message = str(info.value)
    assert f"{mirror.url}/124M/vocab.bpe" in message and "404" in message and "--base-url" in message
    assert "\n" not in message


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DownloadError) as info:
        fetch("http://127.0.0.1:9", tmp_path, name="125M")
    message = str(info.value)
    assert all(name in message for name in ("124M", "355M", "774M", "1558M"))
    assert not (tmp_path / "125M").exists()


def test_old_name_downloads_into_new_folder(mirror, tmp_path, capsys):
    model_dir = fetch(mirror.url, tmp_path, name="117M")
    assert model_dir == os.path.join(str(tmp_path), "124M")
    assert_same_as_fixture(model_dir)
    assert "117M" in capsys.readouterr().err
    assert not (tmp_path / "117M").exists()


def test_no_network_names_url_and_base_url(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path)
    message = str(info.value)
    assert f"{url}/124M/checkpoint" in message and "--base-url" in message
    assert "refused" in message.lower() and "\n" not in message


def test_malformed_base_url_is_a_one_line_error(tmp_path):
    with pytest.raises(DownloadError, match="must start with http:// or https://"):
        fetch("127.0.0.1:9/models", tmp_path)
    with pytest.raises(DownloadError, match="http://127.0.0.1:bad/124M/checkpoint: Failed to parse"):
        fetch("http://127.0.0.1:bad", tmp_path)


def test_base_url_flag_wins_over_env(mirror, tmp_path, monkeypatch):
    assert download.resolve_base_url() == download.DEFAULT_BASE_URL
    monkeypatch.setenv(download.BASE_URL_ENV, mirror.url + "/")
    assert download.resolve_base_url() == mirror.url
    assert download.resolve_base_url("http://other") == "http://other"
    assert_same_as_fixture(fetch(None, tmp_path))


def served(**changes):
    """The fixture's files, with hparams.json changed."""
    files = {name: (FIXTURE / name).read_bytes() for name in download.FILES}
    hparams = json.loads(files["hparams.json"])
    files["hparams.json"] = json.dumps(dict(hparams, **changes)).encode()
    return files


def test_data_file_not_matching_hparams_is_not_kept(tmp_path):
    server = Mirror(files=served(n_layer=3, n_embd=64))
    try:
        with pytest.raises(DownloadError) as info:
            fetch(server.url, tmp_path)
    finally:
        server.close()
    message = str(info.value)
    assert f"{BIG}: 6542976 bytes, but the 3,370,624 weights of hparams.json take 13482496 as float32" in message
    assert "do not fit together" in message and "\n" not in message
    assert not (tmp_path / "124M" / BIG).exists() and not (tmp_path / "124M" / (BIG + ".part")).exists()
    assert [name for name, _ in server.requests].count(BIG) == 1


def test_index_not_matching_hparams_is_reported_and_kept(tmp_path):
    server = Mirror(files=served(n_vocab=50256, n_ctx=65))  # as many weights, other shapes
    try:
        with pytest.raises(DownloadError) as info:
            fetch(server.url, tmp_path)
    finally:
        server.close()
    message = str(info.value)
    assert "does not match" in message and "model/wpe [64, 32] (expected [65, 32])" in message
    assert "files kept" in message and "\n" not in message
    assert (tmp_path / "124M" / BIG).exists()


def test_progress_bars_show_bytes(mirror, tmp_path, capsys):
    fetch(mirror.url, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert f"124M/{BIG}" in err and "MB/s" in err.replace("kB/s", "MB/s")


def test_cli_success_and_errors(mirror, tmp_path, capsys):
    models = str(tmp_path)
    assert main(["124M", "--models-dir", models, "--base-url", mirror.url, "--no-progress"]) == 0
    assert "124M" in capsys.readouterr().out

    assert main(["999M", "--models-dir", models]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model '999M'") and err.count("\n") == 1
    assert "Traceback" not in err

    # The mirror only has 124M: a 404, which is not retried.
    assert main(["355M", "--models-dir", models, "--base-url", mirror.url, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {mirror.url}/355M/checkpoint: not found (HTTP 404); check --base-url and the model name\n"

    assert main([]) == 2
    capsys.readouterr()


def test_cli_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "download_model", interrupted)
    assert main(["124M"]) == 130
    assert capsys.readouterr().err == "error: interrupted; run the same command again to resume\n"


def test_downloaded_dir_loads_with_load_model(mirror, tmp_path):
    gpt2 = pytest.importorskip("gpt2")
    if not hasattr(gpt2, "load_model"):
        pytest.skip("gpt2.load_model is not available yet")
    model_dir = fetch(mirror.url, tmp_path)
    assert gpt2.load_model(model_dir) is not None


# --- issue 10 item 12: nothing unverified under a final name -------------------------------------


@pytest.mark.parametrize("content_type", [True, False], ids=["text/html", "no type"])
def test_html_page_is_rejected_and_fetched_again(mirror, tmp_path, capsys, content_type):
    mirror.plan["hparams.json"] = iter([("html", content_type)])
    mirror.plan["model.ckpt.meta"] = iter([("html", content_type)])
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    err = capsys.readouterr().err
    assert err.count("fetching it again") == 2


def test_html_page_every_time_fails_without_a_final_file(mirror, tmp_path):
    mirror.plan["vocab.bpe"] = itertools.repeat(("html", False))
    with pytest.raises(DownloadError) as info:
        fetch(mirror.url, tmp_path)
    message = str(info.value)
    assert message == (f"{mirror.url}/124M/vocab.bpe: not GPT-2's vocab.bpe (size or sha256 differs) (twice); "
                       "check --base-url")
    assert not (tmp_path / "124M" / "vocab.bpe").exists() and not (tmp_path / "124M" / "vocab.bpe.part").exists()


@pytest.mark.parametrize("name", ["checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.meta", "encoder.json"])
def test_body_cut_short_without_a_length_is_detected(mirror, tmp_path, capsys, name):
    mirror.plan[name] = iter([("unsized", len(mirror.files[name]) // 2)])
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert f"{name}: " in capsys.readouterr().err


def test_data_file_cut_short_without_a_length_is_not_kept(mirror, tmp_path):
    mirror.plan[BIG] = iter([("unsized", CUT)])
    with pytest.raises(DownloadError, match="bytes, but the 1,635,744 weights of hparams.json take 6542976"):
        fetch(mirror.url, tmp_path)
    assert not (tmp_path / "124M" / BIG).exists()


def new_version(data):
    """The same file as a changed server version: same size, other bytes."""
    return data[:CUT] + bytes(b ^ 0xFF for b in data[CUT:CUT + 1000]) + data[CUT + 1000:]


@pytest.mark.parametrize("server", ["honours If-Range", "ignores If-Range"])
def test_resume_after_the_file_changed_is_never_spliced(tmp_path, server):
    mirror = Mirror(if_range=server == "honours If-Range")
    try:
        mirror.plan[BIG] = iter([("cut", CUT), ("status", 503)])
        with pytest.raises(DownloadError):
            fetch(mirror.url, tmp_path, retries=0)
        old_etag = mirror.etag(BIG)
        mirror.files[BIG] = new_version(mirror.files[BIG])
        mirror.requests.clear()
        mirror.if_ranges.clear()
        model_dir = fetch(mirror.url, tmp_path)
    finally:
        mirror.close()
    assert (Path(model_dir) / BIG).read_bytes() == mirror.files[BIG]  # all of the new version
    assert mirror.requests[0][0] == BIG and mirror.requests[0][1].startswith("bytes=")
    assert mirror.if_ranges[0] == old_etag


def test_resume_uses_last_modified_without_etags(tmp_path):
    mirror = Mirror(etags=False, last_modified="Wed, 21 Oct 2015 07:28:00 GMT")
    try:
        mirror.plan[BIG] = iter([("cut", CUT), ("status", 503)])
        with pytest.raises(DownloadError):
            fetch(mirror.url, tmp_path, retries=0)
        mirror.if_ranges.clear()
        assert_same_as_fixture(fetch(mirror.url, tmp_path))
        assert mirror.if_ranges[0] == mirror.last_modified
    finally:
        mirror.close()


def test_rerun_repairs_a_folder_left_by_the_old_downloader(mirror, tmp_path, capsys):
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    for name in download.FILES:
        (model_dir / name).write_bytes((FIXTURE / name).read_bytes())
    page = b"<html><body>Service unavailable</body></html>"
    (model_dir / "model.ckpt.meta").write_bytes(page)
    (model_dir / "hparams.json").write_bytes(page)
    (model_dir / "model.ckpt.index").write_bytes((FIXTURE / "model.ckpt.index").read_bytes()[:500])
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert sorted(name for name, _ in mirror.requests) == ["hparams.json", "model.ckpt.index", "model.ckpt.meta"]
    assert capsys.readouterr().err.count("fetching it again") == 3


def test_a_file_changed_after_download_is_fetched_again(mirror, tmp_path, capsys):
    model_dir = Path(fetch(mirror.url, tmp_path))
    data = bytearray((model_dir / BIG).read_bytes())
    data[1000] ^= 1  # same size, other content
    (model_dir / BIG).write_bytes(bytes(data))
    mirror.requests.clear()
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert mirror.requests == [(BIG, None)]
    assert "changed since it was downloaded" in capsys.readouterr().err


def test_same_server_version_must_give_the_same_bytes(mirror, tmp_path):
    model_dir = Path(fetch(mirror.url, tmp_path))
    (model_dir / "hparams.json").write_text("{}")
    served = mirror.files["hparams.json"]
    mirror.files["hparams.json"] = served.replace(b"{", b"{ ", 1)  # still valid, other bytes...
    mirror.etag = lambda name, original=mirror.etag: '"%s"' % name if name == "hparams.json" else original(name)
    manifest = json.loads((model_dir / ".download.json").read_text())
    manifest["files"]["hparams.json"]["etag"] = '"hparams.json"'  # ...under the recorded ETag
    (model_dir / ".download.json").write_text(json.dumps(manifest))
    with pytest.raises(DownloadError, match="sha256 differs from the earlier download of the same server version"):
        fetch(mirror.url, tmp_path)


def test_meta_graph_is_optional(mirror, tmp_path, capsys):
    del mirror.files["model.ckpt.meta"]
    model_dir = fetch(mirror.url, tmp_path)
    assert_same_as_fixture(model_dir, files=[name for name in download.FILES if name != "model.ckpt.meta"])
    assert "model.ckpt.meta: not on the server (optional" in capsys.readouterr().err
    assert download.missing_files(model_dir) == ""


def test_unresolvable_host_fails_at_once_and_leaves_no_folder(tmp_path, monkeypatch):
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    models = tmp_path / "models"
    with pytest.raises(DownloadError) as info:
        fetch("http://mirror.invalid", models, retries=5, backoff=30)
    assert str(info.value) == ("cannot download http://mirror.invalid/124M/checkpoint: the host name "
                               "mirror.invalid does not resolve; check the network connection or --base-url "
                               "(offline: see the README's \"Without network\")")
    assert lookups == ["mirror.invalid"]
    assert not models.exists()


# --- issue 10 item 14: one download per folder at a time -----------------------------------------


def test_concurrent_downloads_into_one_folder_take_turns(mirror, tmp_path, capsys):
    mirror.plan[BIG] = iter([("slow", 1.0)])
    results, errors = [], []

    def run():
        try:
            results.append(fetch(mirror.url, tmp_path))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 2
    assert_same_as_fixture(results[0])
    assert sorted(name for name, _ in mirror.requests) == sorted(download.FILES)  # each file once
    assert "waiting for another download into" in capsys.readouterr().err


def test_a_held_lock_makes_the_download_wait(mirror, tmp_path, capsys):
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    holder = download._FolderLock(str(model_dir))
    holder.acquire(on_wait=None)
    threading.Timer(0.5, holder.release).start()
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    assert capsys.readouterr().err.startswith(f"waiting for another download into {model_dir} to finish")


def test_cli_without_tensorflow_says_how_to_install_it(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    assert main(["124M", "--models-dir", str(tmp_path), "--base-url", mirror.url, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: TensorFlow is not installed; install this project with its TensorFlow build: "
                          "pip install '.[cpu]'") and err.count("\n") == 1


def test_item13_files_not_fetched_by_the_downloader_are_compared_with_the_server(tmp_path, capsys):
    import gpt2

    # A random checkpoint put in the folder by hand: plausible files (hparams, state file and index
    # fit together), so only the server can tell they are not its files.
    model_dir = tmp_path / "124M"
    gpt2.write_random_checkpoint(gpt2.HParams.from_json(str(FIXTURE / "hparams.json")), str(model_dir), seed=3)
    assert (model_dir / BIG).read_bytes() != (FIXTURE / BIG).read_bytes()
    for content_md5 in (True, False):  # the server's MD5 differs; a server without one cannot vouch for it
        server = Mirror(content_md5=content_md5)
        try:
            assert_same_as_fixture(fetch(server.url, tmp_path))
            assert BIG in server.heads and (BIG, None) in server.requests
        finally:
            server.close()
        err = capsys.readouterr().err
        assert ("its MD5 differs from the server's" if content_md5 else "server gives no checksum") in err
        manifest = json.loads((model_dir / ".download.json").read_text())
        assert manifest["files"][BIG]["url"].endswith("/124M/" + BIG)
        gpt2.write_random_checkpoint(gpt2.HParams.from_json(str(FIXTURE / "hparams.json")), str(model_dir), seed=4)
        assert not (model_dir / ".download.json").exists()  # writing a checkpoint drops the record

    # The server's own files, copied in by hand, are accepted on its size and MD5 without a download.
    for name in download.FILES:
        (model_dir / name).write_bytes((FIXTURE / name).read_bytes())
    server = Mirror()
    try:
        assert_same_as_fixture(fetch(server.url, tmp_path))
        assert server.requests == [] and BIG in server.heads
    finally:
        server.close()
    manifest = json.loads((model_dir / ".download.json").read_text())
    assert manifest["files"][BIG]["etag"] == server.etag(BIG) and manifest["files"][BIG]["url"] is not None
    assert manifest["files"]["vocab.bpe"]["url"] is None  # GPT-2's BPE files are known by their sha256
