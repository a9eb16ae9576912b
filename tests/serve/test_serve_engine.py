"""Continuous batching (gpt2.serve.engine) on the tiny fixture model: rows join and leave a running
decode, answers equal being served alone, nothing compiles after start-up, the queue is bounded
by rows, and a failing worker fails its requests and recovers or reports itself unhealthy."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpt2.sampling.settings import Row, SamplingSettings, row_seeds
from gpt2.serve.engine import Engine, Job, QueueFull, Unavailable

from serve_support import REPO, model_and_encoder, shared_engine, wait_until

GREEDY = SamplingSettings(temperature=0)
SAMPLED = SamplingSettings(temperature=1.0, top_k=40)


def collect(job, timeout=60):
    """Runs a job to the end: (tokens per row, rows in the order they finished)."""
    tokens = [[] for _ in job.rows]
    order = []
    while len(order) < len(job.rows):
        event = job.get(timeout)
        assert event is not None, "no event from the engine"
        assert event[0] == "tokens", event
        _, row, ids, _, finished = event
        tokens[row] += ids
        if finished:
            order.append(row)
    return tokens, order


def run_alone(engine, row):
    job = Job([row])
    engine.submit(job)
    return collect(job)[0][0]


def prompt(n, start=100):
    return list(range(start, start + n))


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


@pytest.fixture(scope="module")
def small_engine():
    """A 2-slot engine of this module's own (not started): its pool for the pool test, then the
    failure test starts it."""
    model, enc = model_and_encoder()
    engine = Engine(model, max_batch=2, max_queue=8, stop_token=enc.eot_token, jit_compile=False, steps_per_run=2,
                    max_failures=3)
    yield engine
    engine.shutdown(grace=0)


def test_short_request_returns_while_a_long_one_decodes_and_both_equal_alone(engine):
    for settings, seed in ((GREEDY, 0), (SAMPLED, int(row_seeds(5, 1)[0]))):
        long_row = Row(prompt(40), settings, seed, 100)  # the window slides past the 64-token context
        short_row = Row(prompt(7, 300), settings, seed + 1, 5)
        long_job = Job([long_row])
        engine.submit(long_job)
        long_tokens = []
        while len(long_tokens) < 10:  # the long row is decoding
            long_tokens += long_job.get(30)[2]
        short_job = Job([short_row])
        engine.submit(short_job)
        short_tokens, _ = collect(short_job)
        assert not any(event[4] for event in list(long_job.events)), "the long row finished first"
        rest, _ = collect(long_job)
        long_tokens += rest[0]
        assert len(long_tokens) == 100 and len(short_tokens[0]) == 5
        assert long_tokens == run_alone(engine, long_row)
        assert short_tokens[0] == run_alone(engine, short_row)


def events_of(job, timeout=60):
    """Every tokens event of a one-row job until its row finishes: [(ids, finished)]."""
    events = []
    while not events or not events[-1][1]:
        event = job.get(timeout)
        assert event is not None and event[0] == "tokens", event
        events.append((event[2], event[4]))
    return events


def test_item8_streamed_rows_get_each_token_as_it_is_made(engine):
    """Issue 24 item 8: while a streamed job has rows running, the pool runs stream_steps_per_run
    (1) iteration per call, so each token is handed out as it is made; the same row not streamed
    comes steps_per_run (2 here) tokens at a time. Same tokens either way, sampled or greedy."""
    assert (engine.steps_per_run, engine.stream_steps_per_run) == (2, 1)
    for settings, seed in ((GREEDY, 0), (SAMPLED, int(row_seeds(24, 1)[0]))):
        row = Row(prompt(40, 200), settings, seed, 15)  # ingests over 2 iterations, then decodes (and slides)
        streamed, plain = Job([row], stream=True), Job([row])
        engine.submit(streamed)
        stream_events = events_of(streamed)
        engine.submit(plain)
        plain_events = events_of(plain)
        assert [len(ids) for ids, _ in stream_events] == [1] * 15
        assert max(len(ids) for ids, _ in plain_events) == 2 and len(plain_events) < 15
        assert sum((ids for ids, _ in stream_events), []) == sum((ids for ids, _ in plain_events), [])
        assert sum((ids for ids, _ in stream_events), []) == run_alone(engine, row)


def test_rows_of_many_requests_at_different_positions_equal_alone(engine):
    rows = [Row(prompt(n, 50 * i), settings, 1000 + i, length)
            for i, (n, settings, length) in enumerate([(1, GREEDY, 30), (64, SAMPLED, 20), (33, SAMPLED, 70),
                                                      (5, GREEDY, 3), (20, SAMPLED, 12), (2, SAMPLED, 90)])]
    jobs = [Job([row]) for row in rows]
    for job in jobs:  # 6 requests for 4 slots: two wait, then join the running decode
        engine.submit(job)
    together = [collect(job)[0][0] for job in jobs]
    assert together == [run_alone(engine, row) for row in rows]


def test_n_rows_share_their_prompt_and_a_freed_slot_does_not_disturb_them(engine):
    """A request's n rows share one ingestion of the prompt; when one of them is released early and
    a new row takes its slot, the others go on unchanged (regression: the pool's `source`)."""
    seeds = row_seeds(7, 3)
    shared = [Row(prompt(30), SAMPLED, int(s), 40) for s in seeds]
    job = Job(shared)
    engine.submit(job)
    first = job.get(30)
    job.mark_unneeded(first[1])  # as a matched stop string does
    other = Job([Row(prompt(9, 700), GREEDY, 0, 30)])
    engine.submit(other)
    tokens = [[] for _ in shared]
    tokens[first[1]] += first[2]
    finished = set()
    while len(finished) < 2:
        _, row, ids, _, done = job.get(30)
        tokens[row] += ids
        finished |= {row} if done else set()
    collect(other)
    for row in finished:
        assert tokens[row] == run_alone(engine, shared[row])


def test_pool_slot_reuse_keeps_a_sharing_neighbour_intact(small_engine):
    """The pool itself (regression): rows admitted with one prompt share its cache; a row later
    admitted into the source row's slot must not copy its prompt into the neighbour."""
    from gpt2.sampling.settings import Row

    pool = alone_pool = small_engine.pool

    def drain(pool, slot):
        out = []
        while pool.active[slot]:
            outputs, done, _ = pool.run()
            out += [t for t in outputs["tokens"][slot] if t >= 0]
            pool.release([s for s in range(pool.slots) if done[s] and pool.active[s]])
        return out

    neighbour = Row([5, 6, 7], GREEDY, 0, 12)
    pool.admit([0, 1], [Row([5, 6, 7], GREEDY, 0, 2), neighbour])
    outputs, _, _ = pool.run()
    got = [t for t in outputs["tokens"][1] if t >= 0]
    pool.release([0])
    pool.admit([0], [Row([9, 9, 9, 9, 9], GREEDY, 0, 4)])
    got += drain(pool, 1)
    pool.release_all()
    alone_pool.admit([0], [Row([5, 6, 7], GREEDY, 0, 12)])
    assert got == drain(alone_pool, 0)


def test_no_trace_after_start_up_under_a_varied_request_mix(engine):
    """One compiled decode program and the scoring programs of warm-up serve every request shape."""
    from gpt2.scoring import compiled_scorer

    model, _ = model_and_encoder()
    scorer = compiled_scorer(model, jit_compile=False)
    decode_traces, score_traces = engine.pool.tracing_count(), scorer.traces
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(10):
        n = int(rng.integers(1, 4))
        prompts = int(rng.integers(1, 3))
        settings = [GREEDY, SAMPLED, SamplingSettings(temperature=0.7, top_p=0.5, presence_penalty=1.0,
                                                      logit_bias={50256: -100}),
                    SamplingSettings(repetition_penalty=1.3, frequency_penalty=0.5)][i % 4]
        rows = [Row(prompt(int(rng.integers(1, 65)), 10 * p), settings, int(rng.integers(0, 2 ** 31)),
                    int(rng.integers(1, 130)), logprobs=bool(i % 2))
                for p in range(prompts) for _ in range(n)]
        jobs.append(Job(rows))
    for job in jobs:
        engine.submit(job)
    for job in jobs:
        collect(job)
    engine.score([prompt(n) for n in (1, 2, 17, 64)])
    assert (engine.pool.tracing_count(), scorer.traces) == (decode_traces, score_traces) == (1, score_traces)


def test_queue_is_bounded_by_rows_not_requests(engine):
    """Issue 10 item 4: waiting rows are counted, so a few requests with large n cannot fill the
    queue for minutes while it still counts them as a few."""
    engine.pause()
    old = engine.max_queue
    engine.max_queue = 8
    try:
        big = Job([Row(prompt(3), GREEDY, 0, 2)] * 6)
        engine.submit(big)
        with pytest.raises(QueueFull, match="6 rows waiting"):
            engine.submit(Job([Row(prompt(3), GREEDY, 0, 2)] * 3))
        small = Job([Row(prompt(3), GREEDY, 0, 2)] * 2)
        engine.submit(small)
        assert engine.queue_state()["waiting_rows"] == 8
    finally:
        engine.max_queue = old
        engine.resume()
    collect(big), collect(small)


def test_shorter_requests_go_first_but_waiting_long_ones_are_not_overtaken():
    model, enc = model_and_encoder()
    engine = Engine(model, max_batch=2, stop_token=enc.eot_token, jit_compile=False)  # never started
    engine.step_seconds = 0.05
    long, short, other = (Job([Row(prompt(3), GREEDY, 0, n)]) for n in (200, 3, 200))
    for job in (long, short, other):
        engine.submit(job)
    assert engine._pick() == [(short, 0), (long, 0)]
    late = Job([Row(prompt(3), GREEDY, 0, 3)])
    engine.submit(late)
    other.enqueued_at -= 11.0  # waited longer than the short one's own decode time (10 s ahead)
    assert engine._pick() == [(other, 0), (late, 0)]


def test_cancelled_rows_leave_their_slots_at_once(engine):
    job = Job([Row(prompt(5), GREEDY, 0, 200)] * 2)
    engine.submit(job)
    job.get(30)
    engine.cancel(job)
    wait_until(lambda: engine.queue_state()["running_rows"] == 0, timeout=10, what="the slots to be freed")
    assert run_alone(engine, Row(prompt(4), GREEDY, 0, 3))  # still serving


class Boom(BaseException):
    """A failure that would end a thread (not an Exception)."""


def test_a_failing_worker_fails_its_requests_then_recovers_or_reports_unhealthy(small_engine):
    """Issue 10 item 8: a run that raises fails only the requests in the pool, the worker carries
    on; repeated failures make the engine unhealthy (503s) instead of leaving requests hanging, and
    a worker thread found dead is restarted."""
    engine = small_engine
    engine.start()
    real_run = engine.pool.run
    row = Row(prompt(4), GREEDY, 0, 6)
    try:
        good = run_alone(engine, row)
        engine.pool.run = lambda *a, **k: (_ for _ in ()).throw(Boom("simulated failure"))
        job = Job([row])
        engine.submit(job)
        event = job.get(30)
        assert event[:2] == ("error", 500) and "Boom: simulated failure" in event[2]
        engine.pool.run = real_run
        assert run_alone(engine, row) == good and engine.status() == "ok"
        assert engine.stats["failures"] == 1 and engine.stats["worker_restarts"] == 1

        engine.pool.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
        for _ in range(2):
            job = Job([row])
            engine.submit(job)
            assert job.get(30)[:2] == ("error", 500)
        wait_until(lambda: engine.status() == "unhealthy", timeout=10, what="unhealthy")
        assert "device lost" in engine.health()["error"]
        with pytest.raises(Unavailable, match="unhealthy"):
            engine.submit(Job([row]))

        engine.pool.run = real_run  # a dead worker thread (not stopped) is restarted on the next request
        engine.unhealthy = None
        engine._failures.clear()
        assert not engine._thread.is_alive()
        assert run_alone(engine, row) == good
    finally:
        engine.pool.run = real_run


@pytest.mark.slow
def test_xla_compiles_the_decode_program_once_whatever_the_requests(tmp_path):
    """Under XLA: the trace count cannot see XLA compiling one traced program again (it did, for
    every new set of active slots); count the compiled modules XLA dumps instead."""
    code = textwrap.dedent(f"""
        import glob, sys
        import numpy as np
        sys.path[:0] = [{os.path.join(REPO, 'tests')!r}, {os.path.join(REPO, 'tests', 'serve')!r}]
        from serve_support import model_and_encoder
        from test_serve_engine import collect, prompt, GREEDY, SAMPLED
        from gpt2.serve.engine import Engine, Job
        from gpt2.sampling.settings import Row
        model, enc = model_and_encoder()
        engine = Engine(model, max_batch=4, stop_token=enc.eot_token, jit_compile=True, steps_per_run=2)
        engine.warm_up(log_fn=lambda m: None)
        def compiled():
            return len(glob.glob({str(tmp_path)!r} + "/*run_program*.before_optimizations.txt"))
        after_warm_up = compiled()
        engine.start()
        rng = np.random.default_rng(1)
        for wave in range(3):
            jobs = [Job([Row(prompt(int(rng.integers(1, 65)), 7 * i), [GREEDY, SAMPLED][i % 2], i,
                             int(rng.integers(1, 90)))] * int(rng.integers(1, 3))) for i in range(5)]
            for job in jobs:
                engine.submit(job)
            for job in jobs:
                collect(job)
        print(after_warm_up, compiled())
        engine.shutdown(0)
    """)
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}", TF_CPP_MIN_LOG_LEVEL="2", GPT2_CACHE_DIR="off",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "1"]
