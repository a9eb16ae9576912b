"""The server's batching engine: one worker thread owns the model and runs the compiled sampler
on batches collected from concurrent requests.

A request is a `Job` of one or more rows (a row = one prompt to complete: `n` choices of `k`
prompts make k*n rows). Jobs wait in a FIFO queue; the worker takes the oldest waiting row, then
keeps collecting for at most `batch_window` seconds (measured from the oldest row's arrival, so
rows that queued up during the previous batch start at once) or until `max_batch` rows are
ready, and runs them as one call of `gpt2.sample.sample_rows`. The batch is padded with dummy
rows (prompt <|endoftext|>, 1 new token) to a bucket size (1, 2, 4, ..., max_batch) so that the
compiled functions see a handful of shapes rather than one per batch size. A job's rows may
span several batches (e.g. n=20 with max_batch 8).

Results flow back through each job's `events` queue as (row, tokens, finished) tuples. Batches
with no streaming row run the whole decode as one compiled call (fastest) and report each row
once at the end; batches with a streaming row run the step-by-step path and report every row's
token after each step, so streaming clients see text as it is produced and non-streaming rows
finish as soon as their own row is done.

Cancellation (a client went away): a job that has not started leaves the queue at once. Rows
already in a running batch keep computing until that batch ends, except that a streaming-path
batch whose every unfinished row is cancelled (or no longer needed, e.g. a stop string matched)
is abandoned at the next step.
"""

import collections
import logging
import threading
import time

import numpy as np

log = logging.getLogger("gpt2.serve")


STAT_KEYS = (
    "requests", "rows", "rejected_queue_full", "cancelled", "batches", "batched_rows", "padded_rows",
    "largest_batch", "abandoned_batches", "generated_tokens",
)


class QueueFull(Exception):
    """The engine already holds `max_queue` waiting requests."""


class _Abandon(Exception):
    """Raised from the sampler's callback to stop a batch nobody is waiting for."""


class Row:
    """One completion to generate. seed: int32 (the row's own random stream)."""

    __slots__ = ("prompt", "length", "temperature", "top_k", "top_p", "seed")

    def __init__(self, prompt, length, temperature=1.0, top_k=0, top_p=1.0, seed=0):
        self.prompt = list(prompt)
        self.length = int(length)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.seed = int(np.int32(seed))


class Job:
    """A request's rows and the channel its results come back on.

    events: a queue of (row index, list of new token ids, finished) from the worker, or
    ("error", message, True) if the batch failed. `stream` asks for per-step events.
    """

    def __init__(self, rows, stream=False):
        if not rows:
            raise ValueError("a job needs at least one row")
        self.rows = list(rows)
        self.stream = bool(stream)
        self.events = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self.cancelled = False
        self.unneeded = set()  # row indices whose output the client no longer needs
        self.enqueued_at = None
        self.next_row = 0  # rows before this one have been handed to a batch

    # -- worker side
    def _put(self, event):
        with self._ready:
            self.events.append(event)
            self._ready.notify()

    # -- client side
    def get(self, timeout=None):
        """The next event, or None after `timeout` seconds without one."""
        with self._ready:
            if not self.events and not self._ready.wait_for(lambda: self.events, timeout):
                return None
            return self.events.popleft()

    def mark_unneeded(self, row):
        """The client has all it wants from `row` (it may stop being computed)."""
        self.unneeded.add(row)


def batch_buckets(max_batch):
    """Batch sizes the engine compiles for: powers of two below max_batch, then max_batch."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class BatchEngine:
    """Owns `model` on a worker thread; `submit(job)` from any thread.

    max_batch: rows per sampler call. batch_window: seconds to wait for more rows after the
    oldest waiting one arrived. max_queue: waiting requests (not yet fully started) allowed;
    `submit` raises QueueFull beyond. stop_token: ends a row (<|endoftext|>).
    """

    def __init__(self, model, max_batch=8, batch_window=0.01, max_queue=64, stop_token=50256,
                 jit_compile=True):
        from gpt2.sampling import api as sample  # imports TensorFlow

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._sample = sample
        self.model = model
        self.n_ctx = model.hparams.n_ctx
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_queue = max_queue
        self.stop_token = stop_token
        self.jit_compile = jit_compile
        self.buckets = batch_buckets(max_batch)
        self._waiting = collections.deque()  # jobs with rows not yet handed to a batch
        self._waiting_rows = 0
        self._lock = threading.Condition()
        self._paused = False
        self._stopping = False
        self._thread = None
        # Counters for /health (all keys exist from the start, so snapshots never race inserts).
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.shapes_seen = set()  # (batch bucket, streaming) pairs compiled so far

    # ------------------------------------------------------------------ client side

    def submit(self, job):
        """Queues a job (its rows run in FIFO order); raises QueueFull if the queue is full."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"the server is busy ({len(self._waiting)} requests waiting); retry later")
            job.enqueued_at = time.monotonic()
            self._waiting.append(job)
            self._waiting_rows += len(job.rows) - job.next_row
            self.stats["requests"] += 1
            self.stats["rows"] += len(job.rows)
            self._lock.notify_all()

    def cancel(self, job):
        """The client went away: drop its waiting rows; running rows finish their batch."""
        with self._lock:
            if job.cancelled:
                return
            job.cancelled = True
            self.stats["cancelled"] += 1
            if job in self._waiting:
                self._waiting.remove(job)
                self._waiting_rows -= len(job.rows) - job.next_row

    def queue_state(self):
        with self._lock:
            return {"waiting_requests": len(self._waiting), "waiting_rows": self._waiting_rows,
                    "max_queue": self.max_queue}

    def pause(self):
        """Starts no new batch until `resume()` (the running one finishes); for maintenance and tests."""
        with self._lock:
            self._paused = True

    def resume(self):
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self, lengths=(16,), batches=None, log_fn=log.info):
        """Compiles the shapes that short prompts (<= 32 tokens) use, before serving: for each
        batch size in `batches` (default: 1 and max_batch) and each cache bucket that `lengths`
        new tokens need, both the one-call and the streaming path. Runs on the calling thread
        (call it before `start`). Lengths that do not fit the context are skipped."""
        sample = self._sample
        batches = sorted(set(batches or (1, self.max_batch)))
        for batch in batches:
            start = time.perf_counter()
            sample.sample_rows(self.model, [[self.stop_token]] * batch, 2, temperature=0.0,
                               seeds=np.zeros(batch, np.int32), jit_compile=self.jit_compile)
            self.shapes_seen.add((batch, False))
            log_fn(f"warm-up: batch {batch}: {time.perf_counter() - start:.1f} s")

    def start(self):
        self._thread = threading.Thread(target=self._run, name="gpt2-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout=None):
        with self._lock:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._waiting_rows = 0
            self._lock.notify_all()
        for job in waiting:
            job._put(("error", "the server is shutting down", True))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _take_batch(self):
        """Blocks until rows are ready and the window has passed (or the batch is full); returns
        [(job, row index)] or None when stopping."""
        with self._lock:
            while True:
                while not self._stopping and (self._paused or not self._waiting):
                    self._lock.wait()
                if self._stopping:
                    return None
                deadline = self._waiting[0].enqueued_at + self.batch_window
                while (not self._stopping and not self._paused and self._waiting
                       and self._waiting_rows < self.max_batch and time.monotonic() < deadline):
                    self._lock.wait(max(deadline - time.monotonic(), 0))
                if self._stopping:
                    return None
                if self._paused or not self._waiting:  # paused, or all cancelled, meanwhile
                    continue
                taken = []
                while self._waiting and len(taken) < self.max_batch:
                    job = self._waiting[0]
                    count = min(len(job.rows) - job.next_row, self.max_batch - len(taken))
                    taken += [(job, job.next_row + i) for i in range(count)]
                    job.next_row += count
                    self._waiting_rows -= count
                    if job.next_row == len(job.rows):
                        self._waiting.popleft()
                return taken

    def _run(self):
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            try:
                self._run_batch(taken)
            except Exception as error:  # noqa: BLE001 - report to the clients, keep serving
                log.exception("batch failed")
                message = f"generation failed: {error}".splitlines()[0]
                for job in {job for job, _ in taken}:
                    job._put(("error", message, True))

    def _run_batch(self, taken):
        sample = self._sample
        real = len(taken)
        size = next(b for b in self.buckets if b >= real)
        rows = [job.rows[i] for job, i in taken]
        dummies = size - real
        prompts = [r.prompt for r in rows] + [[self.stop_token]] * dummies
        lengths = [r.length for r in rows] + [1] * dummies
        temperatures = [r.temperature for r in rows] + [0.0] * dummies
        top_ks = [r.top_k for r in rows] + [0] * dummies
        top_ps = [r.top_p for r in rows] + [1.0] * dummies
        seeds = np.array([r.seed for r in rows] + [0] * dummies, np.int32)
        streaming = any(job.stream for job, _ in taken)
        self.stats["batches"] += 1
        self.stats["batched_rows"] += real
        self.stats["padded_rows"] += dummies
        self.stats["largest_batch"] = max(self.stats["largest_batch"], real)
        self.shapes_seen.add((size, streaming))
        start = time.perf_counter()
        done = [False] * real

        def callback(step, tokens):
            live = False
            for b, (job, i) in enumerate(taken):
                if done[b]:
                    continue
                token = int(tokens[b])
                done[b] = token == self.stop_token or step + 1 >= lengths[b]
                job._put((i, [token], done[b]))
                self.stats["generated_tokens"] += 1
                live = live or not (done[b] or job.cancelled or i in job.unneeded)
            if not live and not all(done):
                raise _Abandon

        try:
            results = sample.sample_rows(
                self.model, prompts, lengths, temperatures, top_ks, top_ps, seeds,
                stop_token=self.stop_token, callback=callback if streaming else None,
                jit_compile=self.jit_compile,
            )
        except _Abandon:
            self.stats["abandoned_batches"] += 1
            for b, (job, i) in enumerate(taken):
                if not done[b]:
                    job._put((i, [], True))
            return
        if not streaming:
            for (job, i), tokens in zip(taken, results):
                self.stats["generated_tokens"] += len(tokens)
                job._put((i, tokens.tolist(), True))
        log.debug("batch of %d (+%d padding), %s path: %.2f s", real, dummies,
                  "streaming" if streaming else "one-call", time.perf_counter() - start)
