"""The HTTP API (gpt2.serve) over real HTTP with the tiny fixture model: /generate, OpenAI's
completions and chat completions with the official `openai` client and the raw request shapes
other clients send, log-probabilities and echo against gpt2.score, errors, auth, CORS, the queue,
and continuous batching seen from outside."""

import json
import logging
import math
import socket

import numpy as np
import pytest

from gpt2.serve import chat
from gpt2.serve.protocol import ChoiceText

from serve_support import (
    GREEDY,
    JSON,
    MODEL_ID,
    Running,
    in_threads,
    join,
    model_and_encoder,
    paused,
    post_bytes,
    raw_request,
    sse_events,
    statuses,
    wait_until,
)

openai = pytest.importorskip("openai")  # the official client: in the `test` extra


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(text):
    """json.loads as strict as browsers' and Go's parsers: NaN and Infinity are refused."""
    return json.loads(text, parse_constant=_refuse_constant)


def strict_body(r):
    """A response's JSON body or server-sent events, parsed strictly (item 4)."""
    if r.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [e for e in r.content.decode().split("\n\n") if e.startswith("data: ")]
        return [strict_json(e[len("data: "):]) for e in events if e != "data: [DONE]"]
    return strict_json(r.content.decode())


class StrictRunning(Running):
    """Running, whose every JSON answer (not read as a stream by the test) is parsed strictly."""

    def post(self, path, body, headers=None, **kwargs):
        r = super().post(path, body, headers, **kwargs)
        if not kwargs.get("stream"):
            strict_body(r)
        return r

    def get(self, path, **kwargs):
        r = super().get(path, **kwargs)
        if r.headers.get("Content-Type", "").startswith("application/json"):
            strict_body(r)
        return r


@pytest.fixture(scope="module")
def server():
    running = StrictRunning()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def enc():
    return model_and_encoder()[1]


def library_tokens(prompt_tokens, length, seed=None, **settings):
    """The library's answer (gpt2.sampling) for one row: its new tokens, stopping at <|endoftext|>."""
    from gpt2.sampling.api import sample_rows
    from gpt2.sampling.settings import row_seeds

    model, enc = model_and_encoder()
    [tokens] = sample_rows(model, [prompt_tokens], length, seeds=row_seeds(seed, 1), stop_token=enc.eot_token,
                           jit_compile=False, **settings)
    return tokens.tolist()


def text_of(enc, tokens, max_tokens, stops=(), trim=False):
    choice = ChoiceText(enc, max_tokens, stops, trim)
    return choice.feed(tokens) + choice.end(), choice.finish_reason


# ----------------------------------------------------------------------------- /generate

@pytest.mark.parametrize("case", range(len(GREEDY)))
def test_generate_top_k_1_gives_the_reference_greedy_text(server, case):
    ref = GREEDY[case]
    r = server.post("/generate", {"text": ref["prompt_text"], "length": 20, "top_k": 1})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"generated_text": ref["new_text"]}


def test_seeded_answers_are_the_librarys(server, enc):
    ref = GREEDY[0]
    assert server.post("/generate", {"text": ref["prompt_text"], "length": 20, "temperature": 0}).json() == {
        "generated_text": ref["new_text"]}
    body = {"text": ref["prompt_text"], "length": 20, "temperature": 1.0, "top_k": 40, "seed": 1234}
    first = server.post("/generate", body).json()["generated_text"]
    assert server.post("/generate", body).json()["generated_text"] == first
    assert server.post("/generate", {**body, "seed": 99}).json()["generated_text"] != first
    tokens = library_tokens(enc.encode(ref["prompt_text"]), 20, 1234, temperature=1.0, top_k=40)
    assert first == text_of(enc, tokens, 20)[0]


# ----------------------------------------------------------------------------- completions

def test_openai_client_completion_and_stream(server):
    client = server.client()
    ref = GREEDY[0]
    done = client.completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=20, temperature=0)
    assert done.object == "text_completion" and done.model == MODEL_ID and done.id
    assert [c.text for c in done.choices] == [ref["new_text"]]
    assert done.choices[0].finish_reason == "length" and done.choices[0].index == 0
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 20, 25)
    chunks = list(client.completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == ref["new_text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 5


def test_raw_stream_is_server_sent_events(server):
    r = server.post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 3, "stream": True},
                    stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(r.content.decode())
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_to_an_http_1_0_client_is_not_chunked(server):
    reply = raw_request(server.port, post_bytes("/v1/completions", {
        "model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20, "temperature": 0, "stream": True},
        version="HTTP/1.0")).decode()
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "chunked" not in head.lower() and "Connection: close" in head
    assert "".join(e["choices"][0]["text"] for e in sse_events(body)) == GREEDY[0]["new_text"]


def test_list_prompts_token_prompts_n_and_echo(server):
    client = server.client()
    prompts = [GREEDY[0]["prompt_text"], GREEDY[1]["prompt_text"]]
    out = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=20, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [GREEDY[0]["new_text"]] * 2 + [GREEDY[1]["new_text"]] * 2
    assert out.usage.prompt_tokens == len(GREEDY[0]["prompt_ids"]) + len(GREEDY[1]["prompt_ids"])
    assert out.usage.completion_tokens == 80
    ids = client.completions.create(model=MODEL_ID, prompt=GREEDY[2]["prompt_ids"], max_tokens=20, temperature=0)
    assert ids.choices[0].text == GREEDY[2]["new_text"]
    echo = client.completions.create(model=MODEL_ID, prompt=prompts[0], max_tokens=20, temperature=0, echo=True)
    assert echo.choices[0].text == GREEDY[0]["full_text"]


def test_stop_strings_top_p_0_and_empty_stop(server):
    client = server.client()
    ref = GREEDY[0]  # " Logic" "zz" " Lys" " Lys" " Sid" ...
    out = client.completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=20, temperature=0,
                                    stop=["Lys", "never"])
    assert out.choices[0].text == " Logiczz " and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 3
    chunks = list(client.completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=20, temperature=0,
                                            stop="zz Ly", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " Logic" and chunks[-1].choices[0].finish_reason == "stop"
    top = client.completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=20, top_p=0, seed=3,
                                    stop="")
    assert top.choices[0].text == ref["new_text"]  # top_p 0 keeps the most likely token; stop "" is no stop


def test_generation_runs_past_the_context(server, enc):
    out = server.post("/v1/completions", {"model": MODEL_ID, "prompt": GREEDY[1]["prompt_text"], "max_tokens": 100,
                                          "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] == 100  # the tiny model's context is 64 tokens
    tokens = library_tokens(enc.encode(GREEDY[1]["prompt_text"]), 100, temperature=0)
    assert out["choices"][0]["text"] == text_of(enc, tokens, 100)[0]


def test_penalties_and_logit_bias(server, enc):
    forced = enc.encode(" yes")[0]
    out = server.post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 4, "temperature": 0,
                                          "logit_bias": {str(forced): 100}}).json()
    assert out["choices"][0]["text"] == " yes" * 4
    body = {"model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20, "temperature": 0,
            "presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "top_k": 5}
    text = server.post("/v1/completions", body).json()["choices"][0]["text"]
    tokens = library_tokens(enc.encode(GREEDY[0]["prompt_text"]), 20, temperature=0, presence_penalty=1.5,
                            frequency_penalty=0.5, repetition_penalty=1.3, top_k=5)
    assert text == text_of(enc, tokens, 20)[0] and text != GREEDY[0]["new_text"]


def test_a_huge_top_k_does_not_fail_other_requests(server):
    """Issue 10 item 1: top_k = 2**63 or 1e300 in one request while others run: every request is
    answered (top_k that large is off), and the others are unaffected."""
    good = {"model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20, "temperature": 0}
    with paused(server.engine):
        threads, results = in_threads([
            lambda: server.post("/v1/completions", good),
            lambda: server.post("/v1/completions", {**good, "top_k": 2 ** 63, "temperature": 1, "seed": 1}),
            lambda: server.post("/v1/completions", {**good, "top_k": 1e300, "temperature": 1, "seed": 1}),
            lambda: server.post("/v1/completions", {**good, "top_k": -5}),
        ])
        wait_until(lambda: server.engine.queue_state()["waiting_rows"] == 3)
    first, huge, huger, bad = join(threads, results)
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == GREEDY[0]["new_text"]
    assert huge.status_code == huger.status_code == 200
    assert huge.json()["choices"][0]["text"] == huger.json()["choices"][0]["text"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"


def test_item4_settings_that_broke_float32_are_400s_and_every_answer_is_strict_json(server):
    """Issue 24 item 4: {"repetition_penalty": 1e-300, "logprobs": 2} answered 200 with NaN and
    -Infinity in the JSON. Out-of-range floats are 400s; the accepted extremes, with logprobs,
    echo and streams, answer JSON that a strict parser reads, every number finite."""
    base = {"model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 6, "seed": 3}
    for bad in ({"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300}, {"temperature": 1e300},
                {"temperature": 10**400}, {"presence_penalty": 2.5}):
        r = server.post("/v1/completions", {**base, **bad, "logprobs": 2})
        assert r.status_code == 400 and strict_body(r)["error"]["param"] == next(iter(bad)), r.text
    extremes = [{"repetition_penalty": 0.01}, {"repetition_penalty": 100}, {"temperature": 100},
                {"temperature": 1e-30}, {"presence_penalty": -2, "frequency_penalty": -2, "logit_bias": {"11": 100}},
                {"presence_penalty": 2, "frequency_penalty": 2, "logit_bias": {str(t): -100 for t in range(300)}},
                {"top_p": 0, "top_k": 1, "repetition_penalty": 0.01, "temperature": 100}]

    def numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, float) else []

    for settings in extremes:
        for extra in ({"logprobs": 5}, {"logprobs": 5, "echo": True}, {"logprobs": 5, "stream": True}):
            r = server.post("/v1/completions", {**base, **settings, **extra})
            assert r.status_code == 200, r.text
            answer = strict_body(r)
            assert numbers(answer) and all(math.isfinite(n) for n in numbers(answer))
        r = server.post("/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "seed": 1,
                                                 "logprobs": True, "top_logprobs": 5, **settings})
        assert r.status_code == 200 and all(math.isfinite(n) for n in numbers(strict_body(r)))


def test_item4_a_non_finite_number_is_never_written():
    """The last guard: an answer holding NaN or infinity (a bug or broken weights) goes out as
    strict JSON with null there; logprobs that are -inf (probability 0) are OpenAI's -9999."""
    from gpt2.serve import answers
    from gpt2.serve.api import json_bytes

    assert strict_json(json_bytes({"a": [1.5, float("nan")], "b": {"c": float("-inf")}, "d": "x"}).decode()) == {
        "a": [1.5, None], "b": {"c": None}, "d": "x"}
    assert answers.finite_logprob(np.float32("-inf")) == -9999.0 and answers.finite_logprob(-1.5) == -1.5


# ----------------------------------------------------------------------------- logprobs and echo

def score(tokens):
    import gpt2

    model, _ = model_and_encoder()
    return gpt2.score(model, [tokens], top_k=5, jit_compile=False)[0]


def test_logprobs_of_sampled_tokens(server, enc):
    ref = GREEDY[0]
    out = server.post("/v1/completions", {"model": MODEL_ID, "prompt": ref["prompt_text"], "max_tokens": 6,
                                          "temperature": 0, "logprobs": 3}).json()["choices"][0]
    logprobs = out["logprobs"]
    new_ids = ref["new_ids"][:6]
    assert logprobs["tokens"] == [enc.decode([t]) for t in new_ids]
    assert "".join(logprobs["tokens"]) == out["text"]
    start = len(ref["prompt_text"])  # OpenAI's offsets count from the start of the prompt
    assert logprobs["text_offset"] == [start + sum(map(len, logprobs["tokens"][:i])) for i in range(6)]
    expected = score(ref["prompt_ids"] + new_ids)
    n = len(ref["prompt_ids"])
    np.testing.assert_allclose(logprobs["token_logprobs"], expected.logprobs[n - 1:], atol=1e-4)
    for top, ids, values in zip(logprobs["top_logprobs"], expected.top_ids[n - 1:], expected.top_logprobs[n - 1:]):
        assert len(top) == 3
        assert list(top) == [enc.decode([t]) for t in ids[:3]]
        np.testing.assert_allclose(list(top.values()), values[:3], atol=1e-4)
    chunks = list(server.client().completions.create(model=MODEL_ID, prompt=ref["prompt_text"], max_tokens=6,
                                                     temperature=0, logprobs=3, stream=True))
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs["tokens"]
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == logprobs["text_offset"]


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_logprobs_equal_gpt2_score(server, enc, as_ids):
    ref = GREEDY[2]
    prompt = ref["prompt_ids"] if as_ids else ref["prompt_text"]
    out = server.post("/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 0, "echo": True,
                                          "logprobs": 2}).json()
    choice = out["choices"][0]
    assert choice["text"] == ref["prompt_text"] and out["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    expected = score(ref["prompt_ids"])
    assert logprobs["tokens"] == [enc.decode([t]) for t in ref["prompt_ids"]]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected.logprobs, atol=1e-4)
    assert logprobs["text_offset"][0] == 0
    # With new tokens too: prompt and completion scored as one sequence.
    both = server.post("/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 5, "echo": True,
                                           "logprobs": 1, "temperature": 0}).json()["choices"][0]["logprobs"]
    full = score(ref["prompt_ids"] + ref["new_ids"][:5])
    assert both["token_logprobs"][0] is None
    np.testing.assert_allclose(both["token_logprobs"][1:], full.logprobs, atol=1e-4)
    assert "".join(both["tokens"]) == ref["prompt_text"] + enc.decode(ref["new_ids"][:5])


def test_prompts_of_every_length_are_scored(server):
    for n in (1, 2, 63, 64):
        tokens = list(range(300, 300 + n))
        out = server.post("/v1/completions", {"model": MODEL_ID, "prompt": tokens, "max_tokens": 0, "echo": True,
                                              "logprobs": 0}).json()["choices"][0]["logprobs"]
        assert len(out["token_logprobs"]) == n and out["token_logprobs"][0] is None
        if n > 1:
            np.testing.assert_allclose(out["token_logprobs"][1:], score(tokens).logprobs, atol=1e-4)


# ----------------------------------------------------------------------------- chat

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello, my name is"}]


def expected_chat(enc, max_tokens, seed=None, **settings):
    prompt = enc.encode(chat.render(MESSAGES))
    tokens = library_tokens(prompt, max_tokens, seed, **settings)
    return text_of(enc, tokens, max_tokens, chat.STOPS, trim=True)


def test_openai_client_chat_plain_and_stream(server, enc):
    client = server.client()
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=20, temperature=0)
    text, reason = expected_chat(enc, 20, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(enc.encode(chat.render(MESSAGES)))
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    seeded = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=15, seed=5, n=2,
                                            temperature=0.9, top_p=0.95)
    assert len(seeded.choices) == 2
    assert seeded.choices[0].message.content == expected_chat(enc, 15, 5, temperature=0.9, top_p=0.95)[0]


def test_chat_logprobs(server, enc):
    out = server.post("/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-5)  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


def chat_stream_text(reply_body):
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(reply_body) if e["choices"])


def test_langchain_and_chatgpt_web_request_shapes(server, enc):
    """The requests LangChain's ChatOpenAI (through the openai client, with its defaults) and
    chatgpt-web (its own fetch with an Authorization header) send, streamed, as raw HTTP."""
    langchain = {"messages": [{"content": "You answer briefly.", "role": "system"},
                              {"content": "Hello, my name is", "role": "user"}],
                 "model": MODEL_ID, "stream": True, "n": 1, "temperature": 0.0,
                 "stream_options": {"include_usage": True}, "max_completion_tokens": 12}
    chatgpt_web = {"model": MODEL_ID, "messages": MESSAGES, "temperature": 0.8, "top_p": 1, "presence_penalty": 1,
                   "max_tokens": 12, "stream": True, "seed": 11}
    headers = {"Accept": "text/event-stream", "Authorization": "Bearer sk-anything", "User-Agent": "test"}
    one = server.post("/v1/chat/completions", langchain, headers=headers, stream=True)
    assert one.status_code == 200 and one.headers["Content-Type"].startswith("text/event-stream")
    assert chat_stream_text(one.content.decode()) == expected_chat(enc, 12, temperature=0)[0]
    two = server.post("/v1/chat/completions", chatgpt_web, headers=headers, stream=True)
    expected = expected_chat(enc, 12, 11, temperature=0.8, top_p=1, presence_penalty=1)[0]
    assert chat_stream_text(two.content.decode()) == expected


CHATGPT_WEB_SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI. Answer as concisely as possible.\n"
                      "Knowledge cutoff: 2021-09-01\nCurrent date: 2024-05-01")


def test_item9_chatgpt_web_three_turn_conversation(enc):
    """Issue 24 item 9: chatgpt-web's request bodies for a three-turn conversation, replayed as it
    sends them (model "gpt-3.5-turbo", streamed, its system prompt, max_tokens 1000, each answer
    fed back as history) to a server with --served-model-name gpt-3.5-turbo and --chat-history
    truncate on the 64-token model: every turn streams strict JSON, max_tokens is capped and the
    oldest turns dropped as the protocol says, in the X-Chat-History header."""
    import requests

    from gpt2.serve.protocol import Protocol

    proto = Protocol(enc, 64, (MODEL_ID, "gpt-3.5-turbo"), max_request_rows=8, chat_history="truncate")
    served = StrictRunning(protocol=proto)
    strict_proto = Protocol(enc, 64, (MODEL_ID,), max_request_rows=8)  # without the options
    try:
        messages = [{"role": "system", "content": CHATGPT_WEB_SYSTEM}]
        questions = ["Hello! Who are you?", "What can you tell me about the weather in Paris today?",
                     "And tomorrow, will it rain there?"]
        dropped = []
        for question in questions:
            messages.append({"role": "user", "content": question})
            body = {"model": "gpt-3.5-turbo", "messages": list(messages), "stream": True, "max_tokens": 1000,
                    "temperature": 0.8, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
            r = requests.post(served.url + "/v1/chat/completions", json=body, timeout=120, headers={
                "Accept": "text/event-stream", "Authorization": "Bearer sk-unused"})
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"), r.text
            events = strict_body(r)
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            answer = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
            plan = proto.parse_chat(body)
            assert r.headers["X-Chat-History"] == plan.headers["X-Chat-History"]
            assert f"max_tokens={plan.max_tokens}" in r.headers["X-Chat-History"] and plan.max_tokens < 64
            dropped.append(int(r.headers["X-Chat-History"].split(",")[0].split("=")[1]))
            messages.append({"role": "assistant", "content": answer})
        assert dropped[0] == 0 and dropped[-1] > 0  # by the third turn the history no longer fits
        r = served.post("/v1/chat/completions", {**body, "stream": False})
        assert r.status_code == 200 and r.headers["X-Chat-History"] == plan.headers["X-Chat-History"]
        assert r.json()["usage"]["prompt_tokens"] == len(plan.prompt_tokens[0])
        error = error_of_strict(strict_proto, {**body, "model": MODEL_ID})
        assert error.code == "context_length_exceeded"  # what the same request gets without the option
    finally:
        served.stop()


def error_of_strict(proto, body):
    from gpt2.serve.protocol import ApiError

    with pytest.raises(ApiError) as info:
        proto.parse_chat(body)
    return info.value


# ----------------------------------------------------------------------------- continuous batching

def test_a_short_request_returns_while_a_long_stream_runs(server):
    """Continuous batching from outside: a short request sent while a long one streams is answered
    while the long one still streams, and both equal their answers alone."""
    long_body = {"model": MODEL_ID, "prompt": GREEDY[1]["prompt_text"], "max_tokens": 256, "temperature": 0.8,
                 "seed": 4, "stream": True}
    short_body = {"model": MODEL_ID, "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20, "temperature": 0}
    long_alone = server.post("/v1/completions", long_body).content.decode()
    stream = server.post("/v1/completions", long_body, stream=True)
    lines = stream.iter_lines()
    received = [next(lines) for _ in range(4)]
    short = server.post("/v1/completions", short_body).json()
    assert short["choices"][0]["text"] == GREEDY[0]["new_text"]
    rest = list(lines)
    assert sum(line.startswith(b"data: {") for line in rest) > 20  # the long stream was not done
    body = "\n".join(line.decode() for line in received + rest) + "\n"
    together = "".join(e["choices"][0]["text"] for e in sse_events(body.replace("\n", "\n\n")))
    assert together == "".join(e["choices"][0]["text"] for e in sse_events(long_alone))


def test_seeded_request_same_alone_or_batched(server):
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    alone = server.post("/v1/completions", body).json()["choices"][0]["text"]
    with paused(server.engine):
        threads, results = in_threads([lambda: server.post("/v1/completions", body),
                                       lambda: server.post("/v1/completions", {**body, "prompt": "Other", "seed": 8}),
                                       lambda: server.post("/v1/completions", {**body, "n": 2})])
        wait_until(lambda: server.engine.queue_state()["waiting_rows"] == 4)
    first, _, pair = join(threads, results)
    assert first.json()["choices"][0]["text"] == alone
    assert pair.json()["choices"][0]["text"] == alone  # choice 0's stream is the seed's row 0


def test_full_queue_answers_503(server):
    engine = server.engine
    old = engine.max_queue
    with paused(engine):
        engine.max_queue = 3
        try:
            body = {"text": "Queued", "length": 4, "seed": 0}
            threads, results = in_threads([lambda: server.post("/generate", body)] * 2)
            wait_until(lambda: engine.queue_state()["waiting_rows"] == 2)
            r = server.post("/v1/completions", {"model": MODEL_ID, "prompt": "x", "n": 2})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        finally:
            engine.max_queue = old
    assert [r.status_code for r in join(threads, results)] == [200, 200]


def test_client_leaving_mid_stream_frees_its_slot(server):
    before = server.stats()
    body = json.dumps({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 250, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(post_bytes("/v1/completions", body))
        received = b""
        while b"data: {" not in received:
            received += sock.recv(4096)
    wait_until(lambda: server.stats()["cancelled"] > before["cancelled"], timeout=20)
    wait_until(lambda: server.engine.queue_state()["running_rows"] == 0, timeout=10)
    assert server.stats()["generated_tokens"] - before["generated_tokens"] < 250
    assert server.post("/generate", {"text": "still there?", "length": 3}).status_code == 200


# ----------------------------------------------------------------------------- the rest of the API

def test_models_health_and_playground(server):
    assert [m.id for m in server.client().models.list()] == [MODEL_ID]
    assert server.get(f"/v1/models/{MODEL_ID}").json()["context_length"] == 64
    assert server.get("/v1/models/other").status_code == 404
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and health["max_batch"] == 4
    assert health["compiled_programs"] == 1 and {"runs", "requests", "generated_tokens"} <= set(health["stats"])
    page = server.get("/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'id="prompt"' in page.text and 'id="generate"' in page.text and 'id="output"' in page.text
    assert "http" not in page.text.split("<script>")[1].replace("http-equiv", "")  # nothing fetched from elsewhere


@pytest.mark.parametrize("path,body,status,param", [
    ("/generate", b"{not json", 400, None),
    ("/generate", b"[1, 2]", 400, None),
    ("/generate", b'{"text": "a", "temperature": NaN}', 400, None),
    ("/generate", {"length": 5}, 400, "text"),
    ("/generate", {"text": "a", "top_k": -1}, 400, "top_k"),
    ("/generate", {"text": "a", "lenght": 5}, 400, "lenght"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": MODEL_ID, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400, "messages"),
])
def test_bad_requests_get_a_json_error(server, path, body, status, param):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param


FUZZ_VALUES = [None, True, False, 0, -1, 1, 2.5, 1e308, -1e308, 10**400, "", "x", "1", "9" * 4400, [], [1, "x"],
               [None], [[]], [{}], {}, {"x": [1]}, {"9" * 4400: 1}, {"type": "text"}]
FUZZ_BASES = {
    "/generate": {"text": "Hi", "length": 1},
    "/v1/completions": {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1]},
}


def fuzz_bodies(path):
    """The base body of `path` with each field (and each nested field of messages, stream_options,
    logit_bias and response_format) set to a value of every JSON type."""
    from gpt2.serve.protocol import Protocol

    fields = {"/generate": Protocol.GENERATE_FIELDS, "/v1/completions": Protocol.COMPLETION_FIELDS,
              "/v1/chat/completions": Protocol.CHAT_FIELDS, "/tokenize": ("prompt", "add_special_tokens", "model"),
              "/detokenize": ("tokens", "model")}[path]
    base = FUZZ_BASES[path]
    for field in fields:
        for value in FUZZ_VALUES:
            yield {**base, field: value}
        if field == "stream_options":
            yield from ({**base, "stream": True, field: {"include_usage": value}} for value in FUZZ_VALUES)
        if field == "logit_bias":
            yield from ({**base, field: {"5": value}} for value in FUZZ_VALUES)
        if field == "response_format":
            yield from ({**base, field: {"type": value}} for value in FUZZ_VALUES)
    if path == "/v1/chat/completions":
        for key in ("role", "content", "name"):
            for value in FUZZ_VALUES:
                yield {**base, "messages": [{"role": "user", "content": "Hi", key: value}]}
                yield {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", key: value}]}]}
        for value in FUZZ_VALUES:
            yield {**base, "messages": [value]}
            yield {**base, "messages": [{"role": "assistant", "content": [value]}, {"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("path", list(FUZZ_BASES))
def test_item5_fuzzed_field_types_get_no_500_and_no_traceback(server, path, caplog):
    """Issue 24 item 5: a chat `role` that is a list or dict and a logit_bias key of 4400 digits
    were 500s with a traceback. Every field of every endpoint, set to a value of each JSON type
    (nested fields too), is answered below 500, and the log holds no traceback."""
    import requests

    caplog.set_level(logging.INFO, logger="gpt2.serve")
    statuses_seen = set()
    with requests.Session() as session:
        for body in fuzz_bodies(path):
            r = session.post(server.url + path, data=json.dumps(body), headers=JSON, timeout=60)
            assert r.status_code < 500, (body, r.text)
            statuses_seen.add(r.status_code)
            answer = strict_body(r)
            if r.status_code >= 400:
                assert answer["error"]["message"] and len(r.content) < 2000, r.text
    assert 200 in statuses_seen and 400 in statuses_seen
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert caplog.records and "Traceback" not in logged and "error answering" not in logged
    assert not any(record.exc_info for record in caplog.records)


def test_item5_the_reported_500s_are_400s(server):
    """The two requests of the report, exactly."""
    for role in (["user"], {"a": 1}):
        r = server.post("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": role, "content": "Hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = server.post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "logit_bias": {"1" * 4301: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert len(r.json()["error"]["message"]) < 200


def test_openai_client_sees_400_and_404(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL_ID, prompt="a", top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a")


def test_http_level_errors(server):
    assert server.get("/nope").status_code == 404
    r = server.get("/generate")
    assert r.status_code == 405 and r.headers["Allow"] == "POST, OPTIONS" and "error" in r.json()
    reply = raw_request(server.port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 99999999\r\n\r\n")
    assert statuses(reply) == [413] and b'"request_too_large"' in reply


def test_api_key():
    keyed = Running(api_key="s3cret")
    try:
        body = {"text": "Hi", "length": 2}
        assert keyed.post("/generate", body).status_code == 401
        wrong = keyed.post("/generate", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert keyed.post("/generate", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert keyed.get("/v1/models").status_code == 401
        assert keyed.get("/health").status_code == 200 and keyed.get("/").status_code == 200
        out = keyed.client("s3cret").chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
        assert len(out.choices) == 1
    finally:
        keyed.stop()


def test_cors_preflight_and_headers():
    import requests

    cors = Running(cors_origins=["http://localhost:3000"])
    try:
        preflight = requests.options(cors.url + "/v1/chat/completions", timeout=30, headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
        r = cors.post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2},
                      headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        stream = cors.post("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2, "stream": True},
                           headers={"Origin": "http://localhost:3000"})
        assert stream.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        other = requests.options(cors.url + "/v1/completions", timeout=30, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "Access-Control-Allow-Origin" not in other.headers
        assert "Access-Control-Allow-Origin" not in cors.post("/v1/completions", {"model": MODEL_ID, "max_tokens": 1},
                                                              headers={"Origin": "http://evil.example"}).headers
    finally:
        cors.stop()
    assert JSON  # the default server sends no CORS headers at all (see test_serve_http)


def test_tokenizer_endpoints(server, enc):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, which lm-eval's remote tokenizer uses."""
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    tokens = server.post("/tokenize", {"prompt": "Hello world<|endoftext|>", "add_special_tokens": False}).json()
    assert tokens["tokens"] == enc.encode("Hello world") + [enc.eot_token] and tokens["count"] == 3
    assert server.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world<|endoftext|>"}
    assert server.post("/detokenize", {"tokens": [99999]}).status_code == 400
