"""The API's endpoints (TensorFlow-free): a mixin of gpt2.serve.httpd.Handler, which supplies the
HTTP plumbing (`_read_json`, `_send_json`, `_cors`, the connection's files and state).

Each route in ROUTES names a `_<name>(path)` method here. Requests are parsed by the App's
Protocol into plans, generation goes through the engine (a Job per request), and the answers are
put together by gpt2.serve.answers. Streams are server-sent events: their headers go out as soon
as the request is queued, then one `data:` JSON chunk per piece of text, comments while nothing
comes, and `data: [DONE]`.
"""

import json
import logging
import math
import time
import urllib.parse
import uuid

from gpt2.sampling.settings import shown
from gpt2.serve import answers
from gpt2.serve.engine import Job, QueueFull, Unavailable
from gpt2.serve.protocol import ApiError

log = logging.getLogger("gpt2.serve")


class ClientGone(Exception):
    """The client went away (or was too slow); the message says how."""


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


class Endpoints:
    """The endpoints; see ROUTES."""

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
            raise ApiError(404, f"the model {shown(name)} does not exist", "model", "model_not_found")
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

    def _generate(self, path):
        plan = self.app.protocol.parse_generate(self._read_json())
        texts = [[] for _ in plan.rows]
        self._follow(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        self._send_json(200, {"generated_text": "".join(texts[0])})

    def _follow(self, plan, job, emit, heartbeat=None):
        """answers.follow for this request (cancels the job if anything fails)."""
        choices, infos = answers.follow(job, plan, self.app.enc, emit, lambda: self.app.engine.cancel(job),
                                        heartbeat, self.app.limits.heartbeat if heartbeat else 1.0)
        self._note = f" {len(plan.rows)} rows, {sum(c.tokens for c in choices)} tokens"
        if "X-Chat-History" in plan.headers:
            self._note += f" (chat history: {plan.headers['X-Chat-History']})"
        return choices, infos

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
            choices, infos = self._follow(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        out = []
        for i in range(rows):
            prompt = i // plan.n
            echo = plan.prompt_texts[prompt] if plan.echo else ""
            text = echo + "".join(texts[i])
            logprobs = None
            if plan.logprobs is not None:
                logprobs = answers.completion_logprobs(self.app.enc, plan, prompt, choices[i].ids if choices else [],
                                                       infos[i] if infos else [], scores)
            out.append({"text": text, "index": i, "logprobs": logprobs,
                        "finish_reason": choices[i].finish_reason if choices else "length"})
        self._send_json(200, {**head, "choices": out, "usage": answers.usage(plan, choices)})

    def _chat(self, path):
        plan = self.app.protocol.parse_chat(self._read_json())
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.app.model_id, "system_fingerprint": None}
        if plan.stream:
            self._stream(plan, {**head, "object": "chat.completion.chunk"}, None)
            return
        texts = [[] for _ in plan.rows]
        choices, infos = self._follow(plan, self._submit(plan), lambda i, text, *_: texts[i].append(text))
        self._send_json(200, {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
             "logprobs": answers.chat_logprobs(self.app.enc, plan, c.ids, infos[i]) if plan.logprobs is not None
             else None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], "usage": answers.usage(plan, choices)}, plan.headers)

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
            for name, value in {**self._cors(), **plan.headers}.items():
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
            write(b"data: " + (payload if isinstance(payload, bytes) else json_bytes(payload)) + b"\n\n")

        rows = len(plan.prompt_tokens) * plan.n
        sent = [0] * rows  # tokens of each choice already sent (with their logprobs)
        offsets = [None] * rows  # text_offset of each choice's next token
        choices = []

        def chunk(index, text, finish_reason=None, ids=(), infos=()):
            if chat:
                logprobs = answers.chat_logprobs(self.app.enc, plan, ids, infos) if plan.logprobs is not None and ids else None
                send({**head, "choices": [{"index": index, "delta": {"content": text} if text else {},
                                           "logprobs": logprobs, "finish_reason": finish_reason}]})
                return
            logprobs = None
            if plan.logprobs is not None:
                logprobs = answers.completion_logprobs(self.app.enc, plan, index // plan.n, ids, infos,
                                                       offset=offsets[index])
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
                    logprobs = (answers.completion_logprobs(self.app.enc, plan, prompt, [], [], scores)
                                if scores is not None else None)
                    send({**head, "choices": [{"text": plan.prompt_texts[prompt], "index": i, "logprobs": logprobs,
                                               "finish_reason": None if plan.rows else "length"}]})
            if job is not None:
                choices, _ = self._follow(plan, job, emit, heartbeat=lambda: write(b": keep-alive\n\n"))
                self._note += ", streamed"
        except ApiError as error:  # the status line is gone: report in the stream
            send(error.body())
        except BaseException:
            if job is not None:
                self.app.engine.cancel(job)
            raise
        if plan.include_usage:
            send({**head, "choices": [], "usage": answers.usage(plan, choices)})
        send(b"[DONE]")
        if chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk
            except OSError as error:
                raise ClientGone(f"{type(error).__name__} while streaming") from None
