"""The server's speculative path (gpt2.serve.engine with draft=, `--draft-model` / `--prompt-lookup`)
on the tiny fixture model, with prompt lookup and with the tiny model itself as the draft model:
greedy answers equal the pool's token for token (drafts accepted), streams equal whole answers,
a request arriving mid-row hands the row to the pool with the same tokens, requests the path does
not serve (logprobs, seeded sampling, past the context) go through the pool, a cancelled row
leaves, and serving traces nothing after warm-up."""

import threading

import pytest

from gpt2.sampling import speculative
from gpt2.sampling.settings import Row, SamplingSettings
from gpt2.serve.engine import Engine, Job

from serve_support import GREEDY, MODEL_DIR, MODEL_ID, Running, model_and_encoder, shared_engine, sse_events, wait_until

COPY = [29007] * 8  # the tiny model's greedy text after it repeats itself: prompt lookup's drafts are accepted
PROMPTS = [case["prompt_ids"] for case in GREEDY] + [COPY, [15496] * 3 + [11, 616], [50256]]
GREEDY_ROW = SamplingSettings(temperature=0)
PENALISED = SamplingSettings(temperature=0, frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.2)


class GatedLookup(speculative.PromptLookup):
    """Prompt lookup that can hold the worker inside a round (in `propose`, after `skip` more
    proposals) until the test opens it."""

    def __init__(self):
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.skip = 0

    def propose(self, *args):
        if self.skip > 0:
            self.skip -= 1
            return super().propose(*args)
        self.entered.set()
        assert self.open.wait(30), "the gate was never opened"
        return super().propose(*args)


def tracing_counts(engine):
    counts = {"pool": engine.pool.tracing_count()}
    for i, sampler in enumerate(engine.speculative_samplers()):
        for name in ("step", "logits", "choose", "choose_with_probs", "_layer"):
            counts[i, name] = getattr(sampler, name).experimental_get_tracing_count()
    return counts


def started(draft, max_batch):
    model, enc = model_and_encoder()
    engine = Engine(model, max_batch=max_batch, max_queue=16, stop_token=enc.eot_token, jit_compile=False,
                    steps_per_run=2, draft=draft)
    engine.warm_up(log_fn=lambda message: None)
    engine.traced = tracing_counts(engine)  # right after warm-up, before any request
    engine.start()
    return engine


@pytest.fixture(scope="module")
def servers():
    """{"lookup": prompt lookup (gated), "model": the tiny model (loaded again) as the draft model,
    "pool": the shared engine without a draft}, each a Running server."""
    from gpt2.checkpoint import load_model

    engines = {"lookup": started(GatedLookup(), 3), "model": started(speculative.DraftModel(load_model(MODEL_DIR)), 2),
               "pool": shared_engine()}
    running = {name: Running(engine) for name, engine in engines.items()}
    yield running
    for name, server in running.items():
        server.stop()
        if name != "pool":
            server.engine.shutdown(0)


def complete(server, prompt, max_tokens, **fields):
    reply = server.post("/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def tokens_of(engine, row, **job_options):
    job = Job([row], **job_options)
    engine.submit(job)
    ids = []
    while True:
        event = job.get(60)
        assert event is not None and event[0] == "tokens", event
        ids += event[2]
        if event[4]:
            return ids


def test_greedy_answers_equal_the_pools_with_drafts_accepted(servers):
    pool = servers["pool"].engine
    for name in ("lookup", "model"):
        engine = servers[name].engine
        before, accepted = dict(engine.stats), engine.draft.stats.accepted
        for prompt in PROMPTS:
            for settings in (GREEDY_ROW, PENALISED):
                row = Row(prompt, settings, 0, 64 - len(prompt) - 3 * (prompt == COPY))
                assert tokens_of(engine, row) == tokens_of(pool, row), (name, prompt, settings)
        for case in GREEDY:  # and the fixture's reference tokens, through the HTTP layer
            got = complete(servers[name], case["prompt_ids"], len(case["new_ids"]))
            assert got["text"] == model_and_encoder()[1].decode(case["new_ids"]), name
        rows = 2 * len(PROMPTS) + len(GREEDY)
        assert engine.stats["speculative_rows"] - before["speculative_rows"] == rows, engine.stats
        assert engine.draft.stats.accepted > accepted, (name, engine.draft.stats)


def test_a_stream_equals_the_whole_answer_and_stop_strings_end_it_as_in_the_pool(servers):
    server, pool = servers["lookup"], servers["pool"]
    whole = complete(server, COPY, 40)
    reply = server.post("/v1/completions", {"model": MODEL_ID, "prompt": COPY, "max_tokens": 40, "temperature": 0,
                                            "stream": True}, stream=True)
    events = sse_events(reply.text)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"
    stop = whole["text"][len(whole["text"]) // 2:][:6]
    stopped = complete(server, COPY, 40, stop=stop)
    assert stopped == complete(pool, COPY, 40, stop=stop)
    assert stopped["finish_reason"] == "stop" and len(stopped["text"]) < len(whole["text"])
    wait_until(lambda: server.engine.queue_state()["running_rows"] == 0, what="the stopped row to leave")


def test_a_request_arriving_mid_row_hands_the_row_to_the_pool_with_the_same_tokens(servers):
    server, pool = servers["lookup"], servers["pool"]
    gate = server.engine.draft
    handed = server.engine.stats["handed_to_pool"]
    # penalties: the pool must count the tokens made before the hand-over
    first = dict(prompt=COPY, max_tokens=50, frequency_penalty=2.0, presence_penalty=1.0)
    second = dict(prompt=PROMPTS[0], max_tokens=30)
    results = {}
    gate.open.clear()
    gate.entered.clear()
    gate.skip = 3  # held in its 4th round: a dozen tokens made
    try:
        a = threading.Thread(target=lambda: results.update(a=complete(server, **first)))
        a.start()
        assert gate.entered.wait(30), "the first request never ran speculatively"
        b = threading.Thread(target=lambda: results.update(b=complete(server, **second)))
        b.start()
        wait_until(lambda: server.engine.queue_state()["waiting_rows"] == 1, what="the second request to queue")
    finally:
        gate.open.set()
    a.join(60)
    b.join(60)
    assert server.engine.stats["handed_to_pool"] == handed + 1
    assert results["a"] == complete(pool, **first)
    assert results["b"] == complete(pool, **second)


def test_what_goes_through_the_pool_instead(servers):
    server, pool = servers["lookup"], servers["pool"]
    engine = server.engine
    before = engine.stats["speculative_rows"]
    with_logprobs = complete(server, COPY, 10, logprobs=2)
    assert with_logprobs == complete(pool, COPY, 10, logprobs=2)
    seeded = dict(temperature=1.0, top_k=40, seed=7)
    assert complete(server, COPY, 20, **seeded) == complete(pool, COPY, 20, **seeded)
    assert complete(server, COPY, 60)["text"] == complete(pool, COPY, 60)["text"]  # past the context: slides
    assert complete(server, COPY, 8, n=2) == complete(pool, COPY, 8, n=2)  # two rows picked together
    assert engine.stats["speculative_rows"] == before
    sampled = complete(server, COPY, 20, temperature=1.0, top_k=40)  # unseeded: speculative
    assert engine.stats["speculative_rows"] == before + 1
    assert sampled["finish_reason"] == "length" and sampled["text"]


def test_a_cancelled_row_leaves_and_the_next_request_is_served(servers):
    server = servers["lookup"]
    engine, gate = server.engine, server.engine.draft
    job = Job([Row(COPY, GREEDY_ROW, 0, 40)])
    gate.open.clear()
    gate.entered.clear()
    try:
        engine.submit(job)
        assert gate.entered.wait(30)
        engine.cancel(job)
    finally:
        gate.open.set()
    wait_until(lambda: engine.queue_state()["running_rows"] == 0, what="the cancelled row to leave")
    assert complete(server, COPY, 5)["finish_reason"] == "length"
    health = server.get("/health").json()
    assert health["speculative"]["draft"] == "prompt-lookup" and health["speculative"]["accepted"] > 0


def test_nothing_is_traced_after_warm_up(servers):
    """Every prompt length, greedy and sampled, with penalties, handed over or not: the functions
    warm-up traced serve them all."""
    for name in ("lookup", "model"):
        server = servers[name]
        for length in (1, 2, 5, 17, 33, 50):
            prompt = (COPY * 8)[:length]
            complete(server, prompt, 64 - length)
            complete(server, prompt, min(10, 64 - length), temperature=0.8, top_p=0.9, frequency_penalty=0.5)
        threads = [threading.Thread(target=complete, args=(server, (COPY * 4)[:n], 12)) for n in (3, 9, 20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert tracing_counts(server.engine) == server.engine.traced, name


def test_serve_takes_generate_pys_draft_options():
    from gpt2.serve.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--draft-model", "124M", "--draft-tokens", "5"])
    assert (args.draft_model, args.prompt_lookup, args.draft_tokens) == ("124M", False, 5)
    assert parser.parse_args(["--model", "m", "--prompt-lookup"]).prompt_lookup
    for bad in (["--draft-model", "124M", "--prompt-lookup"], ["--draft-tokens", "0"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--model", "m", *bad])
        assert exit_.value.code == 2
