"""Time and peak memory of writing checkpoints: `gpt2.write_random_checkpoint` (the streaming
writer) and `gpt2.save_checkpoint` (a loaded model, TensorFlow's SaveV2), per preset shape.

    python bench/write_speed.py [--shapes 124M,774M] [--what random,save] [--json out.json]

Each measurement runs in a fresh worker process that imports tensorflow and gpt2 (for `save` also loads
the model from bench/.cache/<shape>/, written once by the random writer), records its RSS (the
baseline), resets the kernel's peak-RSS mark (/proc/self/clear_refs, Linux), writes the checkpoint
into a temporary folder next to bench/.cache, and reports the time and the peak RSS since the reset
(VmHWM). "write peak MiB" = peak - baseline: the memory the write itself needed at its worst,
compared with the size of the float32 weights. On a shared machine, run shapes whose weights
exceed a few GB (774M and 1558M for `save`) under a memory lock such as `flock`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def worker_setup(spec):
    """One measurement in this fresh worker (see _common.run_once): imports (for `save`: loads the
    model), records the baseline and resets the peak; "run" writes the checkpoint."""
    _common.use_repo_checkout()
    import gc

    import tensorflow as tf  # noqa: F401

    import gpt2

    what, shape = spec["what"], spec["shape"]
    model = gpt2.load_model(_common.cached_checkpoint(shape)) if what == "save" else None
    gc.collect()
    baseline = _common.current_rss_bytes()
    _common.reset_peak_rss()

    def run():
        start = time.perf_counter()
        if what == "save":
            gpt2.save_checkpoint(model, spec["target"])
        else:
            gpt2.write_random_checkpoint(shape, spec["target"])
        return dict(seconds=time.perf_counter() - start, baseline=baseline)

    return {"run": run}, {}


def measure(what, shape, timeout):
    """One measurement in a fresh worker: time, baseline and peak RSS since the reset, weight bytes."""
    target = tempfile.mkdtemp(prefix=f"write-{shape}-", dir=_common.CACHE_DIR)
    try:
        result = _common.run_once(__file__, dict(what=what, shape=shape, target=target),
                                  _common.log_path(__file__, f"{what}-{shape}"), timeout)
        return dict(result, weights=_common.data_file_bytes(target))
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="124M,774M",
                        help="comma-separated presets among " + ",".join(_common.PRESET_SHAPES)
                        + " (default: 124M,774M)")
    parser.add_argument("--what", default="random,save", help="random, save or both (default: random,save)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement (default: 3600)")
    parser.add_argument("--json", help="also write the raw results to this file (default: none)")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    if any(s not in _common.PRESET_SHAPES for s in shapes) or any(w not in ("random", "save") for w in whats):
        parser.error("unknown shape or --what")
    os.makedirs(_common.CACHE_DIR, exist_ok=True)
    MiB = _common.MiB
    rows, raw = [], []
    for shape in shapes:
        for what in whats:
            r = measure(what, shape, args.timeout)
            raw.append(dict(r, shape=shape, what=what))
            peak = r["peak_rss"] - r["baseline"]
            print(f"{what} {shape}: {r['seconds']:.1f} s, baseline {r['baseline'] / MiB:.0f} MiB, "
                  f"peak {r['peak_rss'] / MiB:.0f} MiB", flush=True)
            rows.append([what, shape, f"{r['weights'] / MiB:.0f}", f"{r['seconds']:.1f}",
                         f"{r['peak_rss'] / MiB:.0f}", f"{max(peak, 0) / MiB:.0f}",
                         f"{max(peak, 0) / r['weights']:.2f}"])
    print("\n## Writing checkpoints (fresh process each)\n")
    print(_common.markdown_table(
        ["writer", "shape", "weights MiB", "seconds", "peak RSS MiB", "write peak MiB", "write peak / weights"], rows))
    print("\nbaseline = RSS just before the write (for save: with the model loaded); write peak = peak RSS - baseline.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
