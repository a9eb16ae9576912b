"""Tests for gpt2/download.py against a local mirror (127.0.0.1 only, never the internet).

The mirror serves the tiny-model fixture under the name "124M", like a mirror that
hosts a fine-tuned variant whose shapes differ from the 124M preset.
"""

import http.server
import itertools
import json
import os
import re
import socket
import threading
from pathlib import Path

import pytest

from gpt2 import download
from gpt2.download import DownloadError, download_model, main

FIXTURE = Path(__file__).parent / "data" / "tiny-model"
BIG = "model.ckpt.data-00000-of-00001"
# Where a cut connection stops inside BIG (6.5 MB). The client may drop the last
# incomplete chunk it was reading, so CUT exceeds download.CHUNK_SIZE to leave a partial file.
CUT = 700_000


class Mirror:
    """Threaded HTTP server on 127.0.0.1 serving the fixture as /124M/<file>.

    ranges: honour `Range: bytes=N-` with 206 (else ignore it and answer 200).
    plan[file]: iterator of actions for successive requests of that file, then normal:
      ("cut", n)      announce the full Content-Length, send bytes only up to file
                      offset n, then close the connection;
      ("status", s)   answer with HTTP status s and no body;
      ("stall", sec)  send the headers, then nothing for `sec` seconds, then close.
    requests: (file, Range header or None) of every request, in order.
    """

    def __init__(self, ranges=True, files=None):
        self.ranges = ranges
        self.files = files or {name: (FIXTURE / name).read_bytes() for name in download.FILES}
        self.plan = {}
        self.requests = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.handle(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def handle(self, request):
        prefix, _, name = request.path.rpartition("/")
        range_header = request.headers.get("Range")
        self.requests.append((name, range_header))
        if prefix != "/124M" or name not in self.files:
            request.send_error(404)
            return
        action, arg = next(self.plan.get(name, iter(())), (None, None))
        if action == "status":
            request.send_response(arg)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        data = self.files[name]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if self.ranges and match:
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
        request.send_header("Content-Length", str(len(data) - start))
        request.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        request.end_headers()
        if action == "stall":
            threading.Event().wait(arg)
            request.close_connection = True
            return
        end = max(start, arg) if action == "cut" else len(data)
        request.wfile.write(data[start:end])
        request.wfile.flush()
        if action == "cut":
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


def assert_same_as_fixture(model_dir):
    for name in download.FILES:
        assert (Path(model_dir) / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    assert not list(Path(model_dir).glob("*.part"))


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


def test_part_longer_than_the_file_is_restarted(mirror, tmp_path):
    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    stale = (FIXTURE / "hparams.json").read_bytes() + b"stale bytes"
    (model_dir / "hparams.json.part").write_bytes(stale)
    assert_same_as_fixture(fetch(mirror.url, tmp_path))
    hparams_requests = [r for r in mirror.requests if r[0] == "hparams.json"]
    assert hparams_requests == [("hparams.json", f"bytes={len(stale)}-"), ("hparams.json", None)]


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


def test_checkpoint_not_matching_hparams_is_reported_and_kept(tmp_path):
    hparams = json.loads((FIXTURE / "hparams.json").read_text())
    files = {name: (FIXTURE / name).read_bytes() for name in download.FILES}
    files["hparams.json"] = json.dumps(dict(hparams, n_layer=3, n_embd=64)).encode()
    server = Mirror(files=files)
    try:
        with pytest.raises(DownloadError) as info:
            fetch(server.url, tmp_path)
    finally:
        server.close()
    message = str(info.value)
    assert "does not match" in message and "model/wte" in message and "files kept" in message
    assert "\n" not in message
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

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
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
