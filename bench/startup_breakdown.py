"""Where a generate.py-like run spends its time before and while printing its first text: the
steps timed in turn in one process (run it twice; the second run has a warm compilation cache).

    python bench/startup_breakdown.py [--model-dir DIR] [--length 32]

Default model: the random 124M checkpoint in bench/.cache/124M (written once). The steps follow
generate.py: import TensorFlow, import gpt2 and read the BPE files, build the model without its
weights, prepare (trace, lower, compile or fetch from the cache, run once) the compiled sampler if
the run needs it, else trace the uncompiled sampler short runs use, read the weights, then two
greedy calls of --length tokens (the second shows what the first paid extra).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="model folder (default: the cached random 124M)")
    parser.add_argument("--length", type=int, default=32, help="new tokens (default: 32)")
    args = parser.parse_args(argv)
    import _common

    model_dir = args.model_dir or _common.cached_checkpoint("124M")
    start = time.perf_counter()
    marks = []

    def mark(what):
        marks.append((what, time.perf_counter()))

    from gpt2.runtime import import_tensorflow

    import_tensorflow()
    mark("import tensorflow (Keras included)")
    import gpt2
    from encoder import encoder_for_model_dir
    from gpt2.checkpoint import load_model
    from gpt2.sampling import api, direct

    enc = encoder_for_model_dir(model_dir)
    mark("import gpt2, read the BPE files")

    def before_weights(model):
        mark("build the model (no weights)")
        if api.will_compile(model, 1, 1, args.length):
            api.prepare(model, 1)
            mark("prepare the compiled sampler: trace, lower, compile or cache hit, run once")
        else:
            direct.prepare(model)
            mark("trace the uncompiled sampler (generate.py does it while reading the weights)")

    model = load_model(model_dir, before_weights=before_weights)
    mark("read the weights")
    ids = enc.encode("In a shocking finding, scientists discovered a herd of unicorns")
    for call in ("first", "second"):
        out = gpt2.sample_sequence(model, [ids], args.length, temperature=0)
        enc.decode(out[0][len(ids):].tolist())
        mark(f"generate {args.length} tokens ({call} call)")
    before = start
    print("| step | s |\n|:--|--:|")
    for what, at in marks:
        print(f"| {what} | {at - before:.2f} |")
        before = at
    print(f"| total | {before - start:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
