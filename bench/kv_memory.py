"""Where a generate.py-like run's memory goes, and what the pool's key/value cache costs.

    python bench/kv_memory.py stages MODEL_DIR [--length 32] [--dtype float32]
    python bench/kv_memory.py cache [--shapes 124M,355M,1558M] [--batch 8] [--lengths 64,...]

stages: one process that imports TensorFlow, loads the model and samples `length` tokens after
an 18-token prompt (top_k 40), printing VmRSS and VmHWM (peak RSS) after each stage (set
GPT2_DIRECT_TOKENS=0 to take the compiled loop, as runs past the uncompiled sampler's budget do).
cache: `Decoder.cache_bytes()` of a pool for each shape, dtype and job length (prompt + new
tokens), from the hyperparameters alone (no weights are made).
"""

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PROMPT = [818, 257, 14702, 4917, 11, 5519, 5071, 257, 27638, 286, 28000, 19942, 2877, 287, 257, 6569, 19272, 13]


def memory():
    """(VmRSS, VmHWM) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def mark(stage):
    rss, hwm = memory()
    print(f"| {stage} | {rss:.0f} | {hwm:.0f} |", flush=True)


def stages(args):
    print("| stage | VmRSS MiB | VmHWM MiB |\n|:--|--:|--:|")
    mark("start")
    import tensorflow as tf  # noqa: F401

    mark("import tensorflow")
    from gpt2.checkpoint import load_model
    from gpt2.sampling import api

    model = load_model(args.model_dir, dtype=args.dtype)
    mark("load_model")
    plan = api._plan(model, 1, [len(PROMPT)], args.length)
    steps = []

    def callback(step, tokens):
        steps.append(step)
        if len(steps) == 1:
            mark(f"first step ({plan})")

    api.sample_sequence(model, [PROMPT], args.length, seed=1, top_k=40, callback=callback)
    mark("end")


def stub_model(shape, dtype):
    """What `Decoder` reads of a model, without weights."""
    from gpt2.hparams import HParams

    hparams = HParams(**_common.PRESET_SHAPES[shape])
    compute = "bfloat16" if dtype == "bfloat16" else "float32"
    return types.SimpleNamespace(hparams=hparams, blocks=[None] * hparams.n_layer, compute_dtype=compute,
                                 cache_dtype="float16" if dtype == "float16" else compute,
                                 weight_dtype=dtype if dtype in ("int8", "float16") else "float32")


def cache(args):
    from gpt2.sampling.decoder import Decoder

    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            model = stub_model(shape, dtype)
            for length in [None, *(int(n) for n in args.lengths.split(",") if n)]:
                try:
                    decoder = Decoder(model, args.batch, length=length)
                except TypeError:  # a Decoder without job sizing: every pool holds the whole context
                    if length is not None:
                        continue
                    decoder = Decoder(model, args.batch)
                per_slot = Decoder(model, 1, **({} if length is None else {"length": length})).cache_bytes()
                rows.append([shape, dtype, "full" if length is None else str(length), str(decoder.cache_slots),
                             f"{per_slot / _common.MiB:.1f}", f"{decoder.cache_bytes() / _common.MiB:.0f}"])
    print(_common.markdown_table(["shape", "dtype", "job length", "cache slots M", "MiB per slot",
                                  f"MiB, batch {args.batch}"], rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("stages")
    p.add_argument("model_dir")
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p = commands.add_parser("cache")
    p.add_argument("--shapes", default="124M,355M,1558M")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", default="64,300,1024")
    args = parser.parse_args(argv)
    (stages if args.command == "stages" else cache)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
