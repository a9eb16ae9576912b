"""The HTTP side of the server: a standard-library `ThreadingHTTPServer` made to hold up against
slow, half-closed, vanishing and hostile clients (TensorFlow-free).

* Connections are capped (`Limits.max_connections`): beyond the cap a connection gets a short 503
  and is closed at once, without a thread.
* Reading has deadlines for the whole thing, not per recv(): `idle_timeout` to start a request on
  a kept-alive connection, `header_timeout` for the request line and headers, `body_timeout` for
  the body; writes time out after `write_timeout` without progress. A slowloris client is closed.
* Framing is strict: one Content-Length of ASCII digits (no "+43", "4_3", duplicates), no request
  bodies in chunked encoding, a body the endpoint does not read closes the connection (it is never
  parsed as the next request). POST bodies must be `application/json` (UTF-8); JSON nested too
  deeply or not UTF-8 is a 400.
* With `App.allowed_hosts` set (the default loopback server without an API key), a `Host` header
  naming anything else gets 403: a web page cannot reach the server through DNS rebinding, and it
  cannot send a cross-site "simple" POST because JSON needs a CORS preflight, which only
  `cors_origins` pass.
* A client is "gone" only when a write to it fails (or it closes before sending a whole request):
  one that half-closes after sending still gets its answer. Streams write a comment every
  `heartbeat` seconds while waiting, so a vanished stream client frees its slot. Each dropped
  client is one log line; log lines escape control characters.
* Uses no select.poll (works on Windows, macOS and Linux).

Endpoints are in `Handler.ROUTES`; their JSON work is gpt2.serve.protocol's, generation is the
engine's (gpt2.serve.engine).
"""

import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpt2.serve.engine import Job, QueueFull, Unavailable
from gpt2.serve.protocol import ApiError, ChoiceText

log = logging.getLogger("gpt2.serve")

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_DIGITS = re.compile(r"[0-9]{1,18}")
_TOKEN_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_BUSY_BODY = b'{"error": {"message": "too many connections", "type": "server_error", "param": null, "code": "busy"}}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


def clean(text, limit=300):
    """`text` for a log line: control characters escaped, at most `limit` characters."""
    text = str(text).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass
class Limits:
    """What one client may hold: connections, seconds for each phase of a request, body bytes."""

    max_connections: int = 64
    max_body_bytes: int = 1 << 20
    idle_timeout: float = 15.0  # a kept-alive connection waiting for its next request
    header_timeout: float = 10.0  # the request line and headers, from their first byte
    body_timeout: float = 30.0  # the whole body
    write_timeout: float = 30.0  # one write without progress
    heartbeat: float = 2.0  # a stream with nothing to send writes a comment this often


class ClientGone(Exception):
    """The client went away (or was too slow); the message says how."""


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket until `deadline` (time.monotonic()), over all reads together."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = math.inf

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("read deadline passed")
        self.sock.settimeout(min(remaining, 3600.0))
        return self.sock.recv_into(buffer)


class _Writer(io.RawIOBase):
    """Writes to a socket, each write failing after `timeout` seconds without progress."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout

    def writable(self):
        return True

    def write(self, data):
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)
        return len(data)


class App:
    """What the request handlers share: the engine, the protocol, limits and access rules.

    allowed_hosts: None (no Host check) or names the Host header may carry (ports ignored).
    cors_origins: origins answered with CORS headers ("*" = any). api_key: None or the bearer key.
    """

    def __init__(self, engine, protocol, model_id, api_key=None, limits=None, cors_origins=(),
                 allowed_hosts=None, playground=True):
        self.engine = engine
        self.protocol = protocol
        self.enc = protocol.enc
        self.model_id = model_id
        self.api_key = api_key
        self.limits = limits or Limits()
        self.cors_origins = tuple(cors_origins)
        self.allowed_hosts = None if allowed_hosts is None else {_host_name(h) for h in allowed_hosts}
        self.playground = _playground_html() if playground else None
        self.created = int(time.time())
        self.draining = False
        self._busy = 0  # requests being answered
        self._busy_lock = threading.Condition()

    def model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "local",
                "context_length": self.protocol.n_ctx, "max_tokens_limit": self.protocol.max_tokens_limit}

    def health(self, connections=None):
        engine = self.engine.health()
        status = "stopping" if self.draining else engine.pop("status")
        return {"status": status, "model": self.model_id, "context_length": self.protocol.n_ctx,
                "connections": connections, **engine}

    def allows_origin(self, origin):
        return "*" in self.cors_origins or origin in self.cors_origins

    def allows_host(self, host):
        return self.allowed_hosts is None or host is None or _host_name(host) in self.allowed_hosts

    def request_started(self):
        with self._busy_lock:
            self._busy += 1

    def request_ended(self):
        with self._busy_lock:
            self._busy -= 1
            self._busy_lock.notify_all()

    def wait_idle(self, timeout):
        """Waits until no request is being answered (or `timeout` seconds); True if idle."""
        with self._busy_lock:
            return self._busy_lock.wait_for(lambda: self._busy == 0, timeout)


def _host_name(host):
    """The name part of a Host header or of an --allowed-host value, lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_allowed_hosts(bind_host, extra=()):
    """Names a loopback server answers to: the loopback names, the bound address and `extra`."""
    return [*LOOPBACK_NAMES, bind_host, *extra]


def is_loopback(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _playground_html():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "playground.html")
    with open(path, "rb") as f:
        return f.read()


class Server(ThreadingHTTPServer):
    """The HTTP server for `app` (an App; may be set later, before serving). limits: the App's by
    default. `Server(app, host, port, bind_and_activate=False)` binds later (see cli)."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog

    def __init__(self, app, host="127.0.0.1", port=5000, bind_and_activate=True, limits=None):
        if _is_ipv6(host):
            self.address_family = socket.AF_INET6
        self.app = app
        self.limits = limits or app.limits
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self.connections = 0  # open connections (each has a thread)
        self._count_lock = threading.Lock()
        self._refused = 0
        self._refused_logged = 0.0
        super().__init__((host, port), Handler, bind_and_activate)

    @property
    def port(self):
        return self.server_address[1]

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        with self._count_lock:
            self.connections += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self):
        with self._count_lock:
            self.connections -= 1
        self._slots.release()

    def _refuse(self, request, client_address):
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:  # at most one line a second for a flood
            log.warning("%d connection(s) refused: %d open, the limit (--max-connections)",
                        self._refused, self.limits.max_connections)
            self._refused, self._refused_logged = 0, now
        try:
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        """An unexpected error on a connection: one line (no traceback for a dropped client)."""
        import sys

        error = sys.exc_info()[1]
        log.warning("%s: connection ended by %s: %s", _peer(client_address), type(error).__name__, clean(error))


def _peer(client_address):
    return f"{client_address[0]}:{client_address[1]}" if isinstance(client_address, tuple) else str(client_address)


def _is_ipv6(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False


def start_in_thread(server):
    """Runs `server.serve_forever()` on a daemon thread (tests and embedding); returns it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="gpt2-serve-http", daemon=True)
    thread.start()
    return thread


def _json_bytes(payload):
    # Lone surrogates (valid in JSON escapes, so in parsed strings) come back as \\uXXXX escapes.
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _usage(plan, choices):
    prompt_tokens = sum(len(tokens) for tokens in plan.prompt_tokens)
    completion_tokens = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Handler(BaseHTTPRequestHandler):
    """One connection: requests one after another (keep-alive), each answered in full."""

    protocol_version = "HTTP/1.1"
    server_version = "gpt2-serve"

    ROUTES = {
        "/": ("GET", "playground"),
        "/health": ("GET", "health"),
        "/v1/models": ("GET", "models"),
        "/generate": ("POST", "generate"),
        "/v1/completions": ("POST", "completions"),
        "/v1/chat/completions": ("POST", "chat"),
        "/tokenize": ("POST", "tokenize"),
        "/detokenize": ("POST", "detokenize"),
        "/tokenizer_info": ("GET", "tokenizer_info"),
    }
    OPEN = ("playground", "health")  # answered without the API key

    @property
    def app(self):
        return self.server.app

    # ------------------------------------------------------------------ connection

    def setup(self):
        self.connection = self.request
        self.peer = _peer(self.client_address)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.wfile = _Writer(self.connection, self.app.limits.write_timeout)

    def finish(self):
        try:
            self.rfile.close()
        except OSError:
            pass

    def handle(self):
        self.close_connection = True
        try:
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        except ClientGone as gone:
            log.info("%s: client gone: %s", self.peer, clean(gone))
        except OSError as error:  # reset while reading the next request, a failed write...
            log.info("%s: client gone: %s", self.peer, clean(f"{type(error).__name__}: {error}"))

    def handle_one_request(self):
        """Reads one request within its deadlines and answers it."""
        limits = self.app.limits
        self._reader.deadline = time.monotonic() + limits.idle_timeout
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # closed between requests: done
                return
        except TimeoutError:
            self.close_connection = True  # idle keep-alive connection
            return
        self._started = time.monotonic()
        self._reader.deadline = self._started + limits.header_timeout
        self._status = None
        self._note = ""
        self._body_left = 0
        self.command, self.path = "", ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
                self.send_error(414)
                return
            if not self.raw_requestline.endswith(b"\n"):
                raise ClientGone("closed the connection in the middle of a request")
            if not self.parse_request():
                return
        except TimeoutError:
            raise ClientGone(f"did not send a whole request head within {limits.header_timeout:g} s") from None
        self.app.request_started()
        try:
            self._answer()
        finally:
            self.app.request_ended()
            if self._body_left:
                self.close_connection = True  # an unread body is never parsed as a request
            self._log_access()
        self.wfile.flush()

    # ------------------------------------------------------------------ plumbing

    def log_request(self, code="-", size="-"):
        pass  # one line per request in _log_access instead

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.info("%s: %s", self.peer, clean(format % args))

    def version_string(self):
        return self.server_version  # not the Python version

    def _log_access(self):
        if self._status is None:
            return
        level = logging.DEBUG if self.path == "/health" and self._status == 200 else logging.INFO
        log.log(level, '%s "%s %s" %s%s %.3f s', self.peer, clean(self.command, 20), clean(self.path, 200),
                self._status, self._note, time.monotonic() - self._started)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (malformed request line, 431...) as JSON too."""
        self.close_connection = True
        error = ApiError(code, message or self.responses.get(code, ("error",))[0],
                         type_="invalid_request_error" if code < 500 else "server_error")
        try:
            self._send_json(code, error.body())
        except OSError:
            pass

    def _cors(self):
        origin = self.headers.get("Origin") if hasattr(self, "headers") and self.headers else None
        if origin and self.app.allows_origin(origin):
            return {"Access-Control-Allow-Origin": "*" if "*" in self.app.cors_origins else origin, "Vary": "Origin"}
        return {}

    def _send(self, status, data, content_type, headers=None):
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in {**self._cors(), **(headers or {})}.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (OSError, ValueError) as error:
            raise ClientGone(f"{type(error).__name__} while sending the answer") from None

    def _send_json(self, status, payload, headers=None):
        self._send(status, _json_bytes(payload), "application/json; charset=utf-8", headers)

    # ------------------------------------------------------------------ request checks

    def _framing(self):
        """Content-Length: one, digits only; no request body in any other encoding."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise ApiError(501 if not lengths else 400, "request bodies in Transfer-Encoding are not supported; "
                           "send Content-Length", code="unsupported_transfer_encoding")
        if len(lengths) > 1:
            self.close_connection = True
            raise ApiError(400, "more than one Content-Length header", code="bad_content_length")
        if lengths and not _DIGITS.fullmatch(lengths[0]):
            self.close_connection = True
            raise ApiError(400, f"invalid Content-Length {clean(lengths[0], 40)!r}: must be digits",
                           code="bad_content_length")
        self._body_left = int(lengths[0]) if lengths else 0

    def _read_body(self):
        limits = self.app.limits
        length = self._body_left
        if self.headers.get("Content-Length") is None:
            raise ApiError(411, "a JSON body with Content-Length is required", code="length_required")
        if length > limits.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes} "
                           "(--max-body-bytes)", code="request_too_large")
        self._reader.deadline = time.monotonic() + limits.body_timeout
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise ClientGone(f"did not send its {length}-byte body within {limits.body_timeout:g} s") from None
        if len(data) < length:
            raise ClientGone("closed the connection in the middle of the body")
        self._body_left = 0
        return data

    def _read_json(self):
        media, _, params = (self.headers.get("Content-Type") or "").partition(";")
        charset = re.search(r"charset\s*=\s*\"?([^\s;\"]+)", params, re.IGNORECASE)
        if media.strip().lower() != "application/json" or (charset and charset.group(1).lower() not in ("utf-8", "utf8")):
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")
        data = self._read_body()
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not valid UTF-8", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        except ValueError as error:
            raise ApiError(400, f"invalid JSON body: {clean(error, 200)}", code="invalid_json") from None

    def _check_auth(self):
        key = self.app.api_key
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ dispatch

    def _answer(self):
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        try:
            self._framing()
            hosts = self.headers.get_all("Host") or []
            if len(hosts) > 1 or not self.app.allows_host(hosts[0] if hosts else None):
                raise ApiError(403, f"this server does not answer to Host {clean(', '.join(hosts), 80)!r}; start it "
                               "with --allowed-host NAME to allow that name", code="host_not_allowed")
            if path.startswith("/v1/models/"):
                method, name = "GET", "model"
            elif path in self.ROUTES:
                method, name = self.ROUTES[path]
            else:
                raise ApiError(404, f"no such endpoint: {clean(self.command, 20)} {clean(path, 100)}", code="not_found")
            if self.command == "OPTIONS":
                self._options(method)
                return
            if self.command != method:
                raise ApiError(405, f"{path} accepts {method}, not {clean(self.command, 20)}",
                               code="method_not_allowed", headers={"Allow": f"{method}, OPTIONS"})
            if name not in self.OPEN:
                self._check_auth()
                if self.app.draining:
                    self.close_connection = True
                    raise ApiError(503, "the server is shutting down", code="shutting_down", type_="server_error")
            getattr(self, "_" + name)(path)
        except ApiError as error:
            if self._status is not None:  # already answering (a stream): nothing more to say here
                raise ClientGone(f"failed after the answer began: {error.message}") from None
            self._send_json(error.status, error.body(), error.headers)
        except ClientGone:
            self.close_connection = True
            raise
        except Exception:  # a bug: answer 500 rather than drop the connection
            log.exception("%s: error answering %s %s", self.peer, clean(self.command, 20), clean(path, 100))
            self.close_connection = True
            if self._status is None:
                self._send_json(500, ApiError(500, "internal server error", type_="server_error").body())

    def _options(self, method):
        """CORS preflight (for allowed origins) or a plain OPTIONS: 204 with what is allowed."""
        headers = {"Allow": f"{method}, OPTIONS"}
        origin = self.headers.get("Origin")
        if origin and self.headers.get("Access-Control-Request-Method") and self.app.allows_origin(origin):
            requested = self.headers.get("Access-Control-Request-Headers", "")
            headers.update({
                "Access-Control-Allow-Methods": f"{method}, OPTIONS",
                "Access-Control-Allow-Headers": requested if _TOKEN_LIST.fullmatch(requested)
                else "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            })
        self._status = 204
        try:
            self.send_response(204)
            for name, value in {**self._cors(), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
        except OSError as error:
            raise ClientGone(f"{type(error).__name__} while sending the answer") from None

    # ------------------------------------------------------------------ simple endpoints

    def _playground(self, path):
        if self.app.playground is None:
            raise ApiError(404, "the playground is off (--no-playground)", code="not_found")
        self._send(200, self.app.playground, "text/html; charset=utf-8", {
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Cache-Control": "no-cache",
        })

    def _health(self, path):
        health = self.app.health(self.server.connections)
        self._send_json(200 if health["status"] == "ok" else 503, health)

    def _models(self, path):
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _model(self, path):
        name = urllib.parse.unquote(path[len("/v1/models/"):])
        if name not in self.app.protocol.model_ids:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        self._send_json(200, self.app.model_card())

    # ------------------------------------------------------------------ tokenizer (vLLM's endpoints)

    def _tokenize(self, path):
        tokens = self.app.protocol.parse_tokenize(self._read_json())
        self._send_json(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.app.protocol.n_ctx})

    def _detokenize(self, path):
        tokens = self.app.protocol.parse_detokenize(self._read_json())
        self._send_json(200, {"prompt": self.app.enc.decode(tokens)})

    def _tokenizer_info(self, path):
        eot = self.app.enc.decode([self.app.enc.eot_token])
        self._send_json(200, {"tokenizer_class": "GPT2Tokenizer", "eos_token": eot, "bos_token": eot,
                              "unk_token": eot, "pad_token": None, "model_max_length": self.app.protocol.n_ctx,
                              "vocab_size": self.app.protocol.n_vocab})

    # ------------------------------------------------------------------ generation

    def _submit(self, plan):
        job = Job(plan.rows, stream=plan.stream)
        try:
            self.app.engine.submit(job)
        except QueueFull as error:
            raise ApiError(503, str(error), code="queue_full", type_="server_error",
                           headers={"Retry-After": "1"}) from None
        except Unavailable as error:
            raise ApiError(503, str(error), code=error.code, type_="server_error") from None
        self._note = f" {len(plan.rows)} rows"
        return job

    def _run(self, plan, job, emit, heartbeat=None):
        """Feeds the job's tokens to one ChoiceText per row, calling emit(index, text, choice,
        row infos) with each piece of final text, until every choice is finished; heartbeat() is
        called when nothing came for a while. Returns (choices, infos), infos[i] holding row i's
        (logprob, top ids, top logprobs) per token when asked for."""
        choices = [ChoiceText(self.app.enc, plan.max_tokens, plan.stops, plan.trim) for _ in plan.rows]
        infos = [[] for _ in plan.rows]
        unfinished = len(choices)
        wait = self.app.limits.heartbeat if heartbeat else 1.0
        try:
            while unfinished:
                event = job.get(timeout=wait)
                if event is None:
                    if heartbeat:
                        heartbeat()
                    continue
                if event[0] == "error":
                    _, status, message, code = event
                    raise ApiError(status, message, code=code, type_="server_error")
                _, index, ids, row_infos, row_done = event
                choice = choices[index]
                if choice.finished:
                    continue
                if row_infos:
                    infos[index] += row_infos
                text = choice.feed(ids)
                if row_done and not choice.finished:
                    text += choice.end()
                if choice.finished:
                    job.mark_unneeded(index)
                    unfinished -= 1
                emit(index, text, choice, infos[index])
        except BaseException:
            self.app.engine.cancel(job)
            raise
        self._note = f" {len(plan.rows)} rows, {sum(c.tokens for c in choices)} tokens"
        return choices, infos

    def _generate(self, path):
        plan = self.app.protocol.parse_generate(self._read_json())
        texts = [[] for _ in plan.rows]
        self._run(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        self._send_json(200, {"generated_text": "".join(texts[0])})

    def _prompt_scores(self, plan):
        """echo + logprobs: each prompt's scores (first token null), or None."""
        if not (plan.echo and plan.logprobs is not None):
            return None
        return self.app.engine.score(plan.prompt_tokens)

    def _completions(self, path):
        plan = self.app.protocol.parse_completions(self._read_json())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.app.model_id}
        scores = self._prompt_scores(plan)
        rows = len(plan.prompt_tokens) * plan.n
        if plan.stream:
            self._stream(plan, head, scores)
            return
        texts = [[] for _ in range(rows)]
        choices, infos = [], []
        if plan.rows:
            choices, infos = self._run(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        out = []
        for i in range(rows):
            prompt = i // plan.n
            echo = plan.prompt_texts[prompt] if plan.echo else ""
            text = echo + "".join(texts[i])
            logprobs = None
            if plan.logprobs is not None:
                logprobs = self._logprobs(plan, prompt, scores, choices[i].ids if choices else [],
                                          infos[i] if infos else [])
            out.append({"text": text, "index": i, "logprobs": logprobs,
                        "finish_reason": choices[i].finish_reason if choices else "length"})
        self._send_json(200, {**head, "choices": out, "usage": _usage(plan, choices)})

    def _token_text(self, token):
        return self.app.enc.decode([int(token)])

    def _logprobs(self, plan, prompt, scores, ids, infos, offset=None):
        """OpenAI's legacy logprobs object for a choice: the prompt's tokens first when echoed
        (scores), then the sampled `ids` with their `infos`."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        position = 0 if plan.echo else len(plan.prompt_texts[prompt])
        if offset is not None:
            position = offset
        entries = []
        if scores is not None and offset is None:
            score = scores[prompt]
            for k, token in enumerate(plan.prompt_tokens[prompt]):
                first = k == 0
                entries.append((token, None if first else float(score.logprobs[k]),
                                None if first else list(zip(score.top_ids[k].tolist(), score.top_logprobs[k].tolist()))))
        for token, (logprob, top_ids, top_logprobs) in zip(ids, infos):
            entries.append((token, float(logprob), list(zip(top_ids.tolist(), top_logprobs.tolist()))))
        for token, logprob, alternatives in entries:
            text = self._token_text(token)
            tokens.append(text)
            token_logprobs.append(logprob)
            offsets.append(position)
            position += len(text)
            if alternatives is None:
                top.append(None)
                continue
            best = {}
            for alt, value in alternatives[:plan.logprobs]:
                best.setdefault(self._token_text(alt), float(value))
            best.setdefault(text, logprob)
            top.append(best)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _chat_logprobs(self, plan, ids, infos):
        """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]} for `ids`."""
        enc = self.app.enc

        def entry(token, logprob):
            return {"token": self._token_text(token), "logprob": float(logprob),
                    "bytes": list(enc.decode_bytes([int(token)]))}

        return {"content": [
            {**entry(token, logprob),
             "top_logprobs": [entry(t, v) for t, v in zip(top_ids.tolist()[:plan.logprobs], top_values.tolist())]}
            for token, (logprob, top_ids, top_values) in zip(ids, infos)
        ]}

    def _chat(self, path):
        plan = self.app.protocol.parse_chat(self._read_json())
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.app.model_id, "system_fingerprint": None}
        if plan.stream:
            self._stream(plan, {**head, "object": "chat.completion.chunk"}, None)
            return
        texts = [[] for _ in plan.rows]
        choices, infos = self._run(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        self._send_json(200, {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
             "logprobs": self._chat_logprobs(plan, c.ids, infos[i]) if plan.logprobs is not None else None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], "usage": _usage(plan, choices)})

    # ------------------------------------------------------------------ streams

    def _stream(self, plan, head, scores):
        """Server-sent events: one `data:` JSON chunk per piece of text, `data: [DONE]` at the end.
        Headers go out as soon as the request is queued; comments keep the line alive."""
        chat = plan.kind == "chat"
        job = self._submit(plan) if plan.rows else None
        chunked = self.request_version != "HTTP/1.0"  # else: no length, the close ends the body
        if not chunked:
            self.close_connection = True
        self._status = 200
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")
            for name, value in self._cors().items():
                self.send_header(name, value)
            self.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
            self.end_headers()
        except OSError as error:
            if job is not None:
                self.app.engine.cancel(job)
            raise ClientGone(f"{type(error).__name__} while sending the answer") from None

        def write(data):
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            except OSError as error:
                raise ClientGone(f"{type(error).__name__} while streaming") from None

        def send(payload):
            write(b"data: " + (payload if isinstance(payload, bytes) else _json_bytes(payload)) + b"\n\n")

        rows = len(plan.prompt_tokens) * plan.n
        sent = [0] * rows  # tokens of each choice already sent (with their logprobs)
        offsets = [None] * rows  # text_offset of each choice's next token
        choices = []

        def chunk(index, text, finish_reason=None, ids=(), infos=()):
            if chat:
                logprobs = self._chat_logprobs(plan, ids, infos) if plan.logprobs is not None and ids else None
                send({**head, "choices": [{"index": index, "delta": {"content": text} if text else {},
                                           "logprobs": logprobs, "finish_reason": finish_reason}]})
                return
            logprobs = None
            if plan.logprobs is not None:
                logprobs = self._logprobs(plan, index // plan.n, None, ids, infos, offset=offsets[index])
                if logprobs["tokens"]:
                    offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            send({**head, "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                       "finish_reason": finish_reason}]})

        def emit(index, text, choice, row_infos):
            ids = choice.ids[sent[index]:]
            infos = row_infos[sent[index]:sent[index] + len(ids)]
            sent[index] += len(ids)
            if text or choice.finished or (plan.logprobs is not None and ids):
                chunk(index, text, choice.finish_reason, ids, infos)

        try:
            for i in range(rows):
                prompt = i // plan.n
                offsets[i] = len(plan.prompt_texts[prompt])
                if chat:
                    send({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
                elif plan.echo:
                    logprobs = self._logprobs(plan, prompt, scores, [], []) if scores is not None else None
                    send({**head, "choices": [{"text": plan.prompt_texts[prompt], "index": i, "logprobs": logprobs,
                                               "finish_reason": None if plan.rows else "length"}]})
            if job is not None:
                choices, _ = self._run(plan, job, emit, heartbeat=lambda: write(b": keep-alive\n\n"))
                self._note += ", streamed"
        except ApiError as error:  # the status line is gone: report in the stream
            send(error.body())
        except BaseException:
            if job is not None:
                self.app.engine.cancel(job)
            raise
        if plan.include_usage:
            send({**head, "choices": [], "usage": _usage(plan, choices)})
        send(b"[DONE]")
        if chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk
            except OSError as error:
                raise ClientGone(f"{type(error).__name__} while streaming") from None
