"""Generation past the context window: tokens/s for 2,048 new tokens from 124M at batch 1, with
and without repetition penalties, beside the steady-state speed inside the context.

    python bench/long_generation.py [--shape 124M] [--tokens 2048] [--reps 3]

One process (this project only: the peers stop at the context). Rows, all greedy from one
32-token prompt, timed in interleaved reps after a first untimed call (compiling):

  inside the context   ms/step = (T(128) - T(1)) / 127, as bench/generate_speed.py measures it;
  past the context     T(tokens): the window slides every n_ctx - window_keep (512) tokens and
                       its 512 tokens are ingested again (16 chunks of 32) inside the loop;
  with penalties       the same with repetition_penalty=1.2, presence_penalty=0.5,
                       frequency_penalty=0.5 and a logit_bias entry.

The slide's cost is the difference between the second row's per-token time and the first's.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="124M", choices=list(_common.PRESET_SHAPES))
    parser.add_argument("--tokens", type=int, default=2048, help="new tokens past the context (default: 2048)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    _common.use_repo_checkout()
    import numpy as np

    import gpt2

    model = gpt2.load_model(_common.cached_checkpoint(args.shape))
    prompt = np.random.default_rng(0).integers(0, 50257, (1, 32)).tolist()
    penalties = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, logit_bias={50256: -100})

    def call(n, **options):
        start = time.perf_counter()
        gpt2.sample_sequence(model, prompt, n, temperature=0, **options)
        return time.perf_counter() - start

    for n in (1, 128, args.tokens):
        call(n)
    call(args.tokens, **penalties)
    times = {"t1": [], "t128": [], "long": [], "long_penalties": []}
    for rep in range(args.reps):
        times["t1"].append(call(1))
        times["t128"].append(call(128))
        times["long"].append(call(args.tokens))
        times["long_penalties"].append(call(args.tokens, **penalties))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    inside = 1000 * (min(times["t128"]) - min(times["t1"])) / 127
    rows = [["inside the context (32 + 128)", f"{inside:.1f}", f"{1000 / inside:.1f}"]]
    for key, label in (("long", "past the context"), ("long_penalties", "past the context, with penalties")):
        per_token = 1000 * min(times[key]) / args.tokens
        rows.append([f"{label} (32 + {args.tokens})", f"{per_token:.1f}", f"{1000 / per_token:.1f}"])
    print(f"\n## {args.shape}, batch 1, greedy, best of {args.reps} (load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())})\n")
    print(_common.markdown_table(["run", "ms/token", "tokens/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
