"""Where a step of the uncompiled sampler goes: the whole step for caches of growing size against
the weight matmuls alone, per dtype.

    python bench/step_profile.py [--shape 124M] [--batch 8] [--dtypes bfloat16,float32]

For each dtype: ms per greedy step of `gpt2.sampling.direct` (32-token prompts, its key/value
cache sized for 128, 480 and 990 new tokens: 159, 511 and 1021 positions; steps 5-68 timed, so
the same positions are filled and attended whatever the cache's size), then
one plain graph of every weight matmul of a step (the 12 blocks' four projections and the
logits) and the logits matmul alone at the same batch. The step minus the matmuls is attention,
the cache update and the token choice.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PROMPT = 32
MEASURED = 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="124M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args(argv)
    model_dir = _common.cached_checkpoint(args.shape)
    from gpt2.cli import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    from gpt2 import layers
    from gpt2.checkpoint import load_model
    from gpt2.sampling import direct
    from gpt2.sampling.pool import RowRequest
    from gpt2.sampling.settings import SamplingSettings

    print(f"| dtype | what (batch {args.batch}, {args.shape}) | ms |\n|:--|:--|--:|")
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        model = load_model(model_dir, dtype=dtype)

        def step_ms(new, measured=MEASURED):
            requests = [RowRequest(list(range(100 + i, 100 + i + PROMPT)), SamplingSettings(temperature=0.0), i, new)
                        for i in range(args.batch)]
            steps = direct.decode_rows(model, requests)
            for _ in range(4):
                next(steps)
            start = time.perf_counter()
            for _ in range(measured):
                next(steps)
            steps.close()
            return (time.perf_counter() - start) / measured * 1000

        for new in (128, 480, 990):
            step_ms(new, 8)  # first call of this shape
            print(f"| {dtype} | step, cache of {PROMPT + new - 1} positions | {min(step_ms(new) for _ in range(2)):.1f} |")

        compute = tf.as_dtype(model.compute_dtype)
        n_embd = model.hparams.n_embd

        @tf.function(autograph=False)
        def matmuls(x):
            for block in model.blocks:
                _, _, attn_w, attn_b, proj_w, proj_b, _, _, fc_w, fc_b, out_w, out_b = block.inference_weights()
                qkv = layers.dense(x, attn_w, attn_b, compute)
                x = x + layers.dense(qkv[:, :n_embd], proj_w, proj_b, compute)
                x = x + layers.mlp(x, fc_w, fc_b, out_w, out_b, compute)
            return model.logits(x)

        @tf.function(autograph=False)
        def logits(x):
            return model.logits(x)

        x = tf.random.normal([args.batch, n_embd])
        for function, what in ((matmuls, "every weight matmul of a step (blocks + logits)"),
                               (logits, "the logits matmul alone")):
            function(x).numpy()
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(20):
                    result = function(x)
                result.numpy()
                best = min(best, (time.perf_counter() - start) / 20 * 1000)
            print(f"| {dtype} | {what} | {best:.1f} |")
    print(f"\nload average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
