"""Checks the Hugging Face folders this project writes and reads against real `transformers`.

    .venv-bench/bin/python bench/hf_check.py [--shapes tiny,124M] [--tokens 64]

Needs the bench virtualenv (torch CPU + transformers, see bench/README.md); not a test: the
project never depends on them. For each model (the tests' tiny fixture, and random-weight
checkpoints of the preset shapes written once into bench/.cache/, converted once to <shape>-hf/):
  1. `python -m gpt2.convert --to hf` writes the OpenAI checkpoint as a Hugging Face folder;
  2. transformers' `GPT2LMHeadModel.from_pretrained` loads it (float32, eval mode) and its
     `AutoTokenizer` (from vocab.json + merges.txt) must encode a text as our encoder does;
  3. its logits on the same random tokens are compared with `gpt2.load_model` of the original
     OpenAI folder and of the converted folder;
  4. the other way: a GPT2LMHeadModel of the same shape with transformers' own random
     initialisation is saved with `save_pretrained`, loaded with `gpt2.load_model`, and both
     models' logits compared.
Pass: every max abs logit difference <= 1e-4 (--atol) and identical token ids.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

TINY = os.path.join(_common.REPO_ROOT, "tests", "data", "tiny-model")
TEXT = "Hello, my name is GPT-2 and I can read Hugging Face folders: 1234, don't panic!\n\tdéjà vu"


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def our_logits(model_dir, tokens):
    import gpt2

    return gpt2.load_model(model_dir)(tokens)["logits"].numpy()


def check(name, openai_dir, hf_dir, tokens, atol):
    """Rows of (check, max abs diff or result, pass)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from encoder import encoder_for_model_dir

    rows = []
    start = time.perf_counter()
    theirs = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference = hf_logits(theirs, tokens)
    for label, folder in (("ours (OpenAI folder)", openai_dir), ("ours (converted folder)", hf_dir)):
        diff = float(np.abs(our_logits(folder, tokens) - reference).max())
        rows.append([name, f"transformers loads `--to hf` output; logits vs {label}", f"{diff:.2e}", diff <= atol])
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    same = tokenizer(TEXT)["input_ids"] == encoder_for_model_dir(hf_dir).encode(TEXT)
    rows.append([name, "AutoTokenizer(vocab.json, merges.txt) ids == our encoder's",
                 "equal" if same else "DIFFER", same])

    # The other direction: what save_pretrained writes today, read by gpt2.load_model.
    torch.manual_seed(0)
    saved_dir = hf_dir + "-save_pretrained"
    GPT2LMHeadModel(theirs.config).eval().save_pretrained(saved_dir)
    fresh = GPT2LMHeadModel.from_pretrained(saved_dir, dtype=torch.float32).eval()
    diff = float(np.abs(our_logits(saved_dir, tokens) - hf_logits(fresh, tokens)).max())
    rows.append([name, "gpt2.load_model reads save_pretrained output; logits vs transformers", f"{diff:.2e}",
                 diff <= atol])
    print(f"{name}: checked in {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,124M",
                        help="models: 'tiny' (the tests' fixture) and/or presets among "
                             + ",".join(_common.PRESET_SHAPES) + " (default: tiny,124M)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row, 2 rows (default: 64)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference (default: 1e-4)")
    args = parser.parse_args(argv)
    _common.use_repo_checkout()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import numpy as np
        import torch  # noqa: F401
        import transformers
    except ImportError as error:
        raise SystemExit(f"needs the bench virtualenv with torch and transformers (bench/README.md): {error}") from None
    transformers.utils.logging.disable_progress_bar()

    rows = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape == "tiny":
            openai_dir, hf_dir = TINY, _common.convert_to_hf(TINY, os.path.join(_common.CACHE_DIR, "tiny-hf"))
        else:
            openai_dir, hf_dir = _common.cached_checkpoint(shape), _common.cached_hf_folder(shape)
        hparams = _common.read_hparams(openai_dir)
        tokens = np.random.default_rng(0).integers(0, hparams["n_vocab"], (2, min(args.tokens, hparams["n_ctx"])))
        rows += check(shape, openai_dir, hf_dir, tokens.astype(np.int64), args.atol)

    print(f"\n## Hugging Face interchange against transformers {transformers.__version__} "
          f"(torch {torch.__version__}, CPU, float32)\n")
    print(_common.markdown_table(["model", "check", "max abs diff", "pass"],
                                 [row[:3] + ["yes" if row[3] else "NO"] for row in rows], align="llrl"))
    return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
