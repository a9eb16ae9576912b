"""Time and peak memory of `gpt2.load_model` on random-weight checkpoints of the preset shapes.

    python bench/load_speed.py [--shapes 124M,355M,774M] [--format openai,hf] [--dtypes float32,int8] [--reps 2]
        [--json out.json]

For each shape the checkpoint is written once (bench/.cache/<shape>/, the project's own writer),
with `--format hf` also converted once to a Hugging Face folder (bench/.cache/<shape>-hf/,
`python -m gpt2.convert --to hf`: config.json + model.safetensors, read with the safetensors
package), and its files are read once so the page cache is warm: the figures are about parsing
and assigning the tensors, not the disk. Each rep then runs in a fresh worker process that
  1. imports tensorflow and gpt2 and records its RSS then (the baseline: framework + Python),
  2. times `gpt2.load_model(dir, dtype=...)` (int8 quantizes each tensor as it is read),
  3. reports its peak RSS (VmHWM, which covers the whole process lifetime).
"load peak MiB" = peak RSS - baseline RSS: the memory the load itself needed at its worst,
compared with the size of the fp32 weights (the checkpoint's data file, or model.safetensors).
A ratio near 1 means the loader holds about one copy of the weights; 2 means it held two at once.
Reported: min load time over reps, median of the memory figures.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def worker_setup(spec):
    """One measurement in this fresh worker (see _common.run_once): imports, then "run" loads."""
    _common.use_repo_checkout()
    import gc

    import tensorflow as tf  # noqa: F401

    import gpt2

    def run():
        gc.collect()
        baseline = _common.current_rss_bytes()
        peak_before = _common.peak_rss_bytes()
        start = time.perf_counter()
        model = gpt2.load_model(spec["model_dir"], dtype=spec.get("dtype", "float32"))
        seconds = time.perf_counter() - start
        return dict(seconds=seconds, baseline=baseline, peak_before=peak_before, after=_common.current_rss_bytes(),
                    params=int(model.count_params()))

    return {"run": run}, {}


def measure(model_dir, name, timeout, dtype="float32"):
    return _common.run_once(__file__, dict(model_dir=model_dir, dtype=dtype), _common.log_path(__file__, name), timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="124M,355M,774M",
                        help="comma-separated presets among " + ",".join(_common.PRESET_SHAPES))
    parser.add_argument("--format", default="openai",
                        help="comma-separated folder layouts to load: openai (model.ckpt.*), hf (model.safetensors; "
                             "needs the safetensors package) (default: openai)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated load_model dtypes (default: float32)")
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per shape and format")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [s for s in shapes if s not in _common.PRESET_SHAPES]
    if unknown or args.reps < 1:
        parser.error(f"unknown shapes {unknown}" if unknown else "--reps must be >= 1")
    if not formats or set(formats) - {"openai", "hf"}:
        parser.error(f"--format: choose from openai, hf (got {args.format!r})")

    MiB = _common.MiB
    rows, raw = [], []
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for shape, dtype in ((shape, dtype) for shape in shapes for dtype in dtypes):
        for layout in formats:
            model_dir = _common.cached_checkpoint(shape) if layout == "openai" else _common.cached_hf_folder(shape)
            _common.warm_page_cache(model_dir)
            weights = _common.data_file_bytes(model_dir)
            runs = []
            for rep in range(args.reps):
                runs.append(measure(model_dir, f"{shape}-{layout}-{dtype}-{rep + 1}", args.timeout, dtype))
                r = runs[-1]
                print(f"{shape} {layout} {dtype} rep {rep + 1}/{args.reps}: {r['seconds']:.2f} s, "
                      f"baseline {r['baseline'] / MiB:.0f} MiB, peak {r['peak_rss'] / MiB:.0f} MiB, "
                      f"after load {r['after'] / MiB:.0f} MiB", flush=True)
            raw.append(dict(shape=shape, format=layout, dtype=dtype, weights_bytes=weights, runs=runs))
            load_peak = _common.median([r["peak_rss"] - r["baseline"] for r in runs])
            rows.append([
                shape, layout, dtype, f"{weights / MiB:.0f}", f"{min(r['seconds'] for r in runs):.2f}",
                f"{_common.median([r['baseline'] for r in runs]) / MiB:.0f}",
                f"{_common.median([r['peak_rss'] for r in runs]) / MiB:.0f}",
                f"{load_peak / MiB:.0f}", f"{load_peak / weights:.2f}",
                f"{_common.median([r['after'] - r['baseline'] for r in runs]) / MiB:.0f}",
            ])
    print(f"\n## gpt2.load_model, random-weight checkpoints, warm page cache, {args.reps} fresh processes each\n")
    print(_common.markdown_table(
        ["shape", "format", "dtype", "weights MiB", "load s (min)", "baseline RSS MiB", "peak RSS MiB", "load peak MiB",
         "load peak / weights", "held after load MiB"], rows, align="lll" + "r" * 7))
    print("\nformat: openai = hparams.json + model.ckpt.*, hf = config.json + model.safetensors. "
          "baseline = RSS after `import tensorflow, gpt2`; load peak = peak RSS - baseline; "
          "held after load = RSS after the load - baseline.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
