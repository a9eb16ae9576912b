"""The SavedModel export: export time, size on disk, and the loaded SavedModel's generation speed
beside `gpt2.sample_sequence`.

    python bench/export_speed.py [--shape 124M | --model-dir DIR] [--batch-sizes 1,8]
        [--prompt-len 32] [--new-tokens 128] [--reps 3] [--no-xla] [--json FILE]

1. `python -m gpt2.export --model DIR --output bench/.cache/export/<name> --overwrite` runs in a
   subprocess, timed as a whole (TensorFlow import, model load, tracing and writing): the time a
   user waits. Sizes: OUT/1 on disk, beside the checkpoint's weight files.
2. For each system and batch size, a fresh worker process (bench/_common.run_once): `savedmodel`
   imports TensorFlow only, loads OUT/1 with tf.saved_model.load and calls the serving_default
   signature (as TF Serving would); `library` loads the checkpoint with gpt2.load_model and calls
   gpt2.sample_sequence.
   Greedy, the same random prompt tokens, exactly N new tokens (no stop token).
   - first call s: the first N-token call of the worker (tracing and XLA compilation included; the
     SavedModel compiles once per batch size; the library's persistent compile cache is off);
   - new prompt length s: then one call with a prompt 7 tokens shorter (no recompilation expected);
   - ms/step = (T(N) - T(1)) / (N - 1), medians of --reps calls each; tokens/s = batch x N / median T(N);
   - peak RSS of the worker.
Weights are random (speed does not depend on them); the checkpoint is written once to
bench/.cache/<shape>/ unless --model-dir is given.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

EXPORT_DIR = os.path.join(_common.CACHE_DIR, "export")


def worker_setup(spec):
    """One system at one batch size in this fresh worker (see _common.run_once): loads it; "run"
    makes the calls and returns the timings."""
    import numpy as np

    system, location = spec["system"], spec["location"]
    batch, prompt_len, new_tokens = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50000, [batch, prompt_len]).astype(np.int32)
    if system == "savedmodel":
        import tensorflow as tf

        generate = tf.saved_model.load(location).signatures["serving_default"]

        def call(tokens, n):
            b = tokens.shape[0]
            out = generate(tokens=tf.constant(tokens), lengths=tf.fill([b], tokens.shape[1]),
                           max_new_tokens=tf.fill([b], n), temperature=tf.zeros([b]), top_k=tf.zeros([b], tf.int32),
                           top_p=tf.ones([b]), seed=tf.zeros([b], tf.int32))
            return out["tokens"].numpy()
        imported = sorted(name for name in ("gpt2", "encoder") if name in sys.modules)
        assert not imported, f"the SavedModel worker imported {imported}"
    else:
        _common.use_repo_checkout()
        import gpt2

        model = gpt2.load_model(location)

        def call(tokens, n):
            return gpt2.sample_sequence(model, tokens, n, temperature=0)[:, tokens.shape[1]:]

    def timed(tokens, n):
        start = time.perf_counter()
        out = call(tokens, n)
        elapsed = time.perf_counter() - start
        assert out.shape == (batch, n), out.shape
        return elapsed, out

    def run():
        first, reference = timed(prompt, new_tokens)
        new_prompt, _ = timed(prompt[:, 7:], new_tokens)
        full, single = [], []
        for _ in range(spec["reps"]):
            elapsed, out = timed(prompt, new_tokens)
            assert (out == reference).all(), "greedy output changed between calls"
            full.append(elapsed)
            single.append(timed(prompt, 1)[0])
        return dict(spec, first=first, new_prompt=new_prompt, full=full, single=single,
                    tokens=reference[:, :16].tolist())

    return {"run": run}, {}


def run_export(model_dir, output, xla):
    """Runs the export command; returns (seconds, OUT/1)."""
    args = [sys.executable, "-m", "gpt2.export", "--model", model_dir, "--output", output, "--overwrite"]
    start = time.perf_counter()
    result = subprocess.run(args + ([] if xla else ["--no-xla"]), cwd=_common.REPO_ROOT, env=_common.child_env(),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"export failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, os.path.join(output, "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--shape", default="124M", help="random checkpoint of this preset shape (default: 124M)")
    where.add_argument("--model-dir", help="an existing model folder instead (default: none)")
    parser.add_argument("--batch-sizes", default="1,8", help="batch sizes (default: 1,8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per call (default: 128)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per measurement (default: 3)")
    parser.add_argument("--no-xla", action="store_true", help="export with --no-xla (default: XLA)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here (default: none)")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)

    model_dir = args.model_dir or _common.cached_checkpoint(args.shape)
    # Workers compile from scratch: no persistent XLA cache (gpt2.compile_cache) for the library
    # worker, as TF Serving has none for the SavedModel.
    os.environ["GPT2_CACHE_DIR"] = "off"
    os.environ["GPT2_DIRECT_TOKENS"] = "0"  # the library's compiled loop, like the SavedModel's
    name = os.path.basename(os.path.normpath(model_dir)) + ("-noxla" if args.no_xla else "")
    print(f"exporting {model_dir} ...", file=sys.stderr, flush=True)
    export_seconds, export_dir = run_export(model_dir, os.path.join(EXPORT_DIR, name), not args.no_xla)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(export_dir) for f in files)
    sizes = [["SavedModel (OUT/1)", f"{size / _common.MiB:.0f}"],
             ["checkpoint weights", f"{_common.data_file_bytes(model_dir) / _common.MiB:.0f}"]]
    results, rows = [], []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        outputs = {}
        for system, location in (("savedmodel", export_dir), ("library", model_dir)):
            spec = dict(system=system, location=location, batch=batch, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, reps=args.reps)
            print(f"running {system}, batch {batch} ...", file=sys.stderr, flush=True)
            r = _common.run_once(__file__, spec, _common.log_path(__file__, f"{system}-b{batch}"))
            results.append(r)
            outputs[system] = r["tokens"]
            step_ms = (_common.median(r["full"]) - _common.median(r["single"])) / (args.new_tokens - 1) * 1000
            rows.append([system, batch, f"{r['first']:.1f}", f"{r['new_prompt']:.2f}", f"{step_ms:.1f}",
                         f"{batch * args.new_tokens / _common.median(r['full']):.0f}",
                         f"{r['peak_rss'] / _common.MiB:.0f}"])
        same = "same" if outputs["savedmodel"] == outputs["library"] else "DIFFERENT"
        rows[-1][0] += f" (greedy tokens: {same})"
    print(f"model: {model_dir}; export: {export_seconds:.1f} s (python -m gpt2.export{' --no-xla' * args.no_xla}); "
          f"load: {os.getloadavg()[0]:.1f} (1-min load average at the end)")
    print(_common.markdown_table(["files", "MiB"], sizes))
    print()
    print(_common.markdown_table(["system", "batch", "first call s", "new prompt length s", "ms/step", "tokens/s",
                                  "peak RSS MiB"], rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(export_seconds=export_seconds, sizes=sizes, results=results), f, indent=1)


if __name__ == "__main__":
    main()
