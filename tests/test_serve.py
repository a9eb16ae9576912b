"""The HTTP server (gpt2.serve), started in-process on 127.0.0.1 with the tiny fixture model and
spoken to over real HTTP: the /generate contract, the official `openai` client, errors, auth,
the bounded queue, batching of concurrent requests and clients that go away.

The sampler is traced without XLA here (compiling is what makes start-up slow; the compiled
sampler itself is tested in the sampler's tests).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from gpt2.serve_api import ChoiceText

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODEL_DIR = os.path.join(HERE, "data", "tiny-model")
with open(os.path.join(MODEL_DIR, "reference.json"), encoding="utf-8") as _f:
    GREEDY = json.load(_f)["greedy"]["cases"]  # 20 new tokens each, top_k=1
MAX_BATCH = 4


class Running:
    """A server on a free port: .url, .app, .engine, .model."""

    def __init__(self, app, server, thread):
        self.app, self.engine, self.server, self.thread = app, app.engine, server, thread
        self.url = f"http://127.0.0.1:{server.port}"

    def post(self, path, body, **kwargs):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, timeout=60, **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=60, **kwargs)

    def client(self, api_key="unused"):
        openai = pytest.importorskip("openai")  # the official client: in the `test` extra

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def stats(self):
        return dict(self.engine.stats)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def start_http(app):
    from gpt2.serve import Server, start_in_thread

    server = Server(app, "127.0.0.1", 0)
    return Running(app, server, start_in_thread(server))


@pytest.fixture(scope="module")
def cli_server():
    """`python -m gpt2.serve` as a subprocess; started first so that it loads while other tests run."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2.serve", "--model", MODEL_DIR, "--port", "0", "--no-xla", "--max-batch", "1",
         "--warmup-lengths", "16", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def engine(cli_server):
    from gpt2.checkpoint import load_model
    from gpt2.serve_batching import BatchEngine

    model = load_model(MODEL_DIR)
    engine = BatchEngine(model, max_batch=MAX_BATCH, batch_window=0.02, max_queue=16, jit_compile=False)
    engine.warm_up([16])
    engine.start()
    yield engine
    engine.stop(timeout=10)


@pytest.fixture(scope="module")
def enc():
    from encoder import encoder_for_model_dir

    return encoder_for_model_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def server(engine, enc):
    from gpt2.serve import App

    running = start_http(App(engine, enc, "tiny-model"))
    yield running
    running.stop()


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.01)


def in_threads(calls):
    """Runs each zero-argument callable on its own thread; returns their results in order."""
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except Exception as error:  # noqa: BLE001 - re-raised by the test
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
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


# ----------------------------------------------------------------------------- /generate

@pytest.mark.parametrize("case", range(len(GREEDY)))
def test_generate_top_k_1_gives_the_reference_greedy_text(server, case):
    ref = GREEDY[case]
    r = server.post("/generate", {"text": ref["prompt_text"], "length": 20, "top_k": 1})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"generated_text": ref["new_text"]}


def test_generate_temperature_0_is_greedy_and_seed_is_reproducible(server, enc):
    from gpt2.sampling.api import sample_rows
    from gpt2.sampling.settings import row_seeds

    ref = GREEDY[0]
    r = server.post("/generate", {"text": ref["prompt_text"], "length": 20, "temperature": 0})
    assert r.json()["generated_text"] == ref["new_text"]
    body = {"text": ref["prompt_text"], "length": 20, "temperature": 1.0, "top_k": 40, "seed": 1234}
    first = server.post("/generate", body).json()["generated_text"]
    assert server.post("/generate", body).json()["generated_text"] == first
    assert server.post("/generate", {**body, "seed": 99}).json()["generated_text"] != first
    # The same row the library samples for seed 1234 (what gpt2.sample.generate would return).
    [tokens] = sample_rows(server.engine.model, [enc.encode(ref["prompt_text"])], 20, 1.0, 40,
                           seeds=row_seeds(1234, 1), stop_token=enc.eot_token, jit_compile=False)
    assert first == enc.decode([t for t in tokens if t != enc.eot_token])


def test_generate_default_length_and_unconditional(server):
    r = server.post("/generate", {"text": "", "seed": 1, "length": 8})
    assert r.status_code == 200 and isinstance(r.json()["generated_text"], str)


# ----------------------------------------------------------------------------- OpenAI API

def test_openai_client_completion_and_stream(server):
    client = server.client()
    ref = GREEDY[0]
    done = client.completions.create(model="tiny-model", prompt=ref["prompt_text"], max_tokens=20, temperature=0)
    assert done.object == "text_completion" and done.model == "tiny-model" and done.id
    assert [c.text for c in done.choices] == [ref["new_text"]]
    assert done.choices[0].finish_reason == "length" and done.choices[0].index == 0
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 20, 25)

    chunks = list(client.completions.create(model="tiny-model", prompt=ref["prompt_text"], max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1  # really streamed, not one blob
    assert "".join(texts) == ref["new_text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 5


def test_raw_stream_is_server_sent_events(server):
    r = server.post("/v1/completions", {"model": "tiny-model", "prompt": "Hi", "max_tokens": 3, "stream": True},
                    stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    body = r.content.decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stream_to_an_http_1_0_client_is_not_chunked(server):
    body = json.dumps({"model": "tiny-model", "prompt": GREEDY[0]["prompt_text"], "max_tokens": 20,
                       "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = sock.makefile("rb").read().decode()  # until the server closes
    head, _, events = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "chunked" not in head.lower() and "Connection: close" in head
    events = [e[6:] for e in events.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == GREEDY[0]["new_text"]


def test_list_prompts_token_prompts_and_n(server):
    client = server.client()
    prompts = [GREEDY[0]["prompt_text"], GREEDY[1]["prompt_text"]]
    out = client.completions.create(model="tiny-model", prompt=prompts, max_tokens=20, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [GREEDY[0]["new_text"]] * 2 + [GREEDY[1]["new_text"]] * 2
    assert out.usage.prompt_tokens == len(GREEDY[0]["prompt_ids"]) + len(GREEDY[1]["prompt_ids"])
    assert out.usage.completion_tokens == 80
    ids = client.completions.create(model="tiny-model", prompt=GREEDY[2]["prompt_ids"], max_tokens=20, temperature=0)
    assert ids.choices[0].text == GREEDY[2]["new_text"]
    echo = client.completions.create(model="tiny-model", prompt=prompts[0], max_tokens=20, temperature=0, echo=True)
    assert echo.choices[0].text == GREEDY[0]["full_text"]


def test_stop_strings(server):
    client = server.client()
    ref = GREEDY[0]  # " Logic" "zz" " Lys" " Lys" " Sid" ...
    out = client.completions.create(model="tiny-model", prompt=ref["prompt_text"], max_tokens=20, temperature=0,
                                    stop=["Lys", "never"])
    assert out.choices[0].text == " Logiczz " and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 3
    # A stop string spanning tokens, streamed: the text before it is never sent.
    chunks = list(client.completions.create(model="tiny-model", prompt=ref["prompt_text"], max_tokens=20,
                                            temperature=0, stop="zz Ly", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " Logic"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_request_same_alone_or_batched(server):
    body = {"model": "tiny-model", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    alone = server.post("/v1/completions", body).json()["choices"][0]["text"]
    server.engine.pause()
    try:
        calls = [lambda: server.post("/v1/completions", body),
                 lambda: server.post("/v1/completions", {**body, "prompt": "Other", "seed": 8}),
                 lambda: server.post("/v1/completions", {**body, "n": 2})]
        threads, results = in_threads(calls)
        wait_until(lambda: server.engine.queue_state()["waiting_rows"] == 4)
    finally:
        server.engine.resume()
    first, _, pair = join(threads, results)
    assert first.json()["choices"][0]["text"] == alone
    assert pair.json()["choices"][0]["text"] == alone  # choice 0's stream is the seed's row 0


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny-model"]
    assert server.get("/v1/models/tiny-model").json()["id"] == "tiny-model"
    assert server.get("/v1/models/other").status_code == 404
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-model" and health["context_length"] == 64
    assert health["batch_sizes"] == [1, 2, 4] and {"batches", "requests"} <= set(health["stats"])


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("path,body,param", [
    ("/generate", b"{not json", None),
    ("/generate", b"[1, 2]", None),
    ("/generate", b'{"text": "a", "temperature": NaN}', None),
    ("/generate", {"length": 5}, "text"),
    ("/generate", {"text": 5}, "text"),
    ("/generate", {"text": "a", "length": "5"}, "length"),
    ("/generate", {"text": "a", "length": 0}, "length"),
    ("/generate", {"text": "a", "temperature": -1}, "temperature"),
    ("/generate", {"text": "a", "top_p": 0}, "top_p"),
    ("/generate", {"text": "a", "top_k": -1}, "top_k"),
    ("/generate", {"text": "a", "seed": "x"}, "seed"),
    ("/generate", {"text": "a", "lenght": 5}, "lenght"),
    ("/generate", {"text": "word " * 30, "length": 40}, "length"),
    ("/generate", {"text": "word " * 80}, "text"),
    ("/v1/completions", {"prompt": "a"}, "model"),
    ("/v1/completions", {"model": "tiny-model", "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": "tiny-model", "prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"model": "tiny-model", "prompt": [[1, 99999]]}, "prompt"),
    ("/v1/completions", {"model": "tiny-model", "max_tokens": 64}, "max_tokens"),
    ("/v1/completions", {"model": "tiny-model", "n": 0}, "n"),
    ("/v1/completions", {"model": "tiny-model", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": "tiny-model", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "tiny-model", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "tiny-model", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"model": "tiny-model", "logprobs": 2}, "logprobs"),
])
def test_bad_requests_get_400_with_a_json_error(server, path, body, param):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param:
        assert param in error["message"]


def test_openai_client_sees_400_and_404(server):
    openai = pytest.importorskip("openai")
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny-model", prompt="a", top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny-model", prompt="a", max_tokens=1000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a")


def test_http_level_errors(server):
    assert server.get("/nope").status_code == 404
    r = server.get("/generate")
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and "error" in r.json()
    with socket.create_connection(("127.0.0.1", server.server.port)) as sock:  # body over the cap: not read
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 413") and '"request_too_large"' in reply


def test_api_key(engine, enc):
    from gpt2.serve import App

    keyed = start_http(App(engine, enc, "tiny-model", api_key="s3cret"))
    try:
        body = {"text": "Hi", "length": 2}
        assert keyed.post("/generate", body).status_code == 401
        wrong = keyed.post("/generate", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert keyed.post("/generate", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert keyed.get("/v1/models").status_code == 401
        assert keyed.get("/health").status_code == 200
        out = keyed.client("s3cret").completions.create(model="tiny-model", prompt="Hi", max_tokens=2)
        assert len(out.choices) == 1
    finally:
        keyed.stop()


# ----------------------------------------------------------------------------- queue and batching

def test_full_queue_answers_503(server):
    engine = server.engine
    engine.pause()
    engine.max_queue = 2
    try:
        body = {"text": "Queued", "length": 4, "seed": 0}
        threads, results = in_threads([lambda: server.post("/generate", body)] * 2)
        wait_until(lambda: engine.queue_state()["waiting_requests"] == 2)
        r = server.post("/generate", body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        engine.max_queue = 16
        engine.resume()
    assert [r.status_code for r in join(threads, results)] == [200, 200]


def test_concurrent_requests_share_batches(server):
    engine = server.engine
    before = server.stats()
    engine.pause()
    try:
        calls = [lambda ref=ref: server.post("/generate", {"text": ref["prompt_text"], "length": 20, "top_k": 1})
                 for ref in GREEDY]
        calls.append(lambda: server.client().completions.create(
            model="tiny-model", prompt=GREEDY[0]["prompt_text"], max_tokens=20, temperature=0, stream=True))
        threads, results = in_threads(calls)
        wait_until(lambda: engine.queue_state()["waiting_requests"] == len(calls))
    finally:
        engine.resume()
    *answers, stream = join(threads, results)
    assert [a.json()["generated_text"] for a in answers] == [ref["new_text"] for ref in GREEDY]
    assert "".join(c.choices[0].text for c in stream) == GREEDY[0]["new_text"]
    after = server.stats()
    assert after["requests"] - before["requests"] == 4
    assert after["batches"] - before["batches"] == 1  # 4 requests, one batch of 4 rows
    assert after["largest_batch"] == MAX_BATCH


def test_client_leaving_the_queue_frees_its_place(server):
    engine = server.engine
    before = server.stats()
    engine.pause()
    try:
        body = json.dumps({"text": "bye", "length": 5}).encode()
        sock = socket.create_connection(("127.0.0.1", server.server.port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: engine.queue_state()["waiting_requests"] == 1)
        sock.close()
        wait_until(lambda: engine.queue_state()["waiting_requests"] == 0, timeout=5)
    finally:
        engine.resume()
    after = server.stats()
    assert after["cancelled"] == before["cancelled"] + 1 and after["batches"] == before["batches"]


class _SlowSampler:
    """Wraps gpt2.sample so that every streamed decode step takes a while."""

    def __init__(self, sample, delay):
        self._sample, self._delay = sample, delay

    def __getattr__(self, name):
        return getattr(self._sample, name)

    def sample_rows(self, *args, callback=None, **kwargs):
        def slow(step, tokens):
            time.sleep(self._delay)
            callback(step, tokens)

        return self._sample.sample_rows(*args, callback=slow if callback else None, **kwargs)


def test_client_leaving_mid_stream_stops_its_batch(server):
    engine = server.engine
    before = server.stats()
    real = engine._sample
    engine._sample = _SlowSampler(real, 0.05)
    try:
        body = json.dumps({"model": "tiny-model", "prompt": "Hi", "max_tokens": 30, "temperature": 0,
                           "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server.server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            received = b""
            while b"data: {" not in received:
                received += sock.recv(4096)
        # hung up after the first event, without reading the rest
        wait_until(lambda: server.stats()["abandoned_batches"] > before["abandoned_batches"], timeout=10)
    finally:
        engine._sample = real
    after = server.stats()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 15  # stopped well before 30
    assert server.post("/generate", {"text": "still there?", "length": 3}).status_code == 200


# ----------------------------------------------------------------------------- text handling

def test_choice_text_holds_back_partial_characters_and_stop_prefixes(enc):
    ids = enc.encode("naïve café ✓ done")
    whole = ChoiceText(enc, 100)
    assert "".join(whole.feed([t]) for t in ids) + whole.end() == "naïve café ✓ done"
    stream = ChoiceText(enc, 100)
    pieces = [stream.feed([t]) for t in enc.encode("✓")]  # one character, several byte tokens
    assert "".join(pieces) == "✓" and pieces[0] == ""
    stopped = ChoiceText(enc, 100, stops=["é ✓"])
    out = "".join(stopped.feed([t]) for t in ids)
    assert out == "naïve caf" and stopped.finish_reason == "stop"
    eot = ChoiceText(enc, 100)
    assert eot.feed(enc.encode("a b") + [enc.eot_token] + enc.encode("c")) == "a b"
    assert eot.finish_reason == "stop" and eot.tokens == 2
    capped = ChoiceText(enc, 2, stops=["zzz"])
    assert capped.feed(enc.encode("one two three")) == "one two" and capped.finish_reason == "length"


# ----------------------------------------------------------------------------- the command line

def test_command_line_server(cli_server):
    line = cli_server.stdout.readline()
    match = re.search(r"serving tiny-model on (http://127\.0\.0\.1:\d+)", line)
    assert match, line + cli_server.stderr.read()
    url = match.group(1)
    assert requests.get(url + "/health", timeout=30).json()["max_batch"] == 1
    ref = GREEDY[1]
    r = requests.post(url + "/generate", json={"text": ref["prompt_text"], "length": 20, "top_k": 1}, timeout=60)
    assert r.json() == {"generated_text": ref["new_text"]}
    cli_server.terminate()
    assert cli_server.wait(30) == 0
