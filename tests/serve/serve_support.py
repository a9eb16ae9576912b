"""Shared pieces of the server tests: one engine on the tiny fixture model for the whole test run
(traced once, without XLA: compiling is what makes start-up slow, and the compiled decoder is the
sampler's tests' business), in-process HTTP servers around it, raw-socket helpers.

Tests that pause the engine or change its limits put them back (see `paused`).
"""

import contextlib
import json
import os
import re
import socket
import threading
import time

import paths  # tests/paths.py: the folders the tests read

HERE = paths.TESTS
REPO = os.path.dirname(HERE)
MODEL_DIR = os.path.join(HERE, "data", "tiny-model")
with open(os.path.join(MODEL_DIR, "reference.json"), encoding="utf-8") as _f:
    GREEDY = json.load(_f)["greedy"]["cases"]  # 20 new tokens each, top_k=1
MODEL_ID = "tiny-model"
MAX_BATCH = 4
JSON = {"Content-Type": "application/json"}

_shared = {}
_lock = threading.Lock()


def model_and_encoder():
    """The tiny model and its encoder (loaded once)."""
    with _lock:
        if "model" not in _shared:
            from encoder import encoder_for_model_dir
            from gpt2.checkpoint import load_model

            _shared["model"] = load_model(MODEL_DIR)
            _shared["enc"] = encoder_for_model_dir(MODEL_DIR)
    return _shared["model"], _shared["enc"]


def shared_engine():
    """An Engine of MAX_BATCH slots over the tiny model, warmed up and started once."""
    model, enc = model_and_encoder()
    with _lock:
        if "engine" not in _shared:
            from gpt2.serve.engine import Engine

            engine = Engine(model, max_batch=MAX_BATCH, max_queue=64, stop_token=enc.eot_token, jit_compile=False,
                            steps_per_run=2)
            engine.warm_up(log_fn=lambda message: None)
            engine.start()
            _shared["engine"] = engine
    return _shared["engine"]


def make_protocol(**options):
    from gpt2.serve.protocol import Protocol

    model, enc = model_and_encoder()
    return Protocol(enc, model.hparams.n_ctx, (MODEL_ID,), **{"max_tokens_limit": 256, "max_request_rows": 8,
                                                                **options})


class Running:
    """An in-process server on a free port of 127.0.0.1: .url, .port, .app, .engine. server_options:
    httpd.Server's (limits, api_key, cors_origins, allowed_hosts)."""

    def __init__(self, engine=None, protocol=None, limits=None, **server_options):
        from gpt2.serve.api import App
        from gpt2.serve.httpd import Limits, Server, start_in_thread

        limits = limits or Limits()
        self.engine = engine or shared_engine()
        self.app = App(self.engine, protocol or make_protocol(), MODEL_ID, heartbeat=limits.heartbeat)
        self.server = Server(self.app, "127.0.0.1", 0, limits=limits, **server_options)
        self.thread = start_in_thread(self.server)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path, body, headers=None, **kwargs):
        import requests

        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers={**JSON, **(headers or {})}, timeout=60, **kwargs)

    def get(self, path, **kwargs):
        import requests

        return requests.get(self.url + path, timeout=60, **kwargs)

    def client(self, api_key="unused"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def stats(self):
        return dict(self.engine.stats)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def paused(engine):
    """No new rows are admitted inside the block (requests queue up)."""
    engine.pause()
    try:
        yield
    finally:
        engine.resume()


def wait_until(predicate, timeout=20.0, what="the server"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_threads(calls):
    """Runs each zero-argument callable on its own thread; returns (threads, results)."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as error:  # noqa: BLE001 - re-raised by join
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, results


def join(threads, results):
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def raw_request(port, data, timeout=10.0, half_close=False):
    """Sends raw bytes and returns everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock, timeout)


def read_all(sock, timeout=10.0):
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def post_bytes(path, body, headers=(), version="HTTP/1.1"):
    """A raw POST request with a JSON body (bytes or a JSON-able object)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [f"POST {path} {version}", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def statuses(reply):
    """Status codes of the HTTP responses in a raw reply (a status line may follow a body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", reply)]


def sse_events(text):
    """The JSON payloads of a server-sent-event body (without [DONE]); asserts it ends with [DONE]."""
    events = [e for e in text.split("\n\n") if e.strip() and not e.startswith(":")]
    assert events[-1] == "data: [DONE]", events[-3:]
    return [json.loads(e[len("data: "):]) for e in events[:-1]]
