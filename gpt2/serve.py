"""An HTTP server for one GPT-2 model: the familiar `POST /generate` and OpenAI-compatible
completions, with concurrent requests batched into the compiled sampler. Standard library only.

    python -m gpt2.serve --model 124M [--models-dir models] [--host 127.0.0.1] [--port 5000]
    gpt2-serve --model path/to/model-folder --api-key SECRET

Endpoints (JSON in and out; errors are `{"error": {"message", "type", "param", "code"}}`):

* `POST /generate` `{"text", "length"?: 64, "temperature"?: 1, "top_k"?: 0, "top_p"?: 1, "seed"?}`
  -> `{"generated_text": ...}`: the continuation only (not the prompt), ending early at
  <|endoftext|> (not included). "" samples unconditionally. top_k=1 or temperature=0 is greedy.
* `POST /v1/completions`: OpenAI's (legacy) completions. `model` (the served id), `prompt` (string,
  list of strings, token ids or lists of token ids; default <|endoftext|>), `max_tokens` (16),
  `temperature` (1), `top_p` (1), `top_k` (0 = off; an extension), `n` (1), `stop` (up to 4
  strings), `seed`, `echo`, `stream` (server-sent events ending with `data: [DONE]`),
  `stream_options.include_usage`, `user`. `logprobs`, `suffix`, penalties, `logit_bias` and
  `best_of` != n are rejected with 400. Choices are ordered prompt by prompt, n per prompt;
  `finish_reason` is "stop" (<|endoftext|> or a stop string) or "length"; `usage` counts the
  prompt tokens (each prompt once) and the tokens sampled (not <|endoftext|>).
* `GET /v1/models`, `GET /v1/models/{id}`: the one served model.
* `GET /health`: status, queue and batching counters (never needs the API key).

Design: a `ThreadingHTTPServer` thread per connection parses and validates requests, encodes
prompts and decodes text; one worker thread (`gpt2.serve_batching.BatchEngine`) owns the model
and runs batches of rows from concurrent requests through `gpt2.sample.sample_rows`, padded to
bucketed batch sizes so the compiled functions are reused. The model is loaded and the common
shapes compiled before the port starts listening. With a seed, a row's random stream does not
depend on its batch-mates, so a seeded request answers the same batched or alone.

Safety: binds 127.0.0.1 unless --host says otherwise; `--api-key` (or $GPT2_API_KEY) requires
`Authorization: Bearer KEY` on /generate and /v1/*; bodies over --max-body-bytes get 413;
prompt + max_tokens must fit the model's context (400); more than --max-queue waiting requests
get 503 (with Retry-After); a client that disconnects while queued leaves the queue at once,
and one that disconnects mid-stream stops receiving (its rows finish the running batch at most).
"""

import argparse
import hmac
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpt2.serve_api import ApiError, ChoiceText, parse_completions, parse_generate
from gpt2.serve_batching import BatchEngine, Job, QueueFull

log = logging.getLogger("gpt2.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20
POLL_SECONDS = 0.2  # how often a waiting handler checks whether its client is still there


class ClientGone(Exception):
    """The client closed the connection."""


class App:
    """What the request handlers share: the engine, the encoder and the server's settings."""

    def __init__(self, engine, enc, model_id, aliases=(), api_key=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES):
        self.engine = engine
        self.enc = enc
        self.model_id = model_id
        self.model_ids = tuple(dict.fromkeys([model_id, *aliases]))
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.n_ctx = engine.n_ctx
        self.created = int(time.time())

    def model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "local",
                "context_length": self.n_ctx}

    def health(self):
        engine = self.engine
        return {
            "status": "ok",
            "model": self.model_id,
            "context_length": self.n_ctx,
            "max_batch": engine.max_batch,
            "batch_sizes": engine.buckets,
            "queue": engine.queue_state(),
            "stats": dict(engine.stats),
        }


class Server(ThreadingHTTPServer):
    """The HTTP server; `Server(app, host, port, bind_and_activate=False)` binds later (see main)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: bursts of concurrent clients are not refused

    def __init__(self, app, host="127.0.0.1", port=5000, bind_and_activate=True):
        if _is_ipv6(host):
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__((host, port), Handler, bind_and_activate)

    @property
    def port(self):
        return self.server_address[1]


def _is_ipv6(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; SSE responses use chunked encoding
    server_version = "gpt2-serve"
    timeout = 60  # seconds a socket read or write may block (idle keep-alive, slow clients)

    ROUTES = {
        "/health": ("GET", "health"),
        "/v1/models": ("GET", "models"),
        "/generate": ("POST", "generate"),
        "/v1/completions": ("POST", "completions"),
    }

    @property
    def app(self):
        return self.server.app

    # ------------------------------------------------------------------ plumbing

    def version_string(self):
        return self.server_version  # not the Python version

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (malformed request line, 501...) as JSON too."""
        self.close_connection = True
        error = ApiError(code, message or self.responses.get(code, ("error",))[0],
                         type_="invalid_request_error" if code < 500 else "server_error")
        self._send_json(code, error.body())

    def _send_json(self, status, payload, headers=None):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_api_error(self, error):
        if not self._body_read:
            self.close_connection = True  # an unread body would be taken for the next request
        self._send_json(error.status, error.body(), error.headers)

    def _dispatch(self):
        self._responded = False
        self._body_read = self.headers.get("Content-Length") in (None, "0") and not self.headers.get(
            "Transfer-Encoding")
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path.startswith("/v1/models/"):
                method, name = "GET", "model"
            elif path in self.ROUTES:
                method, name = self.ROUTES[path]
            else:
                raise ApiError(404, f"no such endpoint: {self.command} {path}", code="not_found")
            if self.command != method:
                raise ApiError(405, f"{path} accepts {method}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": method})
            if name != "health":
                self._check_auth()
            getattr(self, "_" + name)(path)
        except ApiError as error:
            self._send_api_error(error)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception:  # a bug: answer 500 rather than drop the connection
            log.exception("error handling %s %s", self.command, path)
            self.close_connection = True
            if not self._responded:
                self._send_json(500, ApiError(500, "internal server error", type_="server_error").body())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _check_auth(self):
        key = self.app.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _read_json(self):
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a JSON body with Content-Length is required", code="length_required")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {length!r}") from None
        if length > self.app.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {self.app.max_body_bytes}",
                           code="request_too_large")
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) < length:
            raise ClientGone
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except ValueError as error:
            raise ApiError(400, f"invalid JSON body: {error}", code="invalid_json") from None

    def _client_gone(self):
        """True if the client closed its end (checked without consuming anything)."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _submit(self, plan):
        job = Job(plan.rows, stream=plan.stream)
        try:
            self.app.engine.submit(job)
        except QueueFull as error:
            raise ApiError(503, str(error), code="queue_full", type_="server_error",
                           headers={"Retry-After": "1"}) from None
        except RuntimeError as error:
            raise ApiError(503, str(error), code="shutting_down", type_="server_error") from None
        return job

    def _events(self, job):
        """Yields the job's events; cancels the job if the client goes away meanwhile (checked
        every POLL_SECONDS, whether or not events are flowing)."""
        checked = time.monotonic()
        while True:
            event = job.get(timeout=POLL_SECONDS)
            if event is None or time.monotonic() - checked >= POLL_SECONDS:
                checked = time.monotonic()
                if self._client_gone():
                    self.app.engine.cancel(job)
                    raise ClientGone
            if event is None:
                continue
            if event[0] == "error":
                raise ApiError(500, event[1], code="generation_failed", type_="server_error")
            yield event

    def _choice_texts(self, job, choices):
        """Feeds the job's token events to their choices; yields (choice index, new text) until
        every choice has finished, telling the job which rows are no longer needed."""
        unfinished = len(choices)
        for index, tokens, row_done in self._events(job):
            choice = choices[index]
            if choice.finished:
                continue
            text = choice.feed(tokens)
            if row_done and not choice.finished:
                text += choice.end()
            if choice.finished:
                job.mark_unneeded(index)
                unfinished -= 1
            yield index, text
            if not unfinished:
                return

    def _complete(self, plan):
        """Runs a plan to the end; returns (texts, choices)."""
        job = self._submit(plan)
        choices = [ChoiceText(self.app.enc, row.length, plan.stops) for row in plan.rows]
        texts = [[] for _ in plan.rows]
        try:
            for index, text in self._choice_texts(job, choices):
                texts[index].append(text)
        except BaseException:
            self.app.engine.cancel(job)
            raise
        return ["".join(t) for t in texts], choices

    # ------------------------------------------------------------------ endpoints

    def _health(self, path):
        self._send_json(200, self.app.health())

    def _models(self, path):
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _model(self, path):
        name = urllib.parse.unquote(path[len("/v1/models/"):])
        if name not in self.app.model_ids:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        self._send_json(200, self.app.model_card())

    def _generate(self, path):
        body = self._read_json()
        plan = parse_generate(body, self.app.enc, self.app.n_ctx)
        texts, _ = self._complete(plan)
        self._send_json(200, {"generated_text": texts[0]})

    def _completions(self, path):
        app = self.app
        body = self._read_json()
        plan = parse_completions(body, app.enc, app.n_ctx, app.model_ids)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": app.model_id}
        if plan.stream:
            self._stream_completions(plan, head)
            return
        texts, choices = self._complete(plan)
        prefix = [plan.prompt_texts[i // plan.n] if plan.echo else "" for i in range(len(texts))]
        self._send_json(200, {
            **head,
            "choices": [{"text": prefix[i] + text, "index": i, "logprobs": None,
                         "finish_reason": choices[i].finish_reason} for i, text in enumerate(texts)],
            "usage": _usage(plan, choices),
        })

    def _stream_completions(self, plan, head):
        job = self._submit(plan)
        choices = [ChoiceText(self.app.enc, row.length, plan.stops) for row in plan.rows]
        try:
            chunked = self.request_version != "HTTP/1.0"  # else: no length, the close ends the body
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Accel-Buffering", "no")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            self._responded = True

            def send(payload):
                data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(
                    payload, ensure_ascii=False).encode("utf-8")) + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

            def chunk(index, text, finish_reason=None):
                send({**head, "choices": [{"text": text, "index": index, "logprobs": None,
                                           "finish_reason": finish_reason}]})

            if plan.echo:
                for i in range(len(choices)):
                    chunk(i, plan.prompt_texts[i // plan.n])
            try:
                for index, text in self._choice_texts(job, choices):
                    if text or choices[index].finished:
                        chunk(index, text, choices[index].finish_reason)
            except ApiError as error:  # the status line is gone: report in the stream
                send(error.body())
            else:
                if plan.include_usage:
                    send({**head, "choices": [], "usage": _usage(plan, choices)})
            send(b"[DONE]")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout, ClientGone):
            self.app.engine.cancel(job)
            self.close_connection = True
        except BaseException:
            self.app.engine.cancel(job)
            raise


def _usage(plan, choices):
    prompt_tokens = sum(plan.prompt_lengths)
    completion_tokens = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------- assembly and CLI


def start_in_thread(server):
    """Runs `server.serve_forever()` on a daemon thread (for tests and embedding); returns it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="gpt2-serve-http", daemon=True)
    thread.start()
    return thread


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _lengths(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    return values


def build_parser():
    parser = argparse.ArgumentParser(
        prog="gpt2-serve",
        description="Serve a GPT-2 model over HTTP: POST /generate, OpenAI-compatible /v1/completions "
                    "and /v1/models, GET /health.",
    )
    parser.add_argument("--model", required=True, help="model name under --models-dir (124M, ...) or a model folder")
    parser.add_argument("--models-dir", default="models", help="folder holding downloaded models (default: models)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 = all interfaces)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: 5000; 0 = any free port)")
    parser.add_argument("--api-key", default=os.environ.get("GPT2_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $GPT2_API_KEY; unset = no key)")
    parser.add_argument("--model-id", help="model id in /v1/models and responses (default: the model's folder name)")
    parser.add_argument("--max-batch", type=_positive_int, default=8,
                        help="rows per sampler call; 1 = one at a time (default: 8)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long to collect concurrent requests into a batch (default: 10)")
    parser.add_argument("--max-queue", type=_positive_int, default=64,
                        help="waiting requests allowed before answering 503 (default: 64)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--warmup-lengths", type=_lengths, default=[16, 64],
                        help="compile, before opening the port, the shapes that prompts of <= 32 tokens "
                             "with these many new tokens use (default: 16,64 = the max_tokens and length "
                             "defaults)")
    parser.add_argument("--warmup-all-sizes", action="store_true",
                        help="compile every batch size (1, 2, 4, ..., max) rather than 1 and max only")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    parser.add_argument("--no-xla", action="store_true",
                        help="compile without XLA: much faster start-up, slower generation")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from encoder import encoder_for_model_dir
    from gpt2.checkpoint import CheckpointError, load_model, resolve_model_dir

    try:
        model_dir = resolve_model_dir(args.model, args.models_dir)
        model = load_model(model_dir)
        enc = encoder_for_model_dir(model_dir)
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
    folder_name = os.path.basename(os.path.normpath(model_dir))
    model_id = args.model_id or folder_name
    engine = BatchEngine(model, max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000,
                         max_queue=args.max_queue, stop_token=enc.eot_token, jit_compile=not args.no_xla)
    app = App(engine, enc, model_id, aliases=(args.model, folder_name), api_key=args.api_key,
              max_body_bytes=args.max_body_bytes)
    try:  # claim the address first, so a taken port fails now rather than after the warm-up
        server = Server(app, args.host, args.port, bind_and_activate=False)
        server.server_bind()
    except OSError as error:
        sys.exit(f"error: cannot bind {args.host}:{args.port}: {error}")
    if not args.no_warmup:
        start = time.perf_counter()
        sizes = engine.buckets if args.warmup_all_sizes else sorted({1, args.max_batch})
        log.info("compiling the sampler for batch sizes %s ...", ", ".join(map(str, sizes)))
        engine.warm_up(args.warmup_lengths, batches=sizes)
        log.info("warm-up done in %.1f s", time.perf_counter() - start)
    engine.start()
    server.server_activate()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not app.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use it", args.host)
    host = f"[{args.host}]" if _is_ipv6(args.host) else args.host
    print(f"gpt2-serve: serving {model_id} on http://{host}:{server.port} "
          f"(max batch {args.max_batch}, queue {args.max_queue})", flush=True)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop(timeout=5)
        log.info("stopped")


if __name__ == "__main__":
    main()
