"""GPT2-ML 1.5B (random weights, their exact layout) on this machine: load time and peak RSS,
generate.py's peak RSS, and ms/token in float32 and bfloat16.

    python bench/gpt2ml_random.py [--dir /work/wt/cache/gpt2ml-1.5B] [--length 16] [--delete]

The checkpoint is written once with `python -m gpt2.checkpoint --random gpt2ml-1.5B DIR`
(model.ckpt-220000 with global_step and Adafactor's slots, config.json: 1.37B weights, 5.5 GB),
plus a stand-in vocabulary of 8021 lines ([PAD], [unused*], [UNK], [CLS], [SEP], [MASK], CJK
characters: their clue-vocab.txt is not obtainable here; only its size matters for speed).
Each figure comes from a fresh process:
  load:      `gpt2.load_model(DIR)`: seconds, peak RSS (VmHWM) and the RSS after `import
             tensorflow, gpt2` (baseline);
  generate:  `generate.py --model DIR --prompt 宇宙的意义是 --length L [--dtype bfloat16]`, its
             peak RSS and wall time (GNU time);
  ms/token:  after load_model(DIR, dtype), greedy `sample_rows` of 2 and of L + 2 new tokens, each
             called twice; from the second calls (warm: nothing left to trace), (t[L+2] - t[2]) / L,
             the prompt's prefill excluded. The first calls' seconds are printed too.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "宇宙的意义是"
N_VOCAB = 8021


def stand_in_vocab(n_vocab=N_VOCAB):
    """A vocabulary with clue-vocab.txt's special ids ([PAD] 0, [UNK] 100, [SEP] 102) and size."""
    tokens = ["[PAD]", *[f"[unused{i}]" for i in range(1, 100)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return tokens + [chr(0x4E00 + i) for i in range(n_vocab - len(tokens))]


WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import _common
_common.use_repo_checkout()
import tensorflow as tf
import gpt2
from gpt2.sampling import api
import encoder
model_dir, dtype, length = sys.argv[2], sys.argv[3], int(sys.argv[4])
baseline = _common.current_rss_bytes()
start = time.perf_counter()
model = gpt2.load_model(model_dir, dtype=dtype)
load_seconds = time.perf_counter() - start
load_peak = _common.peak_rss_bytes()
result = dict(load_seconds=load_seconds, baseline=baseline, load_peak=load_peak, params=int(model.count_params()))
if length:
    enc = encoder.encoder_for_model_dir(model_dir)
    prompt = enc.encode(sys.argv[5])
    ban = {enc.pad_token: -100}
    times = {}
    for n in (2, length + 2, 2, length + 2):  # the second call of each length is the one kept: warm
        start = time.perf_counter()
        api.sample_rows(model, [prompt], n, temperature=0, logit_bias=ban)
        times.setdefault(n, []).append(time.perf_counter() - start)
    result.update(first_calls=[t[0] for t in times.values()])
    times = {n: t[-1] for n, t in times.items()}
    result.update(ms_per_token=1000 * (times[length + 2] - times[2]) / length, peak=_common.peak_rss_bytes())
print("RESULT " + json.dumps(result), flush=True)
"""


def worker(model_dir, dtype, length):
    out = subprocess.run([sys.executable, "-c", WORKER, os.path.dirname(os.path.abspath(__file__)), model_dir,
                          dtype, str(length), PROMPT], capture_output=True, text=True, cwd=REPO, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def generate_py(model_dir, dtype, length):
    """(peak RSS bytes, wall seconds) of generate.py, from GNU time."""
    command = ["/usr/bin/time", "-f", "TIME %M %e", sys.executable, "generate.py", "--model", model_dir, "--prompt",
               PROMPT, "--length", str(length), "--seed", "0", "--dtype", dtype]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    line = next((line for line in out.stderr.splitlines() if line.startswith("TIME ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"generate.py failed:\n{out.stderr[-3000:]}")
    kib, seconds = line.split()[1:]
    sample = out.stdout.split("SAMPLE 1", 1)[-1].strip().splitlines()[1:2]
    return int(kib) * 1024, float(seconds), sample


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/work/wt/cache/gpt2ml-1.5B", help="checkpoint folder (written if missing)")
    parser.add_argument("--length", type=int, default=16, help="new tokens (default: 16)")
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint folder at the end")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default: both)")
    parser.add_argument("--ms-only", action="store_true", help="only the ms/token workers")
    args = parser.parse_args(argv)
    GiB, model_dir = 1 << 30, args.dir
    if not os.path.isdir(model_dir):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpt2.checkpoint", "--random", "gpt2ml-1.5B", model_dir], cwd=REPO,
                       check=True)
        print(f"wrote {model_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    vocab = os.path.join(model_dir, "clue-vocab.txt")
    if not os.path.isfile(vocab):
        with open(vocab + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(stand_in_vocab()) + "\n")
        os.replace(vocab + ".tmp", vocab)
    _common.warm_page_cache(model_dir)
    rows = []
    if args.ms_only:
        for dtype in args.dtypes.split(","):
            print(f"ms/token {dtype}: {json.dumps(worker(model_dir, dtype, args.length))}", flush=True)
        return 0
    load = worker(model_dir, "float32", 0)
    print(f"load: {json.dumps(load)}", flush=True)
    for dtype in args.dtypes.split(","):
        peak, seconds, sample = generate_py(model_dir, dtype, args.length)
        print(f"generate.py {dtype}: peak {peak / GiB:.2f} GiB, {seconds:.0f} s; sample {sample}", flush=True)
        timed = worker(model_dir, dtype, args.length)
        print(f"ms/token {dtype}: {json.dumps(timed)}", flush=True)
        rows.append([dtype, f"{load['load_seconds']:.0f}" if dtype == "float32" else f"{timed['load_seconds']:.0f}",
                     f"{(load['load_peak'] if dtype == 'float32' else timed['load_peak']) / GiB:.2f}",
                     f"{peak / GiB:.2f}", f"{seconds:.0f}", f"{timed['ms_per_token']:.0f}"])
    print(f"\nparameters: {load['params']:,}; load average: {os.getloadavg()}\n")
    print(_common.markdown_table(["dtype", "load_model s", "load peak RSS GiB", f"generate.py --length {args.length} "
                                  "peak RSS GiB", "generate.py wall s", "ms/token (greedy, batch 1)"], rows,
                                 align="l" + "r" * 5))
    if args.delete:
        import shutil

        shutil.rmtree(model_dir)
        print(f"deleted {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
