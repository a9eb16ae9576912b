"""The server against hostile and careless clients, over raw sockets (gpt2.serve.httpd): the
connection cap, whole-request deadlines against slowloris, strict framing, half-closed and
vanishing clients, cross-site and DNS-rebinding requests, malformed JSON and strings, huge
prompts, and the code path of platforms without select.poll (Windows)."""

import json
import logging
import socket
import struct
import time

import pytest

from gpt2.serve.httpd import Limits, address_key, default_allowed_hosts

from serve_support import (
    GREEDY,
    MODEL_ID,
    Running,
    paused,
    post_bytes,
    raw_request,
    read_all,
    sse_events,
    statuses,
    wait_until,
)

LIMITS = dict(max_connections=6, max_connections_per_address=6, header_timeout=1.0, body_timeout=1.0, idle_timeout=3.0,
              heartbeat=0.3)
GOOD = {"model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    """A default-like server (no key, loopback: Host checked) with small limits."""
    running = Running(limits=Limits(**LIMITS), allowed_hosts=default_allowed_hosts("127.0.0.1"))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="gpt2.serve")


def connect(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def answer_text(reply):
    body = reply.split(b"\r\n\r\n", 1)[1].decode()
    return json.JSONDecoder().raw_decode(body)[0]["choices"][0]["text"]  # the first answer's


def closed_within(sock, seconds):
    """True if the server closes `sock` within `seconds` (whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def reset(sock):
    """Close with a TCP reset (SO_LINGER 0), as a crashed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_connections_beyond_the_cap_get_a_quick_503(server):
    """Issue 10 item 6: connections are capped; the rest are answered 503 and closed at once."""
    held = [connect(server) for _ in range(LIMITS["max_connections"])]
    try:
        wait_until(lambda: server.server.connections == LIMITS["max_connections"], what="the connections")
        for _ in range(20):
            with connect(server) as extra:
                reply = read_all(extra, timeout=5)
                assert statuses(reply) == [503] and b'"busy"' in reply
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: server.server.connections == 0, what="the connections to close")
    assert server.get("/health").json()["status"] == "ok"


def connect_from(port, source):
    """A connection to the server from loopback address `source` (127.0.0.0/8 is all loopback on Linux)."""
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    except OSError as error:  # e.g. macOS, where only 127.0.0.1 is configured
        pytest.skip(f"cannot connect from {source}: {error}")


HALF_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def test_item3_a_flood_from_one_address_leaves_room_for_others(caplog):
    """Issue 24 item 3: one address holding half-sent heads and silent sockets cannot lock others
    out: it holds at most max_connections_per_address, the last reserve_for_new slots go only to
    addresses holding none, and a new connection that sends nothing is closed after
    first_byte_timeout (not the longer header deadline)."""
    limits = Limits(max_connections=8, max_connections_per_address=3, reserve_for_new=2, first_byte_timeout=0.5,
                    header_timeout=30.0, idle_timeout=30.0, body_timeout=5.0)
    running = Running(limits=limits)
    port, held = running.port, []
    try:
        def hold(source):
            sock = connect_from(port, source)
            sock.sendall(HALF_HEAD)
            held.append(sock)
            wait_until(lambda: running.server.connections == len(held), what="the connection to be counted")

        for _ in range(3):
            hold("127.0.0.2")
        for k in range(20):  # the flood goes on: every further connection from 127.0.0.2 is refused at once
            with connect_from(port, "127.0.0.2") as extra:
                if k % 2:
                    extra.sendall(HALF_HEAD)
                reply = read_all(extra, timeout=5)
            assert statuses(reply) == [503] and b'"busy"' in reply
        assert running.server.connections_of(("127.0.0.2", 0)) == 3
        for _ in range(2):
            hold("127.0.0.3")
        hold("127.0.0.4")  # 6 open: the last 2 are kept for addresses that hold none
        for source in ("127.0.0.3", "127.0.0.4"):
            with connect_from(port, source) as extra:
                assert statuses(read_all(extra, timeout=5)) == [503]
        for _ in range(3):  # a new address is served, one connection after another
            with connect_from(port, "127.0.0.1") as sock:
                sock.sendall(post_bytes("/v1/completions", GOOD, ["Connection: close"]))
                reply = read_all(sock, timeout=30)
            assert statuses(reply) == [200] and answer_text(reply) == GREEDY[0]["new_text"]
            wait_until(lambda: running.server.connections == 6, what="the connection to be let go")
        with connect_from(port, "127.0.0.5") as silent:  # takes a reserved slot, sends nothing: closed soon
            assert closed_within(silent, 10)
        wait_until(lambda: running.server.connections == 6, what="the silent connection to be let go")
        assert any("limit per address" in r.getMessage() for r in caplog.records)  # the first refusal's line
    finally:
        for sock in held:
            sock.close()
        running.stop()
    wait_until(lambda: running.server.connections == 0, what="the connections to close")


def test_item3_limits_and_address_keys():
    """Issue 24 item 3: the defaults (a quarter of the total per address, an eighth kept for new
    addresses, none when one address may hold them all) and what counts as one address."""
    assert (Limits().max_connections_per_address, Limits().reserve_for_new) == (16, 8)
    assert (Limits(max_connections=16).max_connections_per_address, Limits(max_connections=16).reserve_for_new) \
        == (4, 2)
    one = Limits(max_connections=10, max_connections_per_address=10)
    assert (one.max_connections_per_address, one.reserve_for_new) == (10, 0)
    assert (Limits(max_connections=1).max_connections_per_address, Limits(max_connections=1).reserve_for_new) == (1, 0)
    assert address_key(("10.1.2.3", 5000)) == "10.1.2.3" != address_key(("10.1.2.4", 5000))
    assert address_key(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    assert address_key(("2001:db8::1", 1, 0, 0)) == address_key(("2001:db8::abcd:1", 2, 0, 0)) == "2001:db8::/64"
    assert address_key(("2001:db8:0:1::1", 1, 0, 0)) != address_key(("2001:db8::1", 1, 0, 0))
    assert address_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"


def test_item3_command_line_options(capsys):
    from gpt2.serve.cli import build_parser, check_args

    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--max-connections", "8", "--max-connections-per-address", "8",
                              "--first-byte-timeout", "1.5"])
    check_args(parser, args)
    assert (args.max_connections_per_address, args.first_byte_timeout) == (8, 1.5)
    args = parser.parse_args(["--model", "m", "--max-connections", "8", "--max-connections-per-address", "9"])
    with pytest.raises(SystemExit):
        check_args(parser, args)
    assert "must not exceed --max-connections" in capsys.readouterr().err


def test_slowloris_headers_hit_a_deadline_for_the_whole_head(server, caplog):
    """Issue 10 item 6: a client trickling header lines is closed after header_timeout, however
    often it sends a byte (the deadline is for the whole head, not per read)."""
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent, start = 0, time.monotonic()
        try:
            while time.monotonic() - start < 6:
                sock.sendall(b"X-Slow: a\r\n")
                sent += 1
                time.sleep(0.1)
        except OSError:  # closed by the server
            pass
        assert time.monotonic() - start < 4 and closed_within(sock, 2)
    wait_until(lambda: any("did not send a whole request head" in r.getMessage() for r in caplog.records))


def test_slow_bodies_hit_a_deadline(server, caplog):
    with connect(server) as sock:
        sock.sendall(post_bytes("/v1/completions", b"x" * 1000)[:-1000])  # the head, then the body slowly
        start = time.monotonic()
        try:
            while time.monotonic() - start < 6:
                sock.sendall(b"x")
                time.sleep(0.1)
        except OSError:
            pass
        assert time.monotonic() - start < 4 and closed_within(sock, 2)
    wait_until(lambda: any("1000-byte body within 1 s" in r.getMessage() for r in caplog.records))


@pytest.mark.parametrize("lengths", [["4_3"], ["+43"], ["-43"], ["43", "43"], ["43", "44"], ["0x2b"], ["٤٣"]])
def test_content_length_is_strict(server, lengths):
    """Issue 10 item 9: only one Content-Length of plain digits is accepted."""
    body = json.dumps({"model": MODEL_ID, "prompt": "Hello there", "max_tokens": 1}).encode()[:43].ljust(43)
    head = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            *(f"Content-Length: {value}" for value in lengths)]
    reply = raw_request(server.port, ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body * 3)
    assert statuses(reply) == [400] and b"Connection: close" in reply


def test_a_get_body_is_never_read_as_the_next_request(server):
    """Issue 10 item 9: the body of a GET (never read) closes the connection after the answer."""
    smuggled = b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    reply = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(smuggled), smuggled))
    assert statuses(reply) == [200]


def test_chunked_request_bodies_are_refused(server):
    reply = raw_request(server.port, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}   \r\n0\r\n\r\n")
    assert statuses(reply) == [501]
    reply = raw_request(server.port, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                     b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}")
    assert statuses(reply) == [400]


def test_keep_alive_requests_follow_each_other(server):
    one = post_bytes("/v1/completions", GOOD)
    reply = raw_request(server.port, one + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert statuses(reply) == [200, 200]


def test_control_characters_are_escaped_in_the_log(server, caplog):
    """Issue 10 item 9: request lines are logged with control characters escaped."""
    raw_request(server.port, b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    wait_until(lambda: any("red" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "red" in r.getMessage()]
    assert lines and all("\x1b" not in line and "\x07" not in line for line in lines)
    assert any("\\x1b[31mred\\x07" in line for line in lines)


def test_a_dropped_client_is_one_log_line_without_a_traceback(server, caplog, capfd):
    """Issue 10 item 7: clients that vanish mid-request (a reset) each leave one log line."""
    ports = []
    for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                    post_bytes("/v1/completions", b'{"model": "tiny-model", "pro')):
        sock = connect(server)
        sock.sendall(partial)
        ports.append(sock.getsockname()[1])
        time.sleep(0.2)
        reset(sock)
    for port in ports:
        wait_until(lambda port=port: any(f":{port}:" in r.getMessage() for r in caplog.records),
                   what=f"a log line for {port}")
    time.sleep(0.3)
    for port in ports:
        assert len([r for r in caplog.records if f":{port}:" in r.getMessage()]) == 1
    assert "Traceback" not in capfd.readouterr().err and not any(r.exc_info for r in caplog.records)


def test_a_half_closed_client_still_gets_its_answer(server):
    """Issue 10 item 7: a client that shuts down its sending side after the request (as
    `curl --no-buffer` or a shell `nc -N` does) is still there to read the answer."""
    with paused(server.engine):
        sock = connect(server)
        sock.sendall(post_bytes("/v1/completions", GOOD))
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: server.engine.queue_state()["waiting_rows"] == 1)
        time.sleep(0.5)
    reply = read_all(sock, timeout=30)
    sock.close()
    assert statuses(reply) == [200] and answer_text(reply) == GREEDY[0]["new_text"]


def test_a_stream_client_gone_while_queued_frees_its_place(server):
    """Waiting streams write keep-alive comments, so a vanished client is noticed before its turn."""
    before = dict(server.engine.stats)
    with paused(server.engine):
        sock = connect(server)
        sock.sendall(post_bytes("/v1/completions", {**GOOD, "stream": True}))
        head = sock.recv(4096)
        assert statuses(head) == [200]
        reset(sock)
        wait_until(lambda: server.engine.stats["cancelled"] > before["cancelled"], what="the cancellation")
        assert server.engine.queue_state()["waiting_rows"] == 0
    assert server.engine.stats["admitted_rows"] == before["admitted_rows"]


def test_item8_a_stream_sends_each_token_in_its_own_chunk(server):
    """Issue 24 item 8: streamed completions arrive one token per chunk (each chunk's logprobs
    hold one token), not --steps-per-run tokens at a time; the text is the greedy reference."""
    reply = server.post("/v1/completions", {**GOOD, "stream": True, "logprobs": 0}, stream=True)
    chunks = []
    for line in reply.iter_lines():  # read as the server sends them
        if line.startswith(b"data: {"):
            chunks.append(json.loads(line[len(b"data: "):])["choices"][0])
    assert [len(c["logprobs"]["tokens"]) for c in chunks] == [1] * GOOD["max_tokens"]
    assert "".join(c["text"] for c in chunks) == GREEDY[0]["new_text"]
    assert server.get("/health").json()["stream_steps_per_run"] == 1


@pytest.mark.parametrize("content_type,status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    (None, 415), ("application/json; charset=latin-1", 415), ("application/json; charset=UTF-8", 200),
    ("Application/JSON", 200),
])
def test_posts_must_be_json(server, content_type, status):
    """Issue 10 item 10: a web page can send text/plain or form POSTs cross-site without asking;
    requiring JSON makes the browser ask first (a CORS preflight this server refuses)."""
    data = json.dumps(GOOD).encode()
    head = ["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}", "Connection: close"]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    reply = raw_request(server.port, ("\r\n".join(head) + "\r\n\r\n").encode() + data)
    assert statuses(reply) == [status]


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:{port}", 403), ("127.0.0.1.evil.example", 403),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("LOCALHOST", 200),
])
def test_host_header_is_checked_on_the_default_server(server, host, status):
    """Issue 10 item 10: DNS rebinding gives a page the server's address under its own name; the
    Host header then names that page's host, and the default server refuses it."""
    head = ["GET /v1/models HTTP/1.1", "Connection: close"]
    if host:
        head.append("Host: " + host.format(port=server.port))
    reply = raw_request(server.port, ("\r\n".join(head) + "\r\n\r\n").encode())
    assert statuses(reply) == [status]
    assert b"Access-Control-Allow-Origin" not in reply


def test_item7_expect_100_continue_gets_413_at_once_for_an_oversize_body(server):
    """Issue 24 item 7: `100 Continue` invites the body; a request refused by its head (413 here)
    gets its answer at once instead, and the connection closes. A request that passes its checks
    gets `100 Continue` and then its answer."""
    head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Expect: 100-continue\r\nContent-Length: %d\r\n\r\n")
    reply = raw_request(server.port, (head % (100 << 20)).encode(), timeout=5)
    assert statuses(reply) == [413] and b"100 Continue" not in reply and b"Connection: close" in reply
    assert b"request_too_large" in reply
    body = json.dumps(GOOD).encode()
    with connect(server) as sock:
        sock.sendall((head % len(body)).encode())
        sock.settimeout(10)
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = read_all(sock)
    assert statuses(reply) == [200, 200] and answer_text(reply) == GREEDY[0]["new_text"]


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n\tb\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\nX-Bare: lf\r\n\r\n",
    b"GET /health HTTP/1.1\nHost: 127.0.0.1\n\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bare: c\rr\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
], ids=["nul", "obs-fold-space", "obs-fold-tab", "bare-lf-header", "bare-lf-everywhere", "bare-lf-end",
        "bare-cr", "space-before-colon", "no-colon"])
def test_item7_malformed_header_lines_are_400(server, head):
    """Issue 24 item 7: header lines holding NUL, obs-fold continuations and bare-LF (or bare-CR)
    line ends are refused with 400 and the connection closes: a proxy in front may read such a head
    differently (request smuggling). A well-formed request on the same server still works."""
    reply = raw_request(server.port, head + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)
    assert statuses(reply) == [400] and b"Connection: close" in reply
    assert b"header line" in reply or b"request line" in reply
    good = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Tab:\ta\tb\r\n"
                                    b"Connection: close\r\n\r\n")
    assert statuses(good) == [200]


def test_item7_http11_needs_one_host_header(server):
    """Issue 24 item 7: RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with two, gets 400;
    HTTP/1.0 may leave Host out."""
    none = raw_request(server.port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert statuses(none) == [400] and b"needs a Host header" in none
    two = raw_request(server.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert statuses(two) == [400] and b"more than one Host" in two
    old = raw_request(server.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert statuses(old) == [200] and json.loads(old.split(b"\r\n\r\n", 1)[1])["data"][0]["id"] == MODEL_ID


def test_no_cors_unless_asked(server):
    reply = raw_request(server.port, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://a.example\r\n"
                                     b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
    assert statuses(reply) == [204] and b"Access-Control-Allow" not in reply


def test_malformed_json_and_strings_are_400s(server):
    """Issue 10 item 9: deeply nested JSON, bytes that are not UTF-8 and a lone surrogate in a
    field name are client errors (not a 500 or a dropped connection); a lone surrogate in a prompt
    is encoded as U+FFFD."""
    deep = server.post("/v1/completions", b"[" * 100_000 + b"]" * 100_000)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    latin1 = server.post("/v1/completions", '{"model": "tiny-model", "prompt": "caf\xe9"}'.encode("latin-1"))
    assert latin1.status_code == 400 and "UTF-8" in latin1.json()["error"]["message"]
    field = server.post("/v1/completions", b'{"model": "tiny-model", "\\ud800x": 1}')
    assert field.status_code == 400 and field.json()["error"]["param"] == "\ud800x"
    lone = server.post("/v1/completions", b'{"model": "tiny-model", "prompt": "Hi \\ud83d", "max_tokens": 5, '
                                          b'"temperature": 0}')
    same = server.post("/v1/completions", {**GOOD, "prompt": "Hi \ufffd", "max_tokens": 5})
    assert lone.status_code == 200 and lone.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
    echo = server.post("/v1/completions",
                       b'{"model": "tiny-model", "prompt": "a\\udfff", "max_tokens": 0, "echo": true}')
    assert echo.status_code == 200 and echo.json()["choices"][0]["text"] == "a\udfff"


def test_a_megabyte_prompt_is_refused_by_its_length(server):
    """Issue 10 item 5: refused as too many bytes for the context, before any BPE."""
    r = server.post("/v1/completions", {"model": MODEL_ID, "prompt": "x" * 1_000_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "bytes" in r.json()["error"]["message"]


def test_without_select_poll(monkeypatch):
    """Windows has no select.poll (and socketserver falls back to select.select): requests that wait,
    streams and vanishing stream clients work there too (they answered 500 before)."""
    import select
    import selectors
    import socketserver

    monkeypatch.delattr(select, "poll", raising=False)
    monkeypatch.delattr(selectors, "PollSelector", raising=False)
    monkeypatch.setattr(socketserver, "_ServerSelector", selectors.SelectSelector)
    windows = Running(limits=Limits(**LIMITS))
    try:
        with paused(windows.engine):
            sock = connect(windows)
            sock.sendall(post_bytes("/v1/completions", GOOD))
            wait_until(lambda: windows.engine.queue_state()["waiting_rows"] == 1)
            time.sleep(0.5)  # waits longer than the old server's 0.2 s poll
        reply = read_all(sock, timeout=30)
        sock.close()
        assert statuses(reply) == [200] and answer_text(reply) == GREEDY[0]["new_text"]
        stream = windows.post("/v1/completions", {**GOOD, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in sse_events(stream.text)) == GREEDY[0]["new_text"]
        before = windows.engine.stats["cancelled"]
        with connect(windows) as gone:
            gone.sendall(post_bytes("/v1/completions", {**GOOD, "max_tokens": 250, "stream": True}))
            gone.recv(4096)
        wait_until(lambda: windows.engine.stats["cancelled"] > before, what="the cancellation")
    finally:
        windows.stop()
