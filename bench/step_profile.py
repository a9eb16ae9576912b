"""Where a step goes: the whole step for caches of growing size against the weight matmuls
alone, per dtype, for the uncompiled sampler and (every dtype but bfloat16) the compiled loop.

    python bench/step_profile.py [--shape 124M] [--batch 8] [--dtypes bfloat16,float32] [--compiled-only]

For each dtype: ms per greedy step of `gpt2.sampling.direct` (32-token prompts, its key/value
cache sized for 128, 480 and 990 new tokens: 159, 511 and 1021 positions; steps 5-68 timed, so
the same positions are filled and attended whatever the cache's size), then
one plain graph of every weight matmul of a step (the 12 blocks' four projections and the
logits) and the logits matmul alone at the same batch. The step minus the matmuls is attention,
the cache update and the token choice.

For float32, float16 and int8, whose long jobs run in the XLA-compiled loop, also: ms per step of that loop
(greedy, `gpt2.sample_sequence` with GPT2_DIRECT_TOKENS=0; 160 new tokens minus 32, so the
prompt and the call's fixed cost cancel), the same weight-matmul graph compiled by XLA (the floor
under the loop's step), and a sum of every weight (each read once: the floor memory bandwidth
sets; 16-bit weights read half the bytes, int8 a quarter). `--compiled-only` skips the
uncompiled sampler's steps.
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
    parser.add_argument("--compiled-only", action="store_true",
                        help="skip the uncompiled sampler's steps: the compiled loop against its matmuls only")
    args = parser.parse_args(argv)
    model_dir = _common.cached_checkpoint(args.shape)
    from gpt2.runtime import import_tensorflow

    import_tensorflow()
    import numpy as np
    import tensorflow as tf

    import gpt2
    from gpt2 import layers
    from gpt2.checkpoint import load_model
    from gpt2.sampling import direct
    from gpt2.sampling.settings import Row, SamplingSettings

    def profile(dtype):  # a function, so that the closures below see this dtype's model
        model = load_model(model_dir, dtype=dtype)

        def step_ms(new, measured=MEASURED):
            requests = [Row(list(range(100 + i, 100 + i + PROMPT)), SamplingSettings(temperature=0.0), i, new)
                        for i in range(args.batch)]
            steps = direct.decode_rows(model, requests)
            for _ in range(4):
                next(steps)
            start = time.perf_counter()
            for _ in range(measured):
                next(steps)
            steps.close()
            return (time.perf_counter() - start) / measured * 1000

        for new in () if args.compiled_only else (128, 480, 990):
            step_ms(new, 8)  # first call of this shape
            best = min(step_ms(new) for _ in range(2))
            print(f"| {dtype} | step, cache of {PROMPT + new - 1} positions | {best:.1f} |")

        compute = tf.as_dtype(model.compute_dtype)
        n_embd = model.hparams.n_embd

        @tf.function(autograph=False)
        def matmuls(x):
            for block in model.blocks:
                _, _, attn_w, attn_b, proj_w, proj_b, _, _, fc_w, fc_b, out_w, out_b = block.inference_weights()
                qkv = layers.dense(x, attn_w, attn_b, compute)
                x = x + layers.dense(qkv[:, :n_embd], proj_w, proj_b, compute)
                x = x + layers.dense(layers.gelu(layers.dense(x, fc_w, fc_b, compute)), out_w, out_b, compute)
            return model.logits(x)

        @tf.function(autograph=False)
        def logits(x):
            return model.logits(x)

        @tf.function(autograph=False)
        def read_weights(x):  # each weight read once, as held: the memory-bandwidth floor of a step
            return tf.add_n([tf.cast(tf.reduce_sum(w), tf.float32) for w in model.weights]) + x[0, 0]

        x = tf.random.normal([args.batch, n_embd])
        timed = [(matmuls, "every weight matmul of a step (blocks + logits)"), (logits, "the logits matmul alone")]
        compiled = model.default_jit_compile  # the formats whose loop runs under XLA (not bfloat16)
        if compiled:
            timed.append((tf.function(matmuls.python_function, autograph=False, jit_compile=True),
                          "every weight matmul of a step, XLA-compiled"))
            timed.append((read_weights, "reading every weight once (the memory-bandwidth floor)"))
        for function, what in timed:
            print(f"| {dtype} | {what} | {best_ms(function, x):.1f} |")
        if compiled:
            os.environ["GPT2_DIRECT_TOKENS"] = "0"  # the compiled loop for every call
            context = np.array([list(range(100 + i, 100 + i + PROMPT)) for i in range(args.batch)], np.int32)

            def loop_seconds(new):
                start = time.perf_counter()
                gpt2.sample_sequence(model, context, new, temperature=0.0)
                return time.perf_counter() - start

            loop_seconds(160)  # compiles (or reads the compilation cache)
            step = min(loop_seconds(160) - loop_seconds(32) for _ in range(3)) / 128 * 1000
            print(f"| {dtype} | step of the compiled loop (XLA), cache of {PROMPT + 159} positions | {step:.1f} |")

    print(f"| dtype | what (batch {args.batch}, {args.shape}) | ms |\n|:--|:--|--:|")
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        profile(dtype)
    print(f"\nload average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    return 0


def best_ms(function, x, calls=20, reps=3):
    """The best of `reps` means of `calls` back-to-back calls function(x), in ms (the last result
    awaited)."""
    function(x).numpy()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            result = function(x)
        result.numpy()
        best = min(best, (time.perf_counter() - start) / calls * 1000)
    return best


if __name__ == "__main__":
    sys.exit(main())
