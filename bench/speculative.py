"""Speculative decoding (gpt2/sampling/speculative.py): acceptance and speed-up against plain
decoding on the same uncompiled sampler, batch 1, greedy unless said otherwise.

    python bench/speculative.py [--reps 2] [--new-tokens 128] [--train-steps 200]

Two models, in one process, each row timed in interleaved reps after an untimed first call:

  random 124M      a 32-token random prompt: plain (uncompiled; and the compiled loop, quoted),
                   prompt lookup (nothing to copy: acceptance near zero, the overhead), a second
                   random 124M as draft (acceptance near zero), 124M drafting for itself (every
                   draft accepted: the cost of a draft as large as the model);
  memorised        a small GPT-2 shape (4 layers x 256, n_ctx 256) fine-tuned with gpt2.finetune
                   on a ~100-token passage repeated, and a 1-layer x 128 draft fine-tuned the same
                   way: prompt lookup on a prompt holding the passage (the output copies it), the
                   small draft model on the passage's first 16 tokens, and sampled at
                   temperature 0.7 / top_k 40.

speed-up = plain time / row time for the same prompt and length; acceptance = accepted drafts /
drafted; tokens/pass = tokens made per pass of the model over its weights.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PASSAGE = (
    "Rows go into a pool of decoding slots whose state, the key/value cache included, lives in "
    "variables. One compiled loop serves every prompt, length and setting: each iteration ingests "
    "up to 32 prompt tokens of one row and decodes one token for every row that is ready, each at "
    "its own position, so rows of different lengths need no other program."
)


def timed(call, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--cache", default=_common.CACHE_DIR,
                        help="folder of the random checkpoints and the fine-tuned models (default: bench/.cache)")
    parser.add_argument("--train", metavar="FOLDER", help=argparse.SUPPRESS)  # the training subprocess
    args = parser.parse_args(argv)
    _common.use_repo_checkout()
    if args.train:
        return train(args)
    os.environ.setdefault("GPT2_DIRECT_TOKENS", str(10**9))  # plain rows stay on the uncompiled sampler
    import numpy as np

    import gpt2
    from encoder import encoder_for_model_dir
    from gpt2.sampling import speculative

    new = args.new_tokens
    rows = []  # (section, row, prompt, model, options)
    model = gpt2.load_model(_common.cached_checkpoint("124M", root=args.cache))
    other = gpt2.load_model(_common.cached_checkpoint("124M", seed=1, root=os.path.join(args.cache, "seed1")))
    prompt = np.random.default_rng(0).integers(0, 50257, 32).tolist()
    rows += [("random 124M", "plain", prompt, model, {}),
             ("random 124M", "prompt lookup", prompt, model, {"draft": speculative.PromptLookup()}),
             ("random 124M", "draft: another random 124M", prompt, model, {"draft": speculative.DraftModel(other)}),
             ("random 124M", "draft: itself", prompt, model, {"draft": speculative.DraftModel(model)})]

    enc = encoder_for_model_dir(_common.cached_checkpoint("124M", root=args.cache))
    passage = enc.encode(PASSAGE)
    # Trained in a subprocess: gpt2.finetune turns on op determinism for the rest of its process.
    folder = os.path.join(args.cache, f"memorised-{args.train_steps}")
    if not os.path.isfile(os.path.join(folder, "draft", "checkpoint")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--train", folder, "--cache", args.cache,
                        "--train-steps", str(args.train_steps)], check=True, env=_common.child_env())
    memo, memo_draft = gpt2.load_model(os.path.join(folder, "model")), gpt2.load_model(os.path.join(folder, "draft"))
    short = passage[:16]
    copied = passage + [enc.eot_token] + short
    memo_new = min(new, len(passage) - 16)
    rows += [("memorised", "plain", short, memo, {}),
             ("memorised", "plain (long prompt)", copied, memo, {}),
             ("memorised", "prompt lookup (long prompt)", copied, memo, {"draft": speculative.PromptLookup()}),
             ("memorised", "draft: 1x128 model", short, memo, {"draft": speculative.DraftModel(memo_draft)}),
             ("memorised", "plain, sampled", short, memo, {"temperature": 0.7, "top_k": 40, "sampled": True}),
             ("memorised", "draft: 1x128 model, sampled", short, memo,
              {"draft": speculative.DraftModel(memo_draft), "temperature": 0.7, "top_k": 40, "sampled": True})]

    def call(prompt, net, options, length):
        options = dict(options)
        sampled = options.pop("sampled", False)
        settings = {} if sampled else {"temperature": 0}
        return gpt2.sample_sequence(net, [prompt], length, seed=1, **settings, **options)[0, len(prompt):]

    memorised = call(short, memo, {}, memo_new)
    matched = int(np.sum(np.array(memorised) == np.array(passage[16:16 + memo_new])))
    print(f"memorised model: {matched} of {memo_new} greedy tokens equal the passage", flush=True)

    results = {}
    for section, _, prompt, net, options in rows:  # first calls: traces, untimed
        length = new if section == "random 124M" else memo_new
        call(prompt, net, options, length)
    for _ in range(args.reps):
        for section, name, prompt, net, options in rows:
            length = new if section == "random 124M" else memo_new
            draft = options.get("draft")
            before = None if draft is None else (draft.stats.drafted, draft.stats.accepted, draft.stats.tokens,
                                                 draft.stats.rounds + draft.stats.plain)
            start = time.perf_counter()
            call(prompt, net, options, length)
            seconds = time.perf_counter() - start
            entry = results.setdefault((section, name), {"seconds": [], "length": length})
            entry["seconds"].append(seconds)
            if draft is not None:
                stats = draft.stats
                entry["stats"] = [now - then for now, then in zip(
                    (stats.drafted, stats.accepted, stats.tokens, stats.rounds + stats.plain), before)]
    gpt2.sample_sequence(model, [prompt], new, temperature=0, jit_compile=True)  # compiles
    compiled = timed(lambda: gpt2.sample_sequence(model, [prompt], new, temperature=0, jit_compile=True), args.reps)

    print(f"\nload average: {os.getloadavg()[0]:.1f} (1 min)\n")
    print("| model | row | ms/token | speed-up | acceptance | tokens/pass |")
    print("|:--|:--|--:|--:|--:|--:|")
    for (section, name), entry in results.items():
        seconds = min(entry["seconds"])
        plain_name = "plain (long prompt)" if "long prompt" in name else "plain, sampled" if "sampled" in name \
            else "plain"
        plain = min(results[(section, plain_name)]["seconds"])
        acceptance = per_pass = ""
        if "stats" in entry:
            drafted, accepted, tokens, passes = entry["stats"]
            acceptance = f"{accepted / drafted:.0%}" if drafted else "no drafts"
            per_pass = f"{tokens / passes:.2f}" if passes else ""
        print(f"| {section} | {name} | {1000 * seconds / entry['length']:.1f} | {plain / seconds:.2f}x | "
              f"{acceptance} | {per_pass} |")
    print(f"| random 124M | compiled loop (jit_compile=True), quoted | {1000 * compiled / new:.1f} | "
          f"{min(results[('random 124M', 'plain')]['seconds']) / compiled:.2f}x | | |")


def train(args):
    """Fine-tunes the memorising model and its draft on PASSAGE repeated; writes FOLDER/model and
    FOLDER/draft."""
    import numpy as np

    import gpt2
    from encoder import encoder_for_model_dir

    source = _common.cached_checkpoint("124M", root=args.cache)
    enc = encoder_for_model_dir(source)
    corpus = np.array((enc.encode(PASSAGE) + [enc.eot_token]) * 64, np.int32)
    for name, width, layers in (("model", 256, 4), ("draft", 128, 1)):
        net = gpt2.GPT2(gpt2.HParams(n_vocab=50257, n_ctx=256, n_embd=width, n_head=4, n_layer=layers))
        start = time.perf_counter()
        result = gpt2.finetune(net, corpus, os.path.join(args.train, name), source_dir=source,
                               steps=args.train_steps, batch_size=4, seq_len=128, learning_rate=1e-3,
                               save_every=0, progress=False)
        print(f"fine-tuned {name} ({layers} x {width}) for {args.train_steps} steps in "
              f"{time.perf_counter() - start:.0f} s, last loss {result.loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
