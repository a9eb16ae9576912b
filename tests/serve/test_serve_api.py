"""The application (gpt2.serve.api.App) called directly, without a socket: `handle(Request)` over
the tiny model's engine (answers against the library's greedy tokens) and over a scripted fake
engine (queue full, an engine error in the middle of a stream)."""

import json

import pytest

from gpt2.serve import chat
from gpt2.serve.api import App, Request
from gpt2.serve.engine import QueueFull
from gpt2.serve.protocol import ChoiceText

from serve_support import GREEDY, JSON, MODEL_ID, make_protocol, model_and_encoder, shared_engine, wait_until

MESSAGES = [{"role": "user", "content": "Hello, my name is"}]


def post(path, body, headers=JSON):
    return Request("POST", path, dict(headers), json.dumps(body).encode())


def payloads(events):
    """The JSON payloads of a stream's events (each yielded item one whole event), [DONE] last."""
    events = list(events)
    assert all(e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events) and events[-1] == b"data: [DONE]\n\n"
    return [json.loads(e[len(b"data: "):]) for e in events[:-1] if e.startswith(b"data: ")]


@pytest.fixture(scope="module")
def app():
    return App(shared_engine(), make_protocol(), MODEL_ID, playground=False)


def greedy_chat(max_tokens):
    """The chat's answer made by the library: greedy tokens after the chat template, cut as chat cuts."""
    from gpt2.sampling.api import sample_rows

    model, enc = model_and_encoder()
    [tokens] = sample_rows(model, [enc.encode(chat.render(MESSAGES))], max_tokens, stop_token=enc.eot_token,
                           jit_compile=False, top_k=1)
    choice = ChoiceText(enc, max_tokens, chat.STOPS, trim=True)
    return choice.feed(tokens.tolist()) + choice.end(), choice.finish_reason


def test_a_completion_is_the_reference_greedy_text(app):
    ref = GREEDY[0]
    request = post("/v1/completions", {"model": MODEL_ID, "prompt": ref["prompt_text"], "max_tokens": 20,
                                       "temperature": 0})
    response = app.handle(request)
    assert (response.status, response.content_type, response.events) == (200, "application/json; charset=utf-8",
                                                                         None)
    body = json.loads(response.body)
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [(ref["new_text"], "length")]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
    assert request.note == " 1 rows, 20 tokens"


def test_a_chat_and_its_stream_are_the_librarys_answer(app):
    text, reason = greedy_chat(12)
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    plain = json.loads(app.handle(post("/v1/chat/completions", body)).body)
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"] == {"role": "assistant",
                                                                                      "content": text}
    assert plain["choices"][0]["finish_reason"] == reason

    request = post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    response = app.handle(request)
    assert response.status == 200 and response.body is None and request.note == " 1 rows"  # queued, not yet read
    chunks = payloads(response.events)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == reason
    assert chunks[-1]["usage"] == plain["usage"] and request.note.endswith(", streamed")


def test_closing_a_stream_cancels_its_job(app):
    engine = app.engine
    before = dict(engine.stats)
    response = app.handle(post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 250,
                                                   "temperature": 0, "stream": True}))
    first = next(response.events)
    assert first.startswith(b"data: ") or first.startswith(b":")
    response.events.close()  # what the HTTP layer does when the client went away
    assert engine.stats["cancelled"] == before["cancelled"] + 1
    wait_until(lambda: engine.queue_state()["running_rows"] == 0, timeout=10)
    assert engine.stats["generated_tokens"] - before["generated_tokens"] < 250


@pytest.mark.parametrize("request_, status, code", [
    (Request("GET", "/nowhere"), 404, "not_found"),
    (Request("GET", "/v1/completions"), 405, "method_not_allowed"),
    (post("/tokenize", {"prompt": "Hi"}, {"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    (Request("POST", "/tokenize", JSON, lambda: b'{"prompt": NaN}'), 400, "invalid_json"),
    (post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": -1}), 400, None),
    (post("/v1/completions", {"model": "gpt-5", "prompt": "Hi"}), 404, "model_not_found"),
])
def test_errors_are_json_answers(app, request_, status, code):
    response = app.handle(request_)
    error = json.loads(response.body)["error"]
    assert response.status == status and response.events is None and error["message"]
    assert code is None or error["code"] == code
    if status == 405:
        assert response.headers == {"Allow": "POST, OPTIONS"}


def test_options_and_simple_endpoints(app):
    assert app.handle(Request("OPTIONS", "/v1/chat/completions")).headers == {"Allow": "POST, OPTIONS"}
    tokens = json.loads(app.handle(post("/tokenize", {"prompt": GREEDY[0]["prompt_text"]})).body)["tokens"]
    assert tokens == GREEDY[0]["prompt_ids"]
    health = app.handle(Request("GET", "/health", connections=3))
    assert health.status == 200 and json.loads(health.body)["connections"] == 3


def test_health_says_stopping_while_the_server_drains():
    class Healthy(FakeEngine):
        def health(self):
            return {"status": "ok", "queue": 0}

    app = App(Healthy(), make_protocol(), MODEL_ID, playground=False)
    assert json.loads(app.handle(Request("GET", "/health")).body)["status"] == "ok"
    app.draining = True
    response = app.handle(Request("GET", "/health"))
    assert response.status == 503 and json.loads(response.body)["status"] == "stopping"


class FakeEngine:
    """Answers each job with `script` (events put at once), or raises `refuse` on submit."""

    def __init__(self, script=(), refuse=None):
        self.script, self.refuse, self.cancelled = script, refuse, []

    def submit(self, job):
        if self.refuse:
            raise self.refuse
        for event in self.script:
            job.put(event)

    def cancel(self, job):
        self.cancelled.append(job)


def test_a_full_queue_is_a_503_before_the_stream_begins():
    app = App(FakeEngine(refuse=QueueFull("the queue is full")), make_protocol(), MODEL_ID, playground=False)
    response = app.handle(post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "stream": True}))
    assert (response.status, response.events, response.headers) == (503, None, {"Retry-After": "1"})
    assert json.loads(response.body)["error"]["code"] == "queue_full"


def test_an_engine_error_in_a_stream_is_reported_in_the_stream():
    enc = model_and_encoder()[1]
    ids = enc.encode(" Alice")
    engine = FakeEngine([("tokens", 0, ids, [], False), ("error", 503, "cut short", "shutting_down")])
    app = App(engine, make_protocol(), MODEL_ID, playground=False, heartbeat=0.01)
    response = app.handle(post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 5,
                                                   "stream": True}))
    chunks = payloads(response.events)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" Alice"]
    assert chunks[-1] == {"error": {"message": "cut short", "type": "server_error", "param": None,
                                    "code": "shutting_down"}}
    assert len(engine.cancelled) == 1  # the job is let go, as when its client leaves
