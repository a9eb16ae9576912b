"""Time to the first token of a long prompt through gpt2.sample_sequence (the compiled loop), in a
fresh process: the first call (compile included) and warm calls.

    python bench/prefill_speed.py [--model-dir DIR] [--prompt-len 1000] [--new-tokens 1] [--threads 1] [--reps 3]

Imports `gpt2` from the current directory (run it from the checkout to measure). Prints one line:
first call s, warm calls s (each), their median.
"""

import argparse
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="/work/wt/cache/124M")
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    os.environ["GPT2_DIRECT_TOKENS"] = "0"  # the compiled loop, as bench/generate_speed.py's "ours"
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import gpt2

    model = gpt2.load_model(args.model_dir)
    prompt = np.random.default_rng(0).integers(0, model.hparams.n_vocab, [1, args.prompt_len]).astype(np.int32)
    times, outs = [], []
    for _ in range(args.reps + 1):
        start = time.perf_counter()
        outs.append(np.asarray(gpt2.sample_sequence(model, prompt, args.new_tokens, temperature=0.0)))
        times.append(time.perf_counter() - start)
    print(f"{gpt2.__file__}: first {times[0]:.2f} s, warm {', '.join(f'{t:.2f}' for t in times[1:])} s, "
          f"median {statistics.median(times[1:]):.2f} s; tokens {outs[-1][0, -args.new_tokens:].tolist()}")


if __name__ == "__main__":
    main()
