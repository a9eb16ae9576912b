"""Encoder throughput (MB/s of UTF-8 input) beside tiktoken's GPT-2 encoding, on a few MB of real text.

Text (default): every module, class and function docstring of the Python standard library running this
script (the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded, walked in
sorted order, docstrings in ``ast.walk`` order joined by blank lines; files that do not parse, a few
deliberately broken test files, are skipped).  That is about 2 MB of English prose that exists on every
machine with Python, needs no network and is reproducible for a given Python version; it is built once
(~15 s) and cached in ``bench/.cache/``.  ``--file PATH`` benchmarks any UTF-8 file instead.

Rows: "cold" = fresh BPE cache (every distinct pre-token is BPE-merged once during the run), "warm" =
the same text again with the cache filled, "encode_file" = warm, chunked file encoding (1M-char chunks),
and tiktoken 0.x ``encode_ordinary`` built from the same local ``encoder.json``/``vocab.bpe`` (tiktoken is
not a dependency: its row says "skipped" if it is not installed).  Each figure is the best of
``--repeat`` runs.  The script also checks that our ids are identical to tiktoken's.

    python bench/encode_speed.py [--file PATH] [--max-mb 4] [--repeat 3]
"""

import argparse
import ast
import os
import sys
import sysconfig
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from encoder import EOT_TEXT, Encoder  # noqa: E402
from encoder.encoder import PACKAGE_DIR  # noqa: E402

ENCODER_JSON = os.path.join(PACKAGE_DIR, "encoder.json")
VOCAB_BPE = os.path.join(PACKAGE_DIR, "vocab.bpe")


def stdlib_docstrings():
    """Returns the standard library's docstrings as one text (see the module docstring)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docstrings = []
    for directory, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(directory, name), "rb") as f:
                source = f.read()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        docstrings.append(docstring)
    return "\n\n".join(docstrings)


def load_text(path, max_mb):
    """Returns (text, path, description, truncated): ``path``'s text or the cached stdlib docstrings.

    The text is cut to at most ``max_mb`` MB (``truncated`` is then True).
    """
    if path is None:
        version = "%d.%d.%d" % sys.version_info[:3]
        path = os.path.join(ROOT, "bench", ".cache", f"stdlib-docstrings-{version}.txt")
        if not os.path.exists(path):
            print(f"building {path} (once) ...", flush=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            text = stdlib_docstrings()
            with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        description = f"Python {version} stdlib docstrings"
    else:
        description = path
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    limit = int(max_mb * 1e6)
    truncated = len(text.encode("utf-8")) > limit
    if truncated:
        text = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
        description += f" (first {max_mb:g} MB)"
    return text, path, description, truncated


def best_time(function, repeat, before=None):
    """Returns (result, best wall time in seconds) of ``function()`` over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def tiktoken_gpt2():
    """Returns tiktoken's GPT-2 Encoding built from the local vocabulary files, or None if not installed."""
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return None
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=VOCAB_BPE, encoder_json_file=ENCODER_JSON)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", help="UTF-8 text file to encode (default: Python stdlib docstrings)")
    parser.add_argument("--max-mb", type=float, default=4.0, help="use at most this many MB of the text")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best is reported")
    args = parser.parse_args(argv)

    text, path, description, truncated = load_text(args.file, args.max_mb)
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"text: {description}: {megabytes:.2f} MB, {len(text):,} chars")

    start = time.perf_counter()
    enc = Encoder.from_files(ENCODER_JSON, VOCAB_BPE)
    print(f"our encoder: loaded in {time.perf_counter() - start:.2f} s")
    ids, cold = best_time(lambda: enc.encode(text), args.repeat, before=enc.clear_cache)
    _, warm = best_time(lambda: enc.encode(text), args.repeat)
    rows = [("ours, cold cache", cold, len(ids)), ("ours, warm cache", warm, len(ids))]
    if not truncated:  # encode_file reads the whole file, so it only compares when the file is `text`
        _, file_time = best_time(lambda: sum(len(a) for a in enc.encode_file(path)), args.repeat)
        rows.append(("ours, warm, encode_file", file_time, len(ids)))

    reference = tiktoken_gpt2()
    if reference is None:
        rows.append(("tiktoken", None, None))
        print("tiktoken: skipped (not installed)")
    else:
        reference.encode_ordinary("warm up")
        reference_ids, reference_time = best_time(lambda: reference.encode_ordinary(text), args.repeat)
        rows.append(("tiktoken (Rust)", reference_time, len(reference_ids)))
        same = reference_ids == ids
        print(f"ids identical to tiktoken: {same} ({len(ids):,} tokens)")

    print()
    print("| encoder | MB/s | seconds | tokens |")
    print("|---|---:|---:|---:|")
    for name, seconds, tokens in rows:
        if seconds is None:
            print(f"| {name} | skipped | | |")
        else:
            print(f"| {name} | {megabytes / seconds:.2f} | {seconds:.3f} | {tokens:,} |")
    return 0 if reference is None or same else 1


if __name__ == "__main__":
    sys.exit(main())
