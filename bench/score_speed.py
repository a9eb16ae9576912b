"""Speed and memory of scoring: `gpt2.perplexity` over random tokens and `gpt2.score` on short rows.

    python bench/score_speed.py [--shape 124M | --model-dir DIR] [--tokens 8192]
        [--strides 1024,512] [--batch-sizes 1,2,4] [--reps 2] [--json out.json]

Each configuration runs in a fresh worker process (bench/_common.run_once) that loads the model, records its RSS (the
baseline), makes one untimed call (tracing and XLA compilation included) and then `--reps`
timed calls. Reported per configuration:
- tokens/s: tokens scored per second (best rep). Perplexity with stride S feeds about n_ctx / S
  tokens through the model per token scored, so stride 512 costs about twice stride 1024;
- fed tokens/s: window tokens through the model per second (the forward pass's own speed);
- compile s: first call - best rep, about the time tracing and XLA compilation took;
- peak MiB: peak RSS - baseline, the memory scoring needed at its worst (logits included).
`score` rows: 64 rows of 16..128 (at most n_ctx) random tokens, with top_k 0 and 5 (lm-evaluation-harness-like
requests). Weights are random (speed does not depend on them); the checkpoint is written once to
bench/.cache/<shape>/ unless --model-dir is given.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def worker_setup(spec):
    """One configuration in this fresh worker (see _common.run_once): loads the model and records
    its RSS (the baseline); "run" makes the untimed call and the timed reps."""
    _common.use_repo_checkout()
    import numpy as np

    import gpt2

    model = gpt2.load_model(spec["model_dir"])
    n_ctx, n_vocab = model.hparams.n_ctx, model.hparams.n_vocab
    baseline = _common.current_rss_bytes()
    rng = np.random.default_rng(0)
    if spec["kind"] == "perplexity":
        tokens = rng.integers(0, n_vocab, spec["tokens"]).astype(np.int32)

        def call():
            result = gpt2.perplexity(model, tokens, stride=spec["stride"], batch_size=spec["batch_size"])
            return result.tokens, result.windows * n_ctx
    else:
        rows = [rng.integers(0, n_vocab, n).tolist() for n in rng.integers(16, min(128, n_ctx) + 1, 64)]

        def call():
            gpt2.score(model, rows, top_k=spec["top_k"])
            return sum(len(r) - 1 for r in rows), sum(len(r) for r in rows)

    def run():
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        times = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            scored, fed = call()
            times.append(time.perf_counter() - start)
        return dict(spec, first=first, best=min(times), scored=scored, fed=fed, baseline=baseline)

    return {"run": run}, {}


def measure(model_dir, config, timeout=3600):
    """One configuration in a fresh worker: its timings, baseline and peak RSS."""
    name = "-".join(f"{k}{v}" for k, v in config.items() if k != "reps")
    return _common.run_once(__file__, dict(config, model_dir=model_dir), _common.log_path(__file__, name), timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--shape", default="124M", help="random checkpoint of this preset shape (default: 124M)")
    where.add_argument("--model-dir", help="an existing model folder instead (default: none)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per perplexity call (default: 8192)")
    parser.add_argument("--strides", default="1024,512", help="perplexity strides (default: 1024,512)")
    parser.add_argument("--batch-sizes", default="1,2,4", help="windows per compiled call (default: 1,2,4)")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per configuration (default: 2)")
    parser.add_argument("--no-score", action="store_true", help="skip the gpt2.score rows (default: run them)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here (default: none)")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _common.serve_worker(worker_setup)

    model_dir = args.model_dir or _common.cached_checkpoint(args.shape)
    configs = [
        dict(kind="perplexity", tokens=args.tokens, stride=int(s), batch_size=int(b), reps=args.reps)
        for s in args.strides.split(",") for b in args.batch_sizes.split(",")
    ]
    if not args.no_score:
        configs += [dict(kind="score", top_k=k, reps=args.reps) for k in (0, 5)]
    results, rows = [], []
    for config in configs:
        print(f"running {config} ...", file=sys.stderr, flush=True)
        r = measure(model_dir, config)
        results.append(r)
        what = (f"perplexity stride {r['stride']}, batch {r['batch_size']}" if r["kind"] == "perplexity"
                else f"score 64 rows, top_k {r['top_k']}")
        rows.append([what, f"{r['scored'] / r['best']:.0f}", f"{r['fed'] / r['best']:.0f}",
                     f"{r['first'] - r['best']:.1f}", f"{(r['peak_rss'] - r['baseline']) / _common.MiB:.0f}"])
    print(f"model: {model_dir}; load: {os.getloadavg()[0]:.1f} (1-min load average at the end)")
    print(_common.markdown_table(["configuration", "tokens/s", "fed tokens/s", "compile s", "peak MiB"], rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
