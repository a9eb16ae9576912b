"""GGUF files for the llama.cpp peer, made from this project's own Hugging Face export, and a
greedy agreement check of llama.cpp's F32 file against this project.

    python bench/llamacpp_gguf.py [--shape 124M | --model-dir DIR] [--outtypes f32,f16,q8_0]
        [--converter PATH] [--agree 4 --agree-tokens 128]

Steps (each done once; a file that exists is kept, so delete it to remake it):
  1. The random checkpoint of --shape (bench/.cache/<shape>/, as every bench script) or the OpenAI
     checkpoint --model-dir, converted with `python -m gpt2.convert --to hf` into <folder>-hf/
     (a Hugging Face folder given as --model-dir is used as it is).
  2. llama.cpp's own converter, `convert_hf_to_gguf.py HF --outtype T --outfile F`, for each T of
     --outtypes (Q8_0 is the converter's own --outtype q8_0). Files: bench/.cache/<shape>-gguf/
     gpt2-<T>.gguf (or <model-dir>-gguf/), written under a temporary name and renamed into place.

The converter is not a package: it is vendor/llama.cpp/convert_hf_to_gguf.py in llama-cpp-python's
source package (bench/README.md, "llama.cpp"). Give its path with --converter or $LLAMA_CPP_CONVERTER.
It imports torch, transformers (the tokenizer) and the `gguf` package it finds beside itself
(vendor/llama.cpp/gguf-py), so run this script with the bench virtualenv's Python.

--agree N: greedy decoding of N random prompts (32 tokens, seed 0) for --agree-tokens new tokens
by this project (gpt2.sample_sequence, float32) and by llama.cpp on the F32 file (Llama.generate,
temp=0). For each prompt: how many new tokens agree, and at the first difference the gap between
our two best logits there (a near-tie: float32 rounding in a different order may flip it).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

OUTTYPES = ("f32", "f16", "q8_0")


def find_converter(path: str | None = None) -> str | None:
    """--converter, else $LLAMA_CPP_CONVERTER, if that file exists; None otherwise."""
    path = path or os.environ.get("LLAMA_CPP_CONVERTER")
    return path if path and os.path.isfile(path) else None


def hf_folder(model_dir: str, log=print) -> str:
    """A Hugging Face folder for `model_dir`: itself if it has config.json, else its conversion
    (`python -m gpt2.convert --to hf`) into `<model_dir>-hf/`, made once."""
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    return _common.convert_to_hf(model_dir, model_dir.rstrip(os.sep) + "-hf", log=log)


def gguf_path(model_dir: str, outtype: str) -> str:
    return os.path.join(model_dir.rstrip(os.sep) + "-gguf", f"gpt2-{outtype}.gguf")


def make_gguf(model_dir: str, outtype: str, converter: str, log=print) -> str:
    """The GGUF file of `model_dir` in `outtype` (f32, f16, q8_0), converted once with llama.cpp's
    convert_hf_to_gguf.py from the project's Hugging Face export."""
    if outtype not in OUTTYPES:
        raise SystemExit(f"unknown GGUF type {outtype!r}; choose from {', '.join(OUTTYPES)}")
    target = gguf_path(model_dir, outtype)
    if os.path.isfile(target):
        return target
    source = hf_folder(model_dir, log=log)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial"
    log(f"converting {source} to {target} with {converter} (once; cached) ...")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, converter, source, "--outtype", outtype, "--outfile", partial], capture_output=True, text=True
    )
    if result.returncode != 0 or not os.path.isfile(partial):
        if os.path.exists(partial):
            os.remove(partial)
        raise SystemExit(f"convert_hf_to_gguf.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    os.replace(partial, target)
    log(f"  done in {time.perf_counter() - start:.1f} s, {os.path.getsize(target) / _common.MiB:.0f} MiB")
    return target


def make_ggufs(model_dir: str, outtypes, converter: str, log=print) -> dict:
    """{outtype: path} for each of `outtypes`, made once (see make_gguf)."""
    return {t: make_gguf(model_dir, t, converter, log=log) for t in outtypes}


def agree(model_dir: str, f32_file: str, prompts: int, new_tokens: int, prompt_len: int = 32) -> list:
    """Greedy tokens of ours against llama.cpp F32 on `prompts` random prompts: one dict per prompt
    (equal new tokens, first difference, our top-2 logit gap there)."""
    import numpy as np

    _common.use_repo_checkout()
    import llama_cpp

    import gpt2

    model = gpt2.load_model(model_dir)
    llm = llama_cpp.Llama(f32_file, n_ctx=prompt_len + new_tokens, verbose=False)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(prompts):
        prompt = rng.integers(0, model.hparams.n_vocab, prompt_len).tolist()
        ours = np.asarray(gpt2.sample_sequence(model, [prompt], new_tokens, temperature=0))[0, prompt_len:].tolist()
        llm.reset()
        theirs = [t for t, _ in zip(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), range(new_tokens))]
        same = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens)
        row = dict(prompt=i, equal=same, of=new_tokens)
        if same < new_tokens:
            logits = model(np.asarray([prompt + ours[:same]], np.int32))["logits"].numpy()[0, -1]
            top = np.sort(logits)[-2:]
            ours_vs_theirs = logits[ours[same]] - logits[theirs[same]]
            row.update(
                first_difference=same,
                top2_gap=float(top[1] - top[0]),
                our_logit_margin_over_theirs=float(ours_vs_theirs),
            )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="124M", choices=list(_common.PRESET_SHAPES))
    parser.add_argument("--model-dir", help="an OpenAI checkpoint or Hugging Face folder instead of --shape's")
    parser.add_argument("--outtypes", default=",".join(OUTTYPES))
    parser.add_argument("--converter", help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    parser.add_argument("--agree", type=int, default=0, metavar="N", help="greedy agreement on N prompts")
    parser.add_argument("--agree-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    converter = find_converter(args.converter)
    if converter is None:
        parser.error(
            "llama.cpp's convert_hf_to_gguf.py not found: pass --converter PATH or set "
            "LLAMA_CPP_CONVERTER (it is vendor/llama.cpp/ in llama-cpp-python's source package)"
        )
    outtypes = [t.strip() for t in args.outtypes.split(",") if t.strip()]
    if args.agree and "f32" not in outtypes:
        outtypes.append("f32")
    model_dir = args.model_dir or _common.cached_checkpoint(args.shape)
    files = make_ggufs(model_dir, outtypes, converter)
    for outtype, path in files.items():
        print(f"{outtype:5s} {os.path.getsize(path) / _common.MiB:7.0f} MiB  {path}")
    if args.agree:
        print(f"\ngreedy agreement, ours (float32) vs llama.cpp F32, {args.agree_tokens} new tokens:")
        for row in agree(model_dir, files["f32"], args.agree, args.agree_tokens):
            text = f"  prompt {row['prompt']}: {row['equal']}/{row['of']} equal"
            if "first_difference" in row:
                text += (
                    f"; at step {row['first_difference']}: our top-2 logit gap {row['top2_gap']:.2e}, "
                    f"our logit of our token minus of theirs {row['our_logit_margin_over_theirs']:.2e}"
                )
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
