"""bfloat16, int8 and float16 weights against float32 on the same random checkpoint: the largest logit
difference and how often greedy decoding picks the same token, over 256 steps.

    python bench/bf16_agreement.py [--shape 124M] [--steps 256] [--prompts 4] [--dtypes bfloat16,int8,float16]

Every model loads the same checkpoint (bench/.cache/<shape>/). Greedy agreement is measured
teacher-forced: float32 decodes `steps` tokens greedily from each prompt; each model then scores
that whole sequence in one forward pass, and the table counts the positions where its argmax is
float32's (so one early difference does not decide the rest). Also: the sampler's own
free-running greedy tokens in the reduced dtype vs float32, and how far they agree before the
first difference. Random weights give small, close logits; released weights may agree more.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="124M", choices=list(_common.PRESET_SHAPES))
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--dtypes", default="bfloat16",
                        help="comma-separated: bfloat16, int8, float16 (default: bfloat16)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"bfloat16", "int8", "float16"}:
        parser.error("--dtypes takes bfloat16, int8 and/or float16")
    _common.use_repo_checkout()
    import numpy as np

    import gpt2

    model_dir = _common.cached_checkpoint(args.shape)
    full = gpt2.load_model(model_dir)
    prompts = np.random.default_rng(0).integers(0, 50257, (args.prompts, 16)).tolist()
    reference = gpt2.sample_sequence(full, prompts, args.steps, temperature=0)
    full_logits = [full(row[None, :-1])["logits"].numpy()[0] for row in reference]
    for dtype in dtypes:
        reduced = gpt2.load_model(model_dir, dtype=dtype)
        free = gpt2.sample_sequence(reduced, prompts, args.steps, temperature=0)
        max_diff, scale, agree, total, prefixes = 0.0, 0.0, 0, 0, []
        for row, sampled, a in zip(reference, free, full_logits):
            b = reduced(row[None, :-1])["logits"].numpy()[0]
            max_diff = max(max_diff, float(np.abs(a - b).max()))
            scale = max(scale, float(np.abs(a).max()))
            agree += int((a.argmax(-1) == b.argmax(-1))[15:].sum())
            total += len(a) - 15
            differs = np.flatnonzero(sampled[16:] != row[16:])
            prefixes.append(int(differs[0]) if len(differs) else args.steps)
        del reduced
        print(f"\n## {dtype} vs float32, {args.shape} (random weights), {args.prompts} prompts x {args.steps} steps\n")
        print(_common.markdown_table(["measure", "value"], [
            ["largest |logit difference|", f"{max_diff:.4f} (largest |logit| {scale:.2f})"],
            ["teacher-forced greedy agreement", f"{agree}/{total} = {100 * agree / total:.1f}%"],
            ["free-running: steps equal before the first difference", ", ".join(map(str, prefixes))],
        ]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
