"""Continuous batching: one worker thread decodes every request's rows in one pool of slots.

The engine owns a `gpt2.sampling.pool.Pool` of `max_batch` slots (one compiled program, whatever
the prompts, lengths and settings). Requests arrive as `Job`s of rows (a row = one choice: k
prompts x n make k*n rows) and wait in a queue bounded by rows, not requests. The worker loops:

1. release the slots of rows nobody needs any more (client gone, stop string matched);
2. admit waiting rows into the free slots, at most a fair share of the free slots per request, so
   a request with many rows does not hold back the ones behind it (rows of one request with the
   same prompt share its ingestion). Requests go in order of arrival time plus their own decode
   time (max_tokens x the measured time per step): shorter ones go first, but a request is never
   overtaken by ones that arrived more than its own decode time after it;
3. run the pool for `steps_per_run` loop iterations (a new prompt is ingested up to 128 tokens per
   iteration, interleaved with the other rows' decoding: gpt2.sampling.decoder), or
   `stream_steps_per_run` (1) while a streamed request has rows running, so a stream gets each
   token as it is made rather than a few at a time (the same program: the iteration count is an
   argument of the run);
4. hand each row's new tokens (and log-probabilities when asked) to its job, and release the
   slots of finished rows at once, so their answers return at once.

A row's tokens depend only on its prompt, settings and seed, never on what else is running.

Speculative decoding (`draft=`: a `gpt2.sampling.speculative` DraftModel or PromptLookup, the
server's --draft-model / --prompt-lookup): a row admitted alone (no row in the pool, the only row
picked) runs on the uncompiled sampler with the draft (`speculative.decode_rows`), one round at a
time between the worker's other duties, unless it must go through the pool: it wants logprobs,
prompt + max_tokens exceeds the context (of the model or of the draft model; the pool slides the
window), or it samples (temperature > 0) with a seed the client gave (a seeded row's tokens must
not depend on what else is running, and speculative sampling draws other tokens than the pool from
the same distribution). When other rows are admitted while it runs, its current round ends first
(so a new request waits at most one round: the draft's proposals, at most `tokens` draft-model
steps or none for prompt lookup, and one model pass over the new tokens, the prompt on the first
round), then the row is handed to the pool: admitted into a slot with its prompt + the tokens
made so far, and its slot's penalty counts and generated count set to what plain decoding would
hold, so it goes on exactly as a pool row that had made those tokens (greedy: the same tokens;
sampled: the same distribution). It stays in the pool to its end. Greedy rows give the pool's
tokens either way; stop tokens, stop strings (the client marks the row unneeded), cancellation and
streaming (a stream gets each round's tokens at once) work as in the pool.

Failures: if a run raises, the rows in the pool get an error, the pool is reset and the worker
carries on; `max_failures` failures within a minute mark the engine unhealthy (requests and
/health answer 503). A worker thread found dead is restarted on the next request.

Events a job receives (Job.get): ("tokens", row, ids, infos, finished) where infos is None or
one (logprob, top ids int32 [5], top logprobs [5]) per id; or ("error", status, message, code).

Shapes: B = max_batch slots, K = steps_per_run (or stream_steps_per_run), T = 5 alternatives per token.
"""

import collections
import dataclasses
import logging
import threading
import time

from gpt2.sampling.settings import Row, SamplingSettings

log = logging.getLogger("gpt2.serve")

DEFAULT_STEPS_PER_RUN = 4
DEFAULT_STREAM_STEPS_PER_RUN = 1
FAILURE_WINDOW_SECONDS = 60.0
STAT_KEYS = ("requests", "rows", "rejected_queue_full", "cancelled", "admitted_rows", "finished_rows", "runs",
             "generated_tokens", "failures", "worker_restarts", "scored_prompts", "speculative_rows",
             "speculative_rounds", "handed_to_pool")


class QueueFull(Exception):
    """The queue already holds `max_queue` waiting rows."""


class Unavailable(Exception):
    """The engine is shutting down or unhealthy; `code` says which."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Job:
    """A request's rows (gpt2.serve.protocol.Row) and the channel its results come back on."""

    def __init__(self, rows, stream=False, seeded=False):
        if not rows:
            raise ValueError("a job needs at least one row")
        self.rows = list(rows)
        self.stream = bool(stream)
        self.seeded = bool(seeded)  # the client gave the seed: sampled rows go through the pool (see above)
        self.events = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self.cancelled = False
        self.unneeded = set()  # row indices whose output the client no longer needs
        self.next_row = 0  # rows before this one have been handed to the pool
        self.enqueued_at = None

    def put(self, event):
        with self._ready:
            self.events.append(event)
            self._ready.notify()

    def get(self, timeout=None):
        """The next event, or None after `timeout` seconds without one."""
        with self._ready:
            if not self.events and not self._ready.wait_for(lambda: self.events, timeout):
                return None
            return self.events.popleft()

    def mark_unneeded(self, row):
        """The client has all it wants from `row`: its slot may be freed."""
        self.unneeded.add(row)


class Engine:
    """Continuous batching of `model` over `max_batch` slots on a worker thread.

    max_queue: rows allowed to wait for a slot (submit raises QueueFull beyond). stop_token ends
    a row (<|endoftext|>). steps_per_run: loop iterations per compiled call (new rows join and
    finished rows leave between calls); stream_steps_per_run: the same while a streamed job has
    rows running (its tokens are handed out after each call). jit_compile: XLA. max_failures:
    failed runs within a minute before the engine reports itself unhealthy. draft: decode a row
    admitted alone speculatively (see the module docstring): a gpt2.DraftModel, gpt2.PromptLookup
    or "prompt-lookup" (None: never); draft_name: how /health names it.
    """

    def __init__(self, model, max_batch=8, max_queue=128, stop_token=50256, jit_compile=True,
                 steps_per_run=DEFAULT_STEPS_PER_RUN, max_failures=3,
                 stream_steps_per_run=DEFAULT_STREAM_STEPS_PER_RUN, draft=None, draft_name=None):
        from gpt2.sampling.pool import Pool  # imports TensorFlow

        if max_batch < 1 or max_queue < 1 or steps_per_run < 1 or stream_steps_per_run < 1:
            raise ValueError("max_batch, max_queue, steps_per_run and stream_steps_per_run must be >= 1")
        self.model = model
        self.n_ctx = model.hparams.n_ctx
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stop_token = stop_token
        self.jit_compile = jit_compile
        self.steps_per_run = steps_per_run
        self.stream_steps_per_run = stream_steps_per_run
        self.max_failures = max_failures
        self.pool = Pool(model, max_batch, jit_compile=jit_compile, iterations=max(steps_per_run, stream_steps_per_run))
        self.draft = None
        if draft is not None:
            from gpt2.sampling import speculative

            self.draft = speculative.as_draft(draft)
            own = getattr(self.draft, "model", model).hparams
            if own.n_vocab != model.hparams.n_vocab:
                raise ValueError(f"the draft model's vocabulary ({own.n_vocab} tokens) differs from the model's "
                                 f"({model.hparams.n_vocab}); use a draft model of the same family")
            self.draft_context = min(own.n_ctx, self.n_ctx)  # prompt + max_tokens of a speculative row
            self.draft_name = draft_name or ("prompt-lookup" if isinstance(self.draft, speculative.PromptLookup)
                                             else "draft model")
        self._running = {}  # slot -> (job, row index); the worker's alone
        self._speculation = None  # the _Speculation running outside the pool; the worker's alone
        self._waiting = collections.deque()  # jobs with rows not yet admitted
        self._waiting_rows = 0
        self._lock = threading.Condition()
        self._score_lock = threading.Lock()
        self._paused = False
        self._draining = False
        self._stopping = False
        self._failures = collections.deque()
        self.unhealthy = None  # why, once the engine gave up
        self._thread = None
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.score_lengths = sorted({min(128, self.n_ctx), self.n_ctx})
        self.step_seconds = 0.05  # running estimate of one loop iteration's time

    # ------------------------------------------------------------------ client side

    def submit(self, job):
        """Queues a job; raises QueueFull or Unavailable."""
        with self._lock:
            if self._draining or self._stopping:
                raise Unavailable("the server is shutting down", "shutting_down")
            if self.unhealthy:
                raise Unavailable(f"the server is unhealthy: {self.unhealthy}", "unhealthy")
            self._ensure_worker()
            rows = len(job.rows)
            if self._waiting_rows + rows > self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"the server is busy ({self._waiting_rows} rows waiting, at most {self.max_queue}); "
                                "retry later")
            job.enqueued_at = time.monotonic()
            self._waiting.append(job)
            self._waiting_rows += rows
            self.stats["requests"] += 1
            self.stats["rows"] += rows
            self._lock.notify_all()

    def cancel(self, job):
        """The client went away: its waiting rows leave the queue now, its running rows at the
        worker's next step."""
        with self._lock:
            if job.cancelled:
                return
            job.cancelled = True
            self.stats["cancelled"] += 1
            if job in self._waiting:
                self._waiting.remove(job)
                self._waiting_rows -= len(job.rows) - job.next_row
            self._lock.notify_all()

    def pause(self):
        """Admits no new rows until `resume()` (running rows go on); for maintenance and tests."""
        with self._lock:
            self._paused = True

    def resume(self):
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def queue_state(self):
        with self._lock:
            return {"waiting_requests": len(self._waiting), "waiting_rows": self._waiting_rows,
                    "running_rows": self._busy_slots(),
                    "max_queue": self.max_queue}

    def status(self):
        """"ok", "stopping" or "unhealthy"."""
        if self.unhealthy:
            return "unhealthy"
        if self._draining or self._stopping:
            return "stopping"
        return "ok" if self._thread is None or self._thread.is_alive() else "unhealthy"

    def health(self):
        health = {"status": self.status(), "error": self.unhealthy, "max_batch": self.max_batch,
                  "steps_per_run": self.steps_per_run, "stream_steps_per_run": self.stream_steps_per_run,
                  "queue": self.queue_state(), "stats": dict(self.stats),
                  "compiled_programs": self.pool.tracing_count()}
        if self.draft is not None:
            stats = self.draft.stats
            health["speculative"] = {"draft": self.draft_name, "draft_tokens": self.draft.tokens,
                                     **dataclasses.asdict(stats), "acceptance": round(stats.acceptance, 4)}
        return health

    # ------------------------------------------------------------------ scoring (echo + logprobs)

    def score(self, prompts):
        """OpenAI echo logprobs of each prompt (token lists of 1..n_ctx tokens): a
        gpt2.scoring.TokenScores per prompt with 5 alternatives, the first token's null (NaN).
        Rows are padded to one of `score_lengths`, so the programs compiled by warm_up serve all."""
        from gpt2.scoring import echo_logprobs

        padded = []
        for tokens in prompts:
            length = next(n for n in self.score_lengths if n >= len(tokens) - 1)
            padded.append(list(tokens) + [0] * (length + 1 - len(tokens)))
        with self._score_lock:
            scores = echo_logprobs(self.model, padded, top_n=5, batch_size=1, jit_compile=self.jit_compile)
            self.stats["scored_prompts"] += len(prompts)
        return [type(s)(*(part[:len(tokens)] for part in s)) for s, tokens in zip(scores, prompts)]

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self, log_fn=log.info):
        """Compiles everything requests use, before serving: the pool's program (run through
        admissions while other rows run, as serving does) and the scoring programs."""
        start = time.perf_counter()
        pool = self.pool
        greedy = SamplingSettings(temperature=0.0)
        pool.admit([0], [Row([self.stop_token], greedy, 0, 2 * self.steps_per_run)])
        pool.run()
        if self.max_batch > 1:  # a row joining a running one, with logprobs
            pool.admit([1], [Row([self.stop_token] * 2, greedy, 0, 2, logprobs=True)])
        while pool.active.any():
            _, done, _ = pool.run()
            pool.release([slot for slot in range(self.max_batch) if done[slot] and pool.active[slot]])
        pool.release_all()
        log_fn(f"compiled the decode program for {self.max_batch} slots in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        from gpt2.sampling.pool import stable_names

        for n in self.score_lengths:  # names independent of the process's history: the disk cache finds them
            with stable_names(("gpt2.serve score", self.model.hparams, self.model.dtype_policy.name, n,
                               self.jit_compile)):
                self.score([[self.stop_token] * min(n + 1, self.n_ctx)])
        log_fn(f"compiled the scoring programs (prompt lengths up to {', '.join(map(str, self.score_lengths))}) "
               f"in {time.perf_counter() - start:.1f} s")
        if self.draft is not None:
            start = time.perf_counter()
            self._warm_up_speculation()
            log_fn(f"traced the speculative path ({self.draft_name}) in {time.perf_counter() - start:.1f} s")
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def _warm_up_speculation(self):
        """Traces (and runs once) every function a speculative row calls, for the model and a draft
        model, greedy and sampled: each is traced once for any shape, so nothing is traced while serving."""
        from gpt2.sampling import direct, speculative

        t = self.stop_token
        for settings in (SamplingSettings(temperature=0.0), SamplingSettings(temperature=1.0)):
            # a repeated prompt: prompt lookup proposes drafts, so the verification runs too
            for _ in speculative.decode_rows(self.model, [Row([t] * 4, settings, 0, 4)], self.draft):
                pass
        for _ in direct.decode_rows(self.model, [Row([t], SamplingSettings(temperature=0.0), 0, 2)]):
            pass
        for sampler in self.speculative_samplers():
            for function in (sampler.step, sampler.logits, sampler.choose, sampler.choose_with_probs):
                function.get_concrete_function()
        self.draft.stats = speculative.Stats()

    def speculative_samplers(self):
        """The uncompiled samplers the speculative path runs (the model's, a draft model's); [] without a draft."""
        from gpt2.sampling import direct

        if self.draft is None:
            return []
        models = [self.model, getattr(self.draft, "model", self.model)]
        return list({id(model): direct.sampler_for(model) for model in models}.values())

    def start(self):
        """Starts the worker thread."""
        with self._lock:  # a Condition's RLock: _ensure_worker calls this holding it
            self._thread = threading.Thread(target=self._serve, name="gpt2-serve-engine", daemon=True)
            self._thread.start()

    def _ensure_worker(self):
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            log.warning("the decode worker had stopped; restarting it")
            self.stats["worker_restarts"] += 1
            self.start()

    def shutdown(self, grace=10.0):
        """Stops: waiting rows fail at once (503), running rows get up to `grace` seconds to finish,
        then are cut short (their clients get an error), and the worker ends."""
        with self._lock:
            self._draining = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._waiting_rows = 0
            self._lock.notify_all()
        for job in waiting:
            job.put(("error", 503, "the server is shutting down", "shutting_down"))
        deadline = time.monotonic() + grace
        with self._lock:
            while ((self._running or self._speculation is not None) and time.monotonic() < deadline
                   and self._thread is not None and self._thread.is_alive()):
                self._lock.wait(min(0.05, max(deadline - time.monotonic(), 0)))
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    # ------------------------------------------------------------------ worker

    def _serve(self):
        while True:
            try:
                self._loop()
                return
            except BaseException as error:  # noqa: BLE001 - the worker must outlive any failure
                if not self._failed(error):
                    return

    def _failed(self, error):
        """A run failed: fail its rows, reset the pool; False once the engine gives up."""
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        rows = self._fail_running(500, f"generation failed: {message}", "generation_failed")
        log.error("decoding failed (%s); %d running rows get an error", message, rows)
        log.debug("decoding failure", exc_info=error)
        now = time.monotonic()
        with self._lock:
            self.stats["failures"] += 1
            self._failures.append(now)
            while self._failures and now - self._failures[0] > FAILURE_WINDOW_SECONDS:
                self._failures.popleft()
            if len(self._failures) < self.max_failures and not self._stopping:
                self.stats["worker_restarts"] += 1
                return True
            self.unhealthy = f"{len(self._failures)} decoding failures within a minute, the last: {message}"
            waiting = list(self._waiting)
            self._waiting.clear()
            self._waiting_rows = 0
        log.error("giving up: %s", self.unhealthy)
        for job in waiting:
            job.put(("error", 503, f"the server is unhealthy: {self.unhealthy}", "unhealthy"))
        return False

    def _loop(self):
        while True:
            self._drop_unwanted()
            with self._lock:
                if self._stopping:
                    self._fail_running(503, "the server is shutting down; the answer was cut short", "shutting_down")
                    return
                if not self._running and self._speculation is None and not self._admissible():
                    self._lock.wait()
                    continue
                picks = self._pick() if self._admissible() else []
            if picks and self._speculation is not None:
                self._hand_to_pool()  # others join: the speculative row continues in the pool
            if len(picks) == 1 and not self._running and self._speculable(*picks[0]):
                self._speculate(*picks[0])
            elif picks:
                self._admit(picks)
            if self._speculation is not None:
                self._speculation_round()
            elif self._running:
                self._step()

    def _busy_slots(self):
        """Slots taken: the pool's rows, and one kept for a speculative row (it may be handed over)."""
        return len(self._running) + (self._speculation is not None)

    def _admissible(self):
        return bool(self._waiting) and not self._paused and not self._draining and self._busy_slots() < self.max_batch

    def _pick(self):
        """[(job, row index)] for the free slots: each waiting request (in the order of the module
        docstring) gets up to an equal share of them, then what is left goes in that order."""
        free = self.max_batch - self._busy_slots()
        picks = []
        share = max(1, free // len(self._waiting))
        order = sorted(self._waiting, key=lambda job: job.enqueued_at + job.rows[0].max_new * self.step_seconds)
        for fair in (True, False):
            for job in order:
                if job.next_row == len(job.rows):
                    continue
                take = min(len(job.rows) - job.next_row, free - len(picks), share if fair else free)
                picks += [(job, job.next_row + i) for i in range(take)]
                job.next_row += take
                self._waiting_rows -= take
                if job.next_row == len(job.rows):
                    self._waiting.remove(job)
        return picks

    def _admit(self, picks):
        slots = [slot for slot in range(self.max_batch) if slot not in self._running][: len(picks)]
        rows = [dataclasses.replace(job.rows[i], stop_token=self.stop_token) for job, i in picks]
        self.pool.admit(slots, rows)
        self._running.update(zip(slots, picks))
        self.stats["admitted_rows"] += len(picks)

    def _drop_unwanted(self):
        speculation = self._speculation
        if speculation is not None and (speculation.job.cancelled or speculation.index in speculation.job.unneeded):
            self._end_speculation()
            with self._lock:
                self._lock.notify_all()
        self._release([slot for slot, (job, i) in self._running.items() if job.cancelled or i in job.unneeded])

    def _release(self, slots):
        """Frees pool `slots` (waking whoever waits for a free slot or an idle engine)."""
        if slots:
            self.pool.release(slots)
            for slot in slots:
                del self._running[slot]
            with self._lock:
                self._lock.notify_all()

    def _step(self):
        start = time.perf_counter()
        streaming = any(job.stream for job, _ in self._running.values())
        outputs, done, _ = self.pool.run(self.stream_steps_per_run if streaming else self.steps_per_run)
        tokens = outputs["tokens"]
        if tokens.shape[1]:
            self.step_seconds += 0.1 * ((time.perf_counter() - start) / tokens.shape[1] - self.step_seconds)
        self.stats["runs"] += 1
        finished = []
        for slot, (job, i) in self._running.items():
            made = tokens[slot] >= 0
            ids = tokens[slot][made].tolist()
            if not ids and not done[slot]:
                continue
            infos = None
            if job.rows[i].logprobs:
                infos = list(zip(outputs["logprobs"][slot][made].tolist(), outputs["top_ids"][slot][made],
                                 outputs["top_logprobs"][slot][made]))
            self.stats["generated_tokens"] += len(ids)
            job.put(("tokens", i, ids, infos, bool(done[slot])))
            if done[slot]:
                finished.append(slot)
        self.stats["finished_rows"] += len(finished)
        self._release(finished)

    def _fail_running(self, status, message, code):
        """Every running row (in the pool or speculative) gets an error event and its slot freed;
        returns their number."""
        jobs = {job for job, _ in self._running.values()}
        rows = self._busy_slots()
        if self._speculation is not None:
            jobs.add(self._speculation.job)
            self._end_speculation()
        for job in jobs:
            job.put(("error", status, message, code))
        self._running.clear()
        try:
            self.pool.release_all()
        except Exception:  # noqa: BLE001 - after a failed run the pool may be broken: the next run reports it
            pass
        return rows

    # ------------------------------------------------------------------ speculative decoding (one row)

    def _speculable(self, job, i):
        """Whether row i of job may run speculatively (see the module docstring)."""
        from gpt2.sampling import speculative
        from gpt2.sampling.settings import SettingsError

        row = job.rows[i]
        if (self.draft is None or (job.seeded and row.settings.temperature > 0)
                or len(row.prompt) + row.max_new > self.draft_context):
            return False
        try:
            speculative.check(self.model, [row])  # what it refuses: logprobs, past the context
        except SettingsError:
            return False
        return True

    def _speculate(self, job, i):
        from gpt2.sampling import speculative

        row = dataclasses.replace(job.rows[i], stop_token=self.stop_token)
        self._speculation = _Speculation(job, i, row, speculative.decode_rows(self.model, [row], self.draft))
        self.stats["admitted_rows"] += 1
        self.stats["speculative_rows"] += 1

    def _speculation_round(self):
        """One round of the speculative row: its tokens go to the job; a finished row ends."""
        speculation = self._speculation
        ids = [token for _, token, _ in next(speculation.rounds)]
        speculation.tokens += ids
        row = speculation.row
        done = len(speculation.tokens) >= row.max_new or ids[-1] == row.stop_token
        self.stats["speculative_rounds"] += 1
        self.stats["generated_tokens"] += len(ids)
        speculation.job.put(("tokens", speculation.index, ids, None, done))
        if done:
            self._end_speculation()
            self.stats["finished_rows"] += 1
            with self._lock:
                self._lock.notify_all()

    def _end_speculation(self):
        """Stops the speculative row (its caches are freed)."""
        speculation, self._speculation = self._speculation, None
        speculation.rounds.close()

    def _hand_to_pool(self):
        """The speculative row goes on in a pool slot as a row that made its tokens there: its
        prompt + those tokens are ingested, and its penalty counts and generated count (the
        position in its random stream, and what max_new is compared with) are what the pool's
        own decoding would hold after them."""
        import numpy as np

        speculation = self._speculation
        self._end_speculation()
        slot = next(slot for slot in range(self.max_batch) if slot not in self._running)
        row, made = speculation.row, speculation.tokens
        self.pool.admit([slot], [dataclasses.replace(row, prompt=list(row.prompt) + made)])
        index = np.array([[slot]], np.int32)
        counts = np.bincount(np.array(made, np.int64), minlength=self.pool.n_vocab).astype(np.int32)
        self.pool.state["counts"].scatter_nd_update(index, counts[None])
        self.pool.state["generated"].scatter_nd_update(index, np.array([len(made)], np.int32))
        self._running[slot] = (speculation.job, speculation.index)
        self.stats["handed_to_pool"] += 1


@dataclasses.dataclass
class _Speculation:
    """The row decoded speculatively: its job and index there, the Row (with the stop token), the
    generator of its rounds (speculative.decode_rows) and the tokens it made so far."""

    job: Job
    index: int
    row: Row
    rounds: object
    tokens: list = dataclasses.field(default_factory=list)
