"""How long the user waits for the first text, and the peak memory of a generate.py run.

    python bench/startup.py [--shapes 124M] [--reps 3] [--length 32] [--dtypes float32]

For each shape (a random checkpoint in bench/.cache/<shape>/), the same interleaved reps of:

  import tf     `python -c "import tensorflow"`: the floor every TensorFlow program pays;
  first run     `python generate.py --model DIR --prompt ... --length N --seed 1` with an empty
                compilation cache (GPT2_CACHE_DIR pointed at a new folder). A short run (N x
                samples within the uncompiled sampler's budget, 256 tokens) compiles nothing: it
                traces the uncompiled sampler while loading, then generates; a longer one traces,
                lowers and XLA-compiles the compiled loop first;
  later run     the same command again with the cache that run filled: the usual case.

Each is a fresh process, timed wall-clock from start to exit (its text printed) with its peak
RSS (ru_maxrss of the child). The goals are stated against `import tf`: a later run within 4 s of
it, the first run ever within 8 s. The machine's load average is printed with the results: on a
shared machine, read the ratios, and rerun when it is quiet.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley"


def run(command, env):
    """Runs a child with os.wait4 to read its own peak RSS. Returns (seconds, peak MiB)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        process = subprocess.Popen(command, cwd=_common.REPO_ROOT, env=env, stdout=devnull,
                                   stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        error = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{error[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="124M", help="comma-separated: 124M,355M,774M,1558M (default: 124M)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16 (default: float32)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: 3)")
    parser.add_argument("--length", type=int, default=32, help="new tokens (default: 32)")
    args = parser.parse_args(argv)

    env = _common.child_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user runs it: generate.py sets its own
    rows = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        model_dir = _common.cached_checkpoint(shape)
        _common.warm_page_cache(model_dir)
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            generate = [sys.executable, "generate.py", "--model", model_dir, "--prompt", PROMPT,
                        "--length", str(args.length), "--seed", "1", "--dtype", dtype]
            results = {"import tf": [], "first run": [], "later run": []}
            for rep in range(args.reps):
                cache = tempfile.mkdtemp(prefix="gpt2-startup-cache-")
                try:
                    cached_env = dict(env, GPT2_CACHE_DIR=cache)
                    results["import tf"].append(run([sys.executable, "-c", "import tensorflow"], env))
                    results["first run"].append(run(generate, cached_env))
                    results["later run"].append(run(generate, cached_env))
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
                print(f"{shape} {dtype} rep {rep + 1}: " + ", ".join(
                    f"{k} {v[-1][0]:.1f} s / {v[-1][1]:.0f} MiB" for k, v in results.items()), flush=True)
            floor = min(s for s, _ in results["import tf"])
            for what, values in results.items():
                best = min(s for s, _ in values)
                rows.append([shape, dtype, what, f"{best:.1f}", f"{_common.median([s for s, _ in values]):.1f}",
                             "" if what == "import tf" else f"+{best - floor:.1f}",
                             f"{max(m for _, m in values):.0f}"])
    print(f"\n## Start-up: generate.py --length {args.length}, best of {args.reps} interleaved reps "
          f"(load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} cores)\n")
    print(_common.markdown_table(["shape", "dtype", "run", "s (min)", "s (median)", "beyond import tf",
                                  "peak RSS MiB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
