"""Helpers shared by the benchmark scripts: paths, the random-checkpoint cache, the worker
processes (one protocol for every script), memory measurement (RSS, memory bandwidth) and
markdown tables.

Nothing here imports TensorFlow: the driver processes stay small, and only their worker
subprocesses load a framework.
"""

import concurrent.futures
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
CACHE_DIR = os.path.join(BENCH_DIR, ".cache")

# The five numbers of each preset (mirrors gpt2.hparams.PRESETS, so drivers need not import gpt2).
PRESET_SHAPES = {
    "124M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "355M": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}
CHECKPOINT_FILES = ("hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
MiB = 1 << 20


def use_repo_checkout():
    """Makes `import gpt2` find this checkout even without `pip install -e`."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def child_env(**extra):
    """Environment for a worker subprocess: this checkout importable, TF's INFO chatter off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def log_dir(script):
    """bench/.cache/logs/<script's name>/ (created): where its workers' stderr goes."""
    folder = os.path.join(CACHE_DIR, "logs", os.path.splitext(os.path.basename(script))[0])
    os.makedirs(folder, exist_ok=True)
    return folder


def log_path(script, name):
    """log_dir(script)/<name>.log."""
    return os.path.join(log_dir(script), name + ".log")


# ----------------------------------------------------------------------------- workers
# Every measurement that needs a fresh process runs in a worker: the script itself started with
# `--_worker`, driven over a pipe by a `Worker` in the driver. The protocol, one JSON object a line:
#   driver -> worker: the spec (any JSON object), then commands {"cmd": NAME}, last {"cmd": "exit"};
#   worker -> driver: {"event": "ready", **info} (or "skip" with a reason, "error" with an error),
#                     then one answer per command ({"event": NAME, **result}, or "error"),
#                     and {"event": "bye", "peak_rss": BYTES} for "exit" (or at the end of its input).
# The worker's own stdout is its stderr (libraries print), and its stderr goes to a log file.
# A one-shot measurement is a worker answering one command: see run_once.

class Skip(Exception):
    """Raised by a worker's setup: the system cannot run here (package missing, option unsupported);
    reported as "skipped", not as an error."""


def one_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def serve_worker(setup):
    """The worker side: reads the spec from stdin, calls `setup(spec)` -> (handlers, info) where
    handlers maps command names to functions of no arguments returning a dict; sends "ready" with
    info (or "skip"/"error" and returns), then answers commands until "exit" or the end of its
    input, and says "bye" with its own peak RSS. An exception in a handler is sent as "error" (its
    traceback goes to the log) and ends the worker."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's channel, private
    os.dup2(2, 1)  # libraries' prints go to the log

    def send(**message):
        proto.write(json.dumps(message) + "\n")

    spec = json.loads(sys.stdin.readline())
    try:
        handlers, info = setup(spec)
    except Skip as why:
        return send(event="skip", reason=str(why))
    except Exception as error:  # noqa: BLE001 - reported by the driver
        traceback.print_exc()
        return send(event="error", error=one_line(error))
    send(event="ready", **info)
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "exit":
            break
        try:
            send(event=cmd, **handlers[cmd]())
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            return send(event="error", error=one_line(error))
    send(event="bye", peak_rss=peak_rss_bytes())


class Worker:
    """The driver side of one worker process (`python script --_worker`, cwd the repository root,
    child_env(**env), stderr to log_path). start(spec) -> the ready info; request(cmd) -> the
    answer; finish() -> the worker's peak RSS (bytes, from its "bye"). Each returns None once the
    worker is unhealthy, and then `status` says why: "skipped: ..." or "failed: ... (log: PATH)"."""

    def __init__(self, script, log_path, name=None, env=None, timeout=3600):
        self.script, self.log_path, self.name, self.env, self.timeout = script, log_path, name, env or {}, timeout
        self.status, self.info, self.peak_rss, self.proc = None, {}, None, None

    def start(self, spec):
        """Starts the worker and waits until it is ready (its setup done)."""
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(self.script), "--_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=REPO_ROOT, env=child_env(**self.env),
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._send(spec)
        self.info = self._receive() or {}
        return self.info or None

    def request(self, cmd):
        """Sends one command; returns the worker's answer (a dict with "event": cmd)."""
        if self.status:
            return None
        self._send({"cmd": cmd})
        return self._receive()

    def finish(self):
        """Asks a healthy worker to exit, ends the process; returns its peak RSS (None if unknown)."""
        if not self.status and self.proc:
            bye = self.request("exit")
            self.peak_rss = bye and bye["peak_rss"]
        self.close()
        return self.peak_rss

    def close(self):
        if self.proc is None or self.log.closed:
            return
        try:
            self.proc.stdin.close()  # a healthy worker ends at the end of its input
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def _send(self, message):
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the worker is gone: _receive says so
            pass

    def _receive(self):
        if not self.selector.select(self.timeout):
            self.proc.kill()
            answer = {"event": "error", "error": f"no answer within {self.timeout:.0f} s (killed)"}
        else:
            line = self.proc.stdout.readline()
            answer = json.loads(line) if line else {"event": "error", "error": f"worker exited ({self.proc.wait()})"}
        if answer["event"] == "skip":
            self.status = "skipped: " + answer["reason"]
        elif answer["event"] == "error":
            self.status = f"failed: {answer['error']} (log: {self.log_path})"
        else:
            return answer
        self.close()
        return None


def run_once(script, spec, log_path, timeout=3600):
    """A one-shot measurement: a fresh worker of `script`, ready with `spec`, answers the command
    "run" and exits. Returns the answer with the worker's peak RSS added ("peak_rss"); RuntimeError
    with the worker's status (and the end of its log) if it skipped or failed."""
    worker = Worker(script, log_path, timeout=timeout)
    answer = worker.start(spec) and worker.request("run")
    peak = worker.finish()
    if worker.status:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"{os.path.basename(log_path)}: {worker.status}\n{f.read()[-2000:]}")
    return dict(answer, peak_rss=peak)


# ----------------------------------------------------------------------------- checkpoints

def param_count(hp):
    """Parameters of a GPT-2 of hparams `hp` (dict): embeddings, 12 blocks' weights, final norm."""
    d, v, c, n = hp["n_embd"], hp["n_vocab"], hp["n_ctx"], hp["n_layer"]
    per_block = 12 * d * d + 13 * d  # attn qkv+proj, mlp fc+proj (4d), 2 layer norms, biases
    return v * d + c * d + n * per_block + 2 * d


def decode_weight_bytes(hp):
    """fp32 bytes one batch-1 decode step must read: every weight except wpe (one row of it)."""
    return 4 * (param_count(hp) - hp["n_ctx"] * hp["n_embd"] + hp["n_embd"])


def cached_checkpoint(shape, seed=0, log=print, root=CACHE_DIR):
    """Folder of a random-weight checkpoint of preset `shape` in OpenAI's layout, written once
    with the project's own writer (`python -m gpt2.checkpoint --random`) to root/<shape>
    (default: bench/.cache/)."""
    if shape not in PRESET_SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(PRESET_SHAPES)}")
    model_dir = os.path.join(root, shape)
    if _checkpoint_complete(model_dir, PRESET_SHAPES[shape]):
        return model_dir
    log(f"writing a random {shape} checkpoint to {model_dir} (once; cached) ...")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "gpt2.checkpoint", "--random", shape, model_dir, "--seed", str(seed)],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
    )
    if result.returncode != 0 or not _checkpoint_complete(model_dir, PRESET_SHAPES[shape]):
        raise SystemExit(
            f"could not write the {shape} checkpoint (exit {result.returncode}):\n{result.stderr[-3000:]}"
        )
    log(f"  done in {time.perf_counter() - start:.1f} s")
    return model_dir


def _checkpoint_complete(model_dir, shape):
    # The writer moves `checkpoint` into place last, so its presence means the rest is whole.
    if not all(os.path.isfile(os.path.join(model_dir, f)) for f in CHECKPOINT_FILES):
        return False
    try:
        with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
            return json.load(f) == shape
    except (OSError, ValueError):
        return False


def cached_hf_folder(shape, log=print):
    """Folder of the random `shape` checkpoint in Hugging Face's layout, converted once from
    cached_checkpoint(shape) with `python -m gpt2.convert --to hf` into bench/.cache/<shape>-hf/."""
    return convert_to_hf(cached_checkpoint(shape, log=log), os.path.join(CACHE_DIR, f"{shape}-hf"), log=log)


def convert_to_hf(src, dst, log=print):
    """`python -m gpt2.convert --to hf src dst`, once: an existing dst (written whole, since the
    converter renames a finished folder into place) is kept."""
    if os.path.isfile(os.path.join(dst, "model.safetensors")):
        return dst
    log(f"converting {src} to a Hugging Face folder {dst} (once; cached) ...")
    result = subprocess.run([sys.executable, "-m", "gpt2.convert", "--to", "hf", src, dst],
                            cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"could not convert {src} (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return dst


def read_hparams(model_dir):
    with open(os.path.join(model_dir, "hparams.json"), encoding="utf-8") as f:
        return json.load(f)


def data_file_bytes(model_dir):
    """Bytes of a model folder's weight files (OpenAI's checkpoint data or safetensors)."""
    return sum(
        os.path.getsize(os.path.join(model_dir, f))
        for f in os.listdir(model_dir) if f.startswith("model.ckpt.data-") or f.endswith(".safetensors")
    )


def warm_page_cache(model_dir):
    """Reads the checkpoint's files once so that timed loads do not measure the disk."""
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            while f.read(64 * MiB):
                pass


# ----------------------------------------------------------------------------- memory

def peak_rss_bytes():
    """This process's peak resident set size so far, or since the last reset_peak_rss(): VmHWM
    (Linux). Not getrusage's ru_maxrss: that survives exec, so a worker started by a driver that
    once held 1 GiB would report at least 1 GiB (subprocess starts children with vfork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss():
    """Sets this process's peak RSS (VmHWM) back to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_rss_bytes():
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_bandwidth(size_bytes=1 << 30, repeats=5, threads=None):
    """Best-of-`repeats` read bandwidth in bytes/s: `threads` threads (default: all cores) each
    sum their own slice of a float32 buffer much larger than the caches (numpy drops the GIL in
    reductions, so the slices are read in parallel). Returns (bytes_per_s, threads)."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    buf = np.ones(size_bytes // 4, np.float32)  # written once, so every page is really mapped
    chunks = np.array_split(buf, threads)
    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, buf.nbytes / (time.perf_counter() - start))
    del buf, chunks
    return best, threads


# ----------------------------------------------------------------------------- tables

def median(values):
    return statistics.median(values) if values else float("nan")


def markdown_table(headers, rows, align=None):
    """Markdown table; `align` is a string of 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)
        ) + " |"

    rule = "|" + "|".join(
        ":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":" for w, a in zip(widths, align)
    ) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def with_ratio(value, ours, fmt="{:.1f}"):
    """'12.3 (1.45x)': a figure and its ratio to this project's figure (value / ours)."""
    if value is None:
        return "-"
    text = fmt.format(value)
    if ours:
        text += f" ({value / ours:.2f}x)"
    return text


# ----------------------------------------------------------------------------- the HTTP server

def start_server(repo, model_dir, args, log_path, model_id="bench"):
    """Starts `python -m gpt2.serve` of checkout `repo` on a free port (stderr to log_path) and
    waits until it serves; returns (process, base URL, seconds to ready). stop_server ends it."""
    import re

    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="2")
    log = open(log_path, "w", encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2.serve", "--model", model_dir, "--model-id", model_id,
                             "--port", "0", "--log-level", "warning", *args],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    match = re.search(r"on (http://\S+)", line)
    if not match:
        proc.kill()
        log.close()
        with open(log_path, encoding="utf-8") as f:
            raise SystemExit(f"server did not start:\n{line}{f.read()[-3000:]}")
    proc.log = log
    return proc, match.group(1), time.perf_counter() - start


def stop_server(proc):
    """SIGTERM, then waits (kills after a minute)."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()
