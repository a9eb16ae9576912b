"""The application (TensorFlow-free): `App.handle(Request) -> Response` answers one request of the
API; gpt2.serve.httpd carries requests to it and its responses back (tests call it directly).

Each route in App.ROUTES names a `_<name>(request)` method. Requests are parsed by the Protocol
into plans, generation goes through the engine (a Job per request), and the answers are put
together by gpt2.serve.answers. Streams are server-sent events, a Response whose `events` yield
each event's bytes: one `data:` JSON chunk per piece of text, a comment after `heartbeat` seconds
without one, and `data: [DONE]`. Their job is queued before the Response is returned (the HTTP
layer sends the head at once); closing the events early (the client went away) cancels it.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
import urllib.parse
import uuid

from gpt2.sampling.settings import shown
from gpt2.serve import answers
from gpt2.serve.engine import Job, QueueFull, Unavailable
from gpt2.serve.protocol import ApiError

log = logging.getLogger("gpt2.serve")

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}


def clean(text, limit=300):
    """`text` for a log line or an error message: control characters escaped, at most `limit` characters."""
    text = str(text).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "..."


def json_bytes(payload):
    """UTF-8 JSON, strict: never NaN or Infinity, which are not JSON (browsers' and Go's parsers
    refuse them); a non-finite number that got this far becomes null, with a warning. Lone
    surrogates (valid in JSON escapes, so in parsed strings) go back out as \\uXXXX escapes."""
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except ValueError:
        log.warning("a non-finite number in an answer was written as null")
        text = json.dumps(_finite(payload), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "backslashreplace")


def _finite(value):
    """`value` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


@dataclasses.dataclass
class Request:
    """A request as the application sees it. path: without the query and a trailing slash.
    headers: a mapping (http.server's ignores case; a dict needs the canonical spelling). body:
    its bytes, or a callable reading them (the HTTP layer's, with its size limit and deadline).
    connections: the server's open connections (for /health). note: what the application adds to
    the request's access log line."""

    method: str
    path: str
    headers: object = dataclasses.field(default_factory=dict)
    body: object = b""
    connections: int = None
    note: str = ""

    def json(self):
        """The body parsed as JSON (ApiError 415 unless sent as UTF-8 JSON, 400 if not valid)."""
        media, _, params = (self.headers.get("Content-Type") or "").partition(";")
        charset = re.search(r"charset\s*=\s*\"?([^\s;\"]+)", params, re.IGNORECASE)
        utf8 = charset is None or charset.group(1).lower() in ("utf-8", "utf8")
        if media.strip().lower() != "application/json" or not utf8:
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")
        data = self.body() if callable(self.body) else self.body
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not valid UTF-8", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        except ValueError as error:
            raise ApiError(400, f"invalid JSON body: {clean(error, 200)}", code="invalid_json") from None


@dataclasses.dataclass
class Response:
    """An answer: status and headers, then a `body` (bytes of `content_type`; None: no body), or
    `events`, an iterator of server-sent events' bytes that the HTTP layer closes when it stops."""

    status: int
    headers: dict = dataclasses.field(default_factory=dict)
    body: bytes = None
    content_type: str = None
    events: object = None


def json_response(status, payload, headers=None):
    return Response(status, dict(headers or {}), json_bytes(payload), "application/json; charset=utf-8")


def error_response(error):
    """An ApiError's answer: {"error": {message, type, param, code}} with its status and headers."""
    return json_response(error.status, error.body(), error.headers)


def _sse(payload):
    """One server-sent `data:` event of `payload` (JSON, or bytes as they are)."""
    return b"data: " + (payload if isinstance(payload, bytes) else json_bytes(payload)) + b"\n\n"


class App:
    """The endpoints of one model: its engine and Protocol, `model_id` (the name reported).

    playground: serve the page at /. heartbeat: seconds a stream waits for text before it sends a
    comment. draining: set while the server stops (/health says so; httpd refuses new work).
    """

    ROUTES = {"/": ("GET", "playground"), "/health": ("GET", "health"), "/v1/models": ("GET", "models"),
              "/generate": ("POST", "generate"), "/v1/completions": ("POST", "completions"),
              "/v1/chat/completions": ("POST", "chat"), "/tokenize": ("POST", "tokenize"),
              "/detokenize": ("POST", "detokenize"), "/tokenizer_info": ("GET", "tokenizer_info")}
    OPEN = ("playground", "health")  # answered without the API key

    def __init__(self, engine, protocol, model_id, playground=True, heartbeat=2.0):
        self.engine = engine
        self.protocol = protocol
        self.enc = protocol.enc
        self.model_id = model_id
        self.playground = None
        if playground:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "playground.html"), "rb") as f:
                self.playground = f.read()
        self.heartbeat = heartbeat
        self.created = int(time.time())
        self.draining = False

    def model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "local",
                "context_length": self.protocol.n_ctx, "max_tokens_limit": self.protocol.max_tokens_limit}

    def health(self, connections=None):
        engine = self.engine.health()
        status = engine.pop("status")  # popped either way: the engine's own word must not overwrite "stopping"
        status = "stopping" if self.draining else status
        return {"status": status, "model": self.model_id, "context_length": self.protocol.n_ctx,
                "connections": connections, **engine}

    def endpoint(self, method, path):
        """(name, method) of the endpoint at `path`, which `method` (or OPTIONS) may call; ApiError 404 or 405."""
        if path.startswith("/v1/models/"):
            allowed, name = "GET", "model"
        elif path in self.ROUTES:
            allowed, name = self.ROUTES[path]
        else:
            raise ApiError(404, f"no such endpoint: {clean(method, 20)} {clean(path, 100)}", code="not_found")
        if method not in (allowed, "OPTIONS"):
            raise ApiError(405, f"{path} accepts {allowed}, not {clean(method, 20)}",
                           code="method_not_allowed", headers={"Allow": f"{allowed}, OPTIONS"})
        return name, allowed

    def handle(self, request):
        """The Response to `request`; an ApiError is answered as JSON (OPTIONS: 204, what is allowed)."""
        try:
            name, allowed = self.endpoint(request.method, request.path)
            if request.method == "OPTIONS":
                return Response(204, {"Allow": f"{allowed}, OPTIONS"})
            return getattr(self, "_" + name)(request)
        except ApiError as error:
            return error_response(error)

    # ------------------------------------------------------------------ simple endpoints

    def _playground(self, request):
        if self.playground is None:
            raise ApiError(404, "the playground is off (--no-playground)", code="not_found")
        return Response(200, {
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Cache-Control": "no-cache",
        }, self.playground, "text/html; charset=utf-8")

    def _health(self, request):
        health = self.health(request.connections)
        return json_response(200 if health["status"] == "ok" else 503, health)

    def _models(self, request):
        return json_response(200, {"object": "list", "data": [self.model_card()]})

    def _model(self, request):
        name = urllib.parse.unquote(request.path[len("/v1/models/"):])
        if name not in self.protocol.model_ids:
            raise ApiError(404, f"the model {shown(name)} does not exist", "model", "model_not_found")
        return json_response(200, self.model_card())

    # ------------------------------------------------------------------ tokenizer (vLLM's endpoints)

    def _tokenize(self, request):
        tokens = self.protocol.parse_tokenize(request.json())
        return json_response(200, {"tokens": tokens, "count": len(tokens), "max_model_len": self.protocol.n_ctx})

    def _detokenize(self, request):
        tokens = self.protocol.parse_detokenize(request.json())
        return json_response(200, {"prompt": self.enc.decode(tokens)})

    def _tokenizer_info(self, request):
        eot = self.enc.decode([self.enc.eot_token])
        pad, unk = (getattr(self.enc, name, None) for name in ("pad_token", "unk_token"))  # WordPiece's
        return json_response(200, {"tokenizer_class": "BertTokenizer" if pad is not None else "GPT2Tokenizer",
                                   "eos_token": eot, "bos_token": eot,
                                   "unk_token": eot if unk is None else self.enc.tokens[unk],
                                   "pad_token": None if pad is None else self.enc.tokens[pad],
                                   "model_max_length": self.protocol.n_ctx,
                                   "vocab_size": self.protocol.n_vocab})

    # ------------------------------------------------------------------ generation

    def _submit(self, request, plan):
        job = Job(plan.rows, stream=plan.stream, seeded=plan.seeded)
        try:
            self.engine.submit(job)
        except QueueFull as error:
            raise ApiError(503, str(error), code="queue_full", type_="server_error",
                           headers={"Retry-After": "1"}) from None
        except Unavailable as error:
            raise ApiError(503, str(error), code=error.code, type_="server_error") from None
        request.note = f" {len(plan.rows)} rows"
        return job

    @contextlib.contextmanager
    def _cancelling(self, job):
        """Cancels `job` (if any) when the block fails or is left early (a stream's events closed)."""
        try:
            yield
        except BaseException:
            if job is not None:
                self.engine.cancel(job)
            raise

    def _noted(self, request, plan, answer):
        request.note = f" {len(plan.rows)} rows, {sum(c.tokens for c in answer.choices)} tokens"
        if "X-Chat-History" in plan.headers:
            request.note += f" (chat history: {plan.headers['X-Chat-History']})"

    def _complete(self, request, plan):
        """Submits the plan's rows and reads their whole answer (an answers.Answer)."""
        job = self._submit(request, plan)
        answer = answers.Answer(plan, self.enc)
        with self._cancelling(job):
            for _ in answer.follow(job):
                pass
        self._noted(request, plan, answer)
        return answer

    def _generate(self, request):
        plan = self.protocol.parse_generate(request.json())
        return json_response(200, {"generated_text": "".join(self._complete(request, plan).texts[0])})

    def _completions(self, request):
        plan = self.protocol.parse_completions(request.json())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id}
        # echo + logprobs: each prompt's scores (first token null)
        scores = self.engine.score(plan.prompt_tokens) if plan.echo and plan.logprobs is not None else None
        if plan.stream:
            return self._stream(request, plan, head, scores)
        answer = self._complete(request, plan) if plan.rows else None
        out = []
        for i in range(len(plan.prompt_tokens) * plan.n):
            prompt = i // plan.n
            text, ids, infos, finish_reason = "", [], [], "length"
            if answer:
                text, ids, infos = "".join(answer.texts[i]), answer.choices[i].ids, answer.infos[i]
                finish_reason = answer.choices[i].finish_reason
            out.append({"text": (plan.prompt_texts[prompt] if plan.echo else "") + text, "index": i,
                        "logprobs": answers.completion_logprobs(self.enc, plan, prompt, ids, infos, scores),
                        "finish_reason": finish_reason})
        return json_response(200, {**head, "choices": out, "usage": answers.usage(plan, answer.choices if answer
                                                                                   else [])})

    def _chat(self, request):
        plan = self.protocol.parse_chat(request.json())
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id, "system_fingerprint": None}
        if plan.stream:
            return self._stream(request, plan, {**head, "object": "chat.completion.chunk"}, None)
        answer = self._complete(request, plan)
        return json_response(200, {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(answer.texts[i])},
             "logprobs": answers.chat_logprobs(self.enc, plan, c.ids, answer.infos[i]),
             "finish_reason": c.finish_reason}
            for i, c in enumerate(answer.choices)], "usage": answers.usage(plan, answer.choices)}, plan.headers)

    # ------------------------------------------------------------------ streams

    def _stream(self, request, plan, head, scores):
        """The Response of a stream; its job is queued first (a full queue is still a plain 503)."""
        job = self._submit(request, plan) if plan.rows else None
        events = self._events(request, plan, head, scores, job)
        next(events)  # to its first yield, inside _cancelling: from now on closing the events cancels the job
        return Response(200, dict(plan.headers), events=events)

    def _events(self, request, plan, head, scores, job):
        """Server-sent events: one `data:` JSON chunk per piece of text, `data: [DONE]` at the end."""
        chat, rows, choices = plan.kind == "chat", len(plan.prompt_tokens) * plan.n, []
        offsets = [len(plan.prompt_texts[i // plan.n]) for i in range(rows)]  # text_offset of each choice's next token

        def chunk(index, text, finish_reason, ids, infos):
            if chat:
                logprobs = answers.chat_logprobs(self.enc, plan, ids, infos) if ids else None
                return _sse({**head, "choices": [{"index": index, "delta": {"content": text} if text else {},
                                                  "logprobs": logprobs, "finish_reason": finish_reason}]})
            logprobs = answers.completion_logprobs(self.enc, plan, index // plan.n, ids, infos, offset=offsets[index])
            if logprobs and logprobs["tokens"]:
                offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            return _sse({**head, "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                              "finish_reason": finish_reason}]})

        try:
            with self._cancelling(job):
                yield b""  # taken by _stream
                for i in range(rows):
                    prompt = i // plan.n
                    if chat:
                        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                    elif plan.echo:
                        logprobs = answers.completion_logprobs(self.enc, plan, prompt, [], [], scores)
                        yield _sse({**head, "choices": [{"text": plan.prompt_texts[prompt], "index": i,
                                                         "logprobs": logprobs,
                                                         "finish_reason": None if plan.rows else "length"}]})
                if job is not None:
                    answer = answers.Answer(plan, self.enc)
                    for piece in answer.follow(job, self.heartbeat):
                        if piece is None:
                            yield b": keep-alive\n\n"
                            continue
                        index, text, ids, infos = piece
                        reason = answer.choices[index].finish_reason
                        if text or reason or (plan.logprobs is not None and ids):
                            yield chunk(index, text, reason, ids, infos)
                    choices = answer.choices
                    self._noted(request, plan, answer)
                    request.note += ", streamed"
        except ApiError as error:  # the head is gone: report in the stream
            yield _sse(error.body())
        if plan.include_usage:
            yield _sse({**head, "choices": [], "usage": answers.usage(plan, choices)})
        yield _sse(b"[DONE]")
