"""The HTTP side of the server: a standard-library `ThreadingHTTPServer` made to hold up against
slow, half-closed, vanishing and hostile clients (TensorFlow-free).

* Connections are capped (`Limits.max_connections`), and so is what one peer address holds
  (`max_connections_per_address`, an IPv6 peer counted by its /64); the last `reserve_for_new`
  connections are kept for addresses that hold none yet. Beyond these a connection gets a short
  503 and is closed at once, without a thread: one host's idle or half-sent sockets cannot lock
  the others out.
* Reading has deadlines for the whole thing, not per recv(): `first_byte_timeout` for a new
  connection to start its first request (short: it holds a slot while it sends nothing),
  `idle_timeout` to start a request on a kept-alive connection, `header_timeout` for the request
  line and headers, `body_timeout` for the body; writes time out after `write_timeout` without
  progress. A slowloris client is closed.
* Framing is strict: every line of the head ends with CRLF (no bare LF), no obs-fold continuation
  lines, no control characters in header lines, one Host header (required in HTTP/1.1), one
  Content-Length of ASCII digits (no "+43", "4_3", duplicates), no request bodies in chunked
  encoding, a body the endpoint does not read closes the connection (it is never parsed as the
  next request). POST bodies must be `application/json` (UTF-8); JSON nested too
  deeply or not UTF-8 is a 400. `Expect: 100-continue` is answered only once the request passed
  every check, so an oversize body gets its 413 at once.
* With `allowed_hosts` set (the default loopback server without an API key), a `Host` header
  naming anything else gets 403: a web page cannot reach the server through DNS rebinding, and it
  cannot send a cross-site "simple" POST because JSON needs a CORS preflight, which only
  `cors_origins` pass.
* A client is "gone" only when a write to it fails (or it closes before sending a whole request):
  one that half-closes after sending still gets its answer. Streams write a comment every
  `heartbeat` seconds while waiting, so a vanished stream client frees its slot. Each dropped
  client is one log line; log lines escape control characters.
* Uses no select.poll (works on Windows, macOS and Linux).

A request that passes the access rules goes to gpt2.serve.api's `App.handle`; the Response comes back
to `Handler._respond`, the one writer of status lines and headers (CORS's merged there).
"""

import contextlib
import dataclasses
import hmac
import io
import ipaddress
import logging
import math
import re
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpt2.serve.api import Request, clean, error_response
from gpt2.serve.protocol import ApiError

log = logging.getLogger("gpt2.serve")

_DIGITS = re.compile(r"[0-9]{1,18}")
_TOKEN_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab
MAX_LINE = 65536  # bytes in the request line or one header line (http.client's)
MAX_HEADERS = 100
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_BUSY_BODY = b'{"error": {"message": "too many connections", "type": "server_error", "param": null, "code": "busy"}}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class ClientGone(Exception):
    """The client went away (or was too slow); the message says how."""


@dataclasses.dataclass
class Limits:
    """What one client may hold: connections, seconds for each phase of a request, body bytes."""

    max_connections: int = 64
    max_connections_per_address: int = None  # one peer address (IPv6: its /64); None = a quarter of the total
    reserve_for_new: int = None  # connections only addresses holding none may take; None = an eighth (0 when
    #                              one address may hold them all)
    max_body_bytes: int = 1 << 20
    first_byte_timeout: float = 3.0  # a new connection, to send the first byte of its first request
    idle_timeout: float = 15.0  # a kept-alive connection waiting for its next request
    header_timeout: float = 10.0  # the request line and headers, from their first byte
    body_timeout: float = 30.0  # the whole body
    write_timeout: float = 30.0  # one write without progress
    heartbeat: float = 2.0  # a stream with nothing to send writes a comment this often

    def __post_init__(self):
        total = self.max_connections
        if self.max_connections_per_address is None:
            self.max_connections_per_address = max(1, total // 4)
        self.max_connections_per_address = min(self.max_connections_per_address, total)
        if self.reserve_for_new is None:
            spare = total - self.max_connections_per_address
            self.reserve_for_new = min(max(1, total // 8), spare)


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


class Server(ThreadingHTTPServer):
    """The HTTP server for `app` (a gpt2.serve.api.App; may be set later, before serving), with its
    limits (Limits() by default) and access rules. `Server(app, host, port, bind_and_activate=False)`
    binds later (see cli).

    api_key: None or the bearer key. cors_origins: origins answered with CORS headers ("*" = any).
    allowed_hosts: None (no Host check) or names the Host header may carry (ports ignored).
    """

    daemon_threads = True
    request_queue_size = 128  # listen backlog

    def __init__(self, app, host="127.0.0.1", port=5000, bind_and_activate=True, limits=None, api_key=None,
                 cors_origins=(), allowed_hosts=None):
        if _is_ipv6(host):
            self.address_family = socket.AF_INET6
        self.app = app
        self.limits = limits or Limits()
        self.api_key = api_key
        self.cors_origins = tuple(cors_origins)
        self.allowed_hosts = None if allowed_hosts is None else {_host_name(h) for h in allowed_hosts}
        self.connections = 0  # open connections (each has a thread)
        self._by_address = {}  # address_key -> its open connections
        self._count_lock = threading.Lock()
        self._refused = 0
        self._refused_logged = 0.0
        self._busy = 0  # requests being answered
        self._busy_lock = threading.Condition()
        super().__init__((host, port), Handler, bind_and_activate)

    def allows_origin(self, origin):
        return "*" in self.cors_origins or origin in self.cors_origins

    def allows_host(self, host):
        return self.allowed_hosts is None or host is None or _host_name(host) in self.allowed_hosts

    @contextlib.contextmanager
    def busy(self):
        """The block answers a request (see wait_idle)."""
        with self._busy_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1
                self._busy_lock.notify_all()

    def wait_idle(self, timeout):
        """Waits until no request is being answered (or `timeout` seconds); True if idle."""
        with self._busy_lock:
            return self._busy_lock.wait_for(lambda: self._busy == 0, timeout)

    @property
    def port(self):
        return self.server_address[1]

    def process_request(self, request, client_address):
        key = address_key(client_address)
        limits = self.limits
        with self._count_lock:
            held = self._by_address.get(key, 0)
            if held >= limits.max_connections_per_address:
                why = f"{held} open from {key}, the limit per address (--max-connections-per-address)"
            elif self.connections >= limits.max_connections - (limits.reserve_for_new if held else 0):
                why = (f"{self.connections} open, the limit (--max-connections)" if not held else
                       f"{self.connections} open and {key} holds {held}: the rest are kept for new addresses")
            else:
                why = None
                self.connections += 1
                self._by_address[key] = held + 1
        if why is not None:
            self._refuse(request, why)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(key)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(address_key(client_address))

    def _release(self, key):
        with self._count_lock:
            self.connections -= 1
            held = self._by_address.pop(key) - 1
            if held:
                self._by_address[key] = held

    def connections_of(self, client_address):
        """Open connections of the address (its /64 for IPv6) of `client_address`."""
        with self._count_lock:
            return self._by_address.get(address_key(client_address), 0)

    def _refuse(self, request, why):
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:  # at most one line a second for a flood
            log.warning("%d connection(s) refused, the last: %s", self._refused, why)
            self._refused, self._refused_logged = 0, now
        try:
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        """An unexpected error on a connection: one line (no traceback for a dropped client)."""
        error = sys.exc_info()[1]
        log.warning("%s: connection ended by %s: %s", _peer(client_address), type(error).__name__, clean(error))


def address_key(client_address):
    """What the per-address limit counts for a peer: its IPv4 address (an IPv4-mapped IPv6 one
    too), or the /64 network of an IPv6 address (one host or site usually holds a whole /64)."""
    host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


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


class Handler(BaseHTTPRequestHandler):
    """One connection: requests one after another (keep-alive), each answered in full."""

    protocol_version = "HTTP/1.1"
    server_version = "gpt2-serve"

    # ------------------------------------------------------------------ connection

    def setup(self):
        self.connection = self.request
        self.peer = _peer(self.client_address)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._requests = 0  # requests begun on this connection
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self.wfile = _Writer(self.connection, self.server.limits.write_timeout)

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
        limits = self.server.limits
        first = not self._requests
        wait = min(limits.first_byte_timeout, limits.idle_timeout) if first else limits.idle_timeout
        self._reader.deadline = time.monotonic() + wait
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # closed between requests: done
                return
        except TimeoutError:
            self.close_connection = True  # idle keep-alive connection, or a new one that sent nothing
            if first:
                log.debug("%s: closed: sent nothing within %g s", self.peer, wait)
            return
        self._requests += 1
        self._started = time.monotonic()
        self._reader.deadline = self._started + limits.header_timeout
        self._status = None
        self._request = None  # the api.Request, once the head is read
        self._body_left = 0
        self.command, self.path = "", ""
        self._expect_continue = False
        try:
            header_block = self._read_head()
            if header_block is None:
                return
            real_rfile, self.rfile = self.rfile, io.BytesIO(header_block)  # parse_request reads the checked lines
            try:
                if not self.parse_request():
                    return
            finally:
                self.rfile = real_rfile
        except TimeoutError:
            raise ClientGone(f"did not send a whole request head within {limits.header_timeout:g} s") from None
        try:
            with self.server.busy():
                self._answer()
        finally:
            if self._body_left:
                self.close_connection = True  # an unread body is never parsed as a request
            self._log_access()
        self.wfile.flush()

    def _read_head(self):
        """Reads and checks the request line and header lines (RFC 9112's framing, see the module
        docstring); the header lines for parse_request, or None after answering 400, 414 or 431."""
        self.raw_requestline = line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            return self._refuse_head(414, f"the request line is over {MAX_LINE} bytes")
        if not line.endswith(b"\n"):
            raise ClientGone("closed the connection in the middle of a request")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            return self._refuse_head(400, "the request line must end with CRLF (a bare LF or CR is not a line end)")
        lines = []
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                return self._refuse_head(431, f"a header line is over {MAX_LINE} bytes")
            if not line.endswith(b"\n"):
                raise ClientGone("closed the connection in the middle of a request")
            if line == b"\r\n":
                return b"".join(lines) + line
            if len(lines) == MAX_HEADERS:
                return self._refuse_head(431, f"more than {MAX_HEADERS} header lines")
            number = len(lines) + 1
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                return self._refuse_head(400, f"header line {number} does not end with CRLF (a bare LF or CR is "
                                              "not a line end): end every line of the request head with CRLF")
            if line[:1] in (b" ", b"\t"):
                return self._refuse_head(400, f"header line {number} is an obs-fold continuation (starts with "
                                              "a space or tab): send each header on one line")
            if _FIELD_CONTROL.search(line[:-2]):
                return self._refuse_head(400, f"header line {number} holds a control character (NUL, CR, LF...): "
                                              "remove it")
            name, colon, _ = line.partition(b":")
            if not colon or not _FIELD_NAME.fullmatch(name):
                return self._refuse_head(400, f"header line {number} is not 'Name: value' (a token, then a colon "
                                              "with no space before it)")
            lines.append(line)

    def _refuse_head(self, status, message):
        """An error answer for a request whose head is refused before parse_request."""
        self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
        self.send_error(status, message)
        return None

    def handle_expect_100(self):
        """`Expect: 100-continue` is answered in _read_body, once the request passed every check
        (an oversize or refused request gets its error at once, never `100 Continue` first)."""
        self._expect_continue = True
        return True

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
                self._status, self._request.note if self._request else "", time.monotonic() - self._started)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (malformed request line, 431...) as JSON too."""
        self.close_connection = True
        self._respond(error_response(ApiError(code, message or self.responses.get(code, ("error",))[0],
                                              type_="invalid_request_error" if code < 500 else "server_error")))

    def _cors(self):
        origin = self.headers.get("Origin") if hasattr(self, "headers") and self.headers else None
        if origin and self.server.allows_origin(origin):
            return {"Access-Control-Allow-Origin": "*" if "*" in self.server.cors_origins else origin, "Vary": "Origin"}
        return {}

    def _write(self, data, doing="sending the answer"):
        try:
            self.wfile.write(data)
        except (OSError, ValueError) as error:
            raise ClientGone(f"{type(error).__name__} while {doing}") from None

    def _respond(self, response):
        """Writes an api.Response: the status line and headers (CORS's, then the response's), then its
        body, or its events as they come (chunked; close-delimited for HTTP/1.0). The events are closed
        however this ends (early: the client went away)."""
        self._status = response.status
        events = response.events
        chunked = events is not None and self.request_version != "HTTP/1.0"  # else: the close ends the body
        if events is not None and not chunked:
            self.close_connection = True
        first, last = {}, {}
        if events is not None:
            first = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"}
        elif response.body is not None:
            first = {"Content-Type": response.content_type, "Content-Length": str(len(response.body))}
        if chunked or (first and self.close_connection):
            last = {"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"}
        try:
            try:
                self.send_response(response.status)
                for name, value in [*first.items(), *{**self._cors(), **response.headers}.items(), *last.items()]:
                    self.send_header(name, value)
                self.end_headers()
            except (OSError, ValueError) as error:
                raise ClientGone(f"{type(error).__name__} while sending the answer") from None
            if response.body is not None and self.command != "HEAD":
                self._write(response.body)
            for data in events or ():
                self._write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data, "streaming")
            if chunked:
                self._write(b"0\r\n\r\n", "streaming")  # the last chunk
        finally:
            if events is not None:
                events.close()

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
        limits = self.server.limits
        length = self._body_left
        if self.headers.get("Content-Length") is None:
            raise ApiError(411, "a JSON body with Content-Length is required", code="length_required")
        if length > limits.max_body_bytes:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes} "
                           "(--max-body-bytes)", code="request_too_large")
        if self._expect_continue and length:
            self._expect_continue = False
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n", "sending 100 Continue")
        self._reader.deadline = time.monotonic() + limits.body_timeout
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise ClientGone(f"did not send its {length}-byte body within {limits.body_timeout:g} s") from None
        if len(data) < length:
            raise ClientGone("closed the connection in the middle of the body")
        self._body_left = 0
        return data

    def _check_auth(self):
        key = self.server.api_key
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
        self._request = Request(self.command, path, self.headers, self._read_body, self.server.connections)
        try:
            try:
                self._framing()
                hosts = self.headers.get_all("Host") or []
                if len(hosts) > 1:
                    self.close_connection = True
                    raise ApiError(400, "more than one Host header", code="bad_host")
                if not hosts and self.request_version >= "HTTP/1.1":
                    raise ApiError(400, "an HTTP/1.1 request needs a Host header (RFC 9112)", code="bad_host")
                if not self.server.allows_host(hosts[0] if hosts else None):
                    raise ApiError(403, f"this server does not answer to Host {clean(', '.join(hosts), 80)!r}; start "
                                   "it with --allowed-host NAME to allow that name", code="host_not_allowed")
                name, _ = self.server.app.endpoint(self.command, path)
                if self.command != "OPTIONS" and name not in self.server.app.OPEN:
                    self._check_auth()
                    if self.server.app.draining:
                        self.close_connection = True
                        raise ApiError(503, "the server is shutting down", code="shutting_down", type_="server_error")
                response = self.server.app.handle(self._request)
                if self.command == "OPTIONS":
                    response.headers.update(self._preflight(response.headers["Allow"]))
            except ApiError as error:
                response = error_response(error)
            self._respond(response)
        except ClientGone:
            self.close_connection = True
            raise
        except Exception:  # a bug: answer 500 rather than drop the connection
            log.exception("%s: error answering %s %s", self.peer, clean(self.command, 20), clean(path, 100))
            self.close_connection = True
            if self._status is None:
                self._respond(error_response(ApiError(500, "internal server error", type_="server_error")))

    def _preflight(self, allowed):
        """A CORS preflight's headers (for allowed origins): `allowed` methods and the headers asked for."""
        origin = self.headers.get("Origin")
        if not (origin and self.headers.get("Access-Control-Request-Method") and self.server.allows_origin(origin)):
            return {}
        requested = self.headers.get("Access-Control-Request-Headers", "")
        return {"Access-Control-Allow-Methods": allowed,
                "Access-Control-Allow-Headers": requested if _TOKEN_LIST.fullmatch(requested)
                else "Authorization, Content-Type",
                "Access-Control-Max-Age": "600"}
