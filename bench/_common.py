"""Helpers shared by the benchmark scripts: paths, the random-checkpoint cache, memory
measurement (RSS, memory bandwidth) and markdown tables.

Nothing here imports TensorFlow: the driver processes stay small, and only their worker
subprocesses load a framework.
"""

import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import time

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


def run_child(script, args, what, timeout):
    """Runs `python script args...` from the repository root and returns the last JSON line it
    printed; RuntimeError naming `what` (with the end of its stderr) if it failed."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), timeout=timeout,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- checkpoints

def param_count(hp):
    """Parameters of a GPT-2 of hparams `hp` (dict): embeddings, 12 blocks' weights, final norm."""
    d, v, c, n = hp["n_embd"], hp["n_vocab"], hp["n_ctx"], hp["n_layer"]
    per_block = 12 * d * d + 13 * d  # attn qkv+proj, mlp fc+proj (4d), 2 layer norms, biases
    return v * d + c * d + n * per_block + 2 * d


def decode_weight_bytes(hp):
    """fp32 bytes one batch-1 decode step must read: every weight except wpe (one row of it)."""
    return 4 * (param_count(hp) - hp["n_ctx"] * hp["n_embd"] + hp["n_embd"])


def cached_checkpoint(shape, seed=0, log=print):
    """Folder of a random-weight checkpoint of preset `shape` in OpenAI's layout, written once
    with the project's own writer (`python -m gpt2.checkpoint --random`) under bench/.cache/."""
    if shape not in PRESET_SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(PRESET_SHAPES)}")
    model_dir = os.path.join(CACHE_DIR, shape)
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
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
