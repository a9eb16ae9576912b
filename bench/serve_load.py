"""Load test of the HTTP server (gpt2.serve): concurrent requests, every answer checked, throughput
of batched serving (--max-batch 8) against one request at a time (--max-batch 1).

    python bench/serve_load.py [--requests 32] [--tokens 32] [--rounds 2] [--mix greedy|sampled]

Both servers run as subprocesses on a random-weight 124M checkpoint (written once under
bench/.cache/) and stay up side by side; rounds alternate between them, so slow phases of a
shared machine hit both. A round fires all requests at once (one thread and connection each):
a quarter to /generate, a quarter streamed from /v1/completions, the rest plain completions,
every prompt different. With --mix greedy (default) answers are deterministic; with --mix
sampled each request has its own seed, and a seeded row's random stream does not depend on its
batch-mates. Either way every answer must equal the one-at-a-time server's answer to the same
request, the same in every round, with consistent token counts and finish reasons.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import requests

from _common import CACHE_DIR, REPO_ROOT, cached_checkpoint, child_env, markdown_table

WORDS = ("river", "engine", "garden", "market", "winter", "signal", "harbor", "letter", "silver", "forest",
         "planet", "window", "doctor", "bridge", "camera", "island")


def prompt_of(i):
    return f"Report {i}: the {WORDS[i % len(WORDS)]} near the {WORDS[(i * 7 + 3) % len(WORDS)]} was"


def start_server(model_dir, max_batch, log_path, extra=()):
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2.serve", "--model", model_dir, "--port", "0", "--max-batch", str(max_batch),
         "--max-queue", "256", "--warmup-lengths", "16", "--warmup-all-sizes", "--log-level", "warning", *extra],
        cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=log, text=True,
    )
    proc.log = log
    return proc


def wait_for_url(proc, log_path):
    line = proc.stdout.readline()
    match = re.search(r"on (http://\S+)", line)
    if not match:
        proc.kill()
        with open(log_path, encoding="utf-8") as f:
            raise SystemExit(f"server did not start:\n{line}{f.read()[-3000:]}")
    return match.group(1)


def request_spec(i, tokens, mix):
    sampling = {"temperature": 1.0, "top_k": 40, "seed": 1000 + i} if mix == "sampled" else {"temperature": 0.0}
    kind = ("generate", "stream", "completion", "completion")[i % 4]
    if kind == "generate":
        body = {"text": prompt_of(i), "length": tokens, **sampling}
        if mix == "greedy":
            body = {"text": prompt_of(i), "length": tokens, "top_k": 1}
        return kind, "/generate", body
    body = {"model": "124M", "prompt": prompt_of(i), "max_tokens": tokens, "stream": kind == "stream", **sampling}
    return kind, "/v1/completions", body


def send(url, kind, path, body):
    """Returns (text, completion tokens or None, finish_reason or None, seconds)."""
    start = time.perf_counter()
    r = requests.post(url + path, json=body, timeout=600, stream=kind == "stream")
    if r.status_code != 200:
        raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
    if kind == "generate":
        return r.json()["generated_text"], None, None, time.perf_counter() - start
    if kind == "completion":
        data = r.json()
        choice = data["choices"][0]
        return choice["text"], data["usage"]["completion_tokens"], choice["finish_reason"], time.perf_counter() - start
    text, finish = [], None
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        if line == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        text.append(chunk["choices"][0]["text"])
        finish = chunk["choices"][0]["finish_reason"] or finish
    return "".join(text), None, finish, time.perf_counter() - start


def run_round(url, specs):
    """Fires every request at once; returns (answers, wall seconds, stats delta)."""
    before = requests.get(url + "/health", timeout=30).json()["stats"]
    answers = [None] * len(specs)
    barrier = threading.Barrier(len(specs) + 1)

    def worker(i):
        barrier.wait()
        try:
            answers[i] = send(url, *specs[i])
        except Exception as error:  # noqa: BLE001 - reported below
            answers[i] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = requests.get(url + "/health", timeout=30).json()["stats"]
    errors = [a for a in answers if isinstance(a, Exception)]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return answers, wall, {k: after[k] - before[k] for k in after if k != "largest_batch"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per round (default 32)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per server (default 2)")
    parser.add_argument("--mix", choices=["greedy", "sampled"], default="greedy")
    parser.add_argument("--shape", default="124M")
    parser.add_argument("--no-xla", action="store_true", help="serve without XLA")
    args = parser.parse_args()
    if args.requests < 1 or args.tokens < 1:
        raise SystemExit("--requests and --tokens must be >= 1")

    model_dir = cached_checkpoint(args.shape)
    logs = os.path.join(CACHE_DIR, "logs")
    os.makedirs(logs, exist_ok=True)
    extra = ["--model-id", "124M"] + (["--no-xla"] if args.no_xla else [])
    configs = {"batched (max batch 8)": 8, "one at a time (max batch 1)": 1}
    print(f"starting two servers on a random {args.shape} checkpoint (compiling takes a while) ...", flush=True)
    procs, urls = {}, {}
    start = time.perf_counter()
    for name, max_batch in configs.items():
        log_path = os.path.join(logs, f"serve-b{max_batch}.log")
        procs[name] = (start_server(model_dir, max_batch, log_path, extra), log_path)
    try:
        for name, (proc, log_path) in procs.items():
            urls[name] = wait_for_url(proc, log_path)
        print(f"  both ready after {time.perf_counter() - start:.0f} s", flush=True)
        specs = [request_spec(i, args.tokens, args.mix) for i in range(args.requests)]
        reference = None  # answers of the one-at-a-time server's first round
        results = {name: [] for name in configs}
        order = list(configs)[::-1]  # one-at-a-time first: its answers are the reference
        print("priming round (untimed) ...", flush=True)
        for name in order:
            run_round(urls[name], specs[: min(8, len(specs))])
        problems = []
        for round_index in range(args.rounds):
            for name in order if round_index % 2 == 0 else order[::-1]:
                answers, wall, stats = run_round(urls[name], specs)
                if reference is None:
                    reference = answers
                for i, ((kind, _, _), answer, ref) in enumerate(zip(specs, answers, reference)):
                    text, count, finish, _ = answer
                    if text != ref[0]:
                        problems.append(f"{name} round {round_index + 1} request {i} ({kind}): text differs "
                                        f"from the one-at-a-time answer: {text[:60]!r} vs {ref[0][:60]!r}")
                    if count is not None and not (0 <= count <= args.tokens
                                                  and (finish == "length") == (count == args.tokens)):
                        problems.append(f"request {i}: {count} tokens with finish_reason {finish!r}")
                    if kind != "generate" and finish not in ("stop", "length"):
                        problems.append(f"request {i}: finish_reason {finish!r}")
                tokens = stats["generated_tokens"]
                results[name].append(dict(wall=wall, tokens=tokens, stats=stats,
                                          latencies=sorted(a[3] for a in answers)))
                print(f"  {name}, round {round_index + 1}: {wall:.1f} s, {tokens / wall:.1f} tokens/s, "
                      f"{stats['batches']} batches", flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.log.close()

    rows = []
    for name, runs in results.items():
        for i, run in enumerate(runs):
            stats, lat = run["stats"], run["latencies"]
            rows.append([
                name, i + 1, f"{run['wall']:.1f}", f"{run['tokens'] / run['wall']:.1f}",
                f"{args.requests / run['wall']:.2f}", f"{statistics.median(lat):.1f}",
                f"{lat[min(len(lat) - 1, int(0.95 * len(lat)))]:.1f}",
                f"{stats['batches']} ({stats['batched_rows'] / max(stats['batches'], 1):.1f})",
            ])
    print()
    print(f"{args.requests} concurrent requests x {args.tokens} new tokens, random {args.shape}, mix {args.mix}"
          f"{', no XLA' if args.no_xla else ''}; tokens = tokens sampled (incl. <|endoftext|>)")
    print()
    print(markdown_table(["server", "round", "wall s", "tokens/s", "requests/s", "p50 latency s",
                          "p95 latency s", "batches (avg rows)"], rows))
    medians = {name: statistics.median(r["tokens"] / r["wall"] for r in runs) for name, runs in results.items()}
    batched, solo = medians.values()
    print(f"\nmedian throughput: batched {batched:.1f} tokens/s vs one at a time {solo:.1f} tokens/s "
          f"= {batched / solo:.2f}x")
    checked = args.requests * args.rounds * len(configs)
    if problems:
        print(f"\nFAILED: {len(problems)} problems in {checked} answers:")
        for p in problems[:20]:
            print("  " + p)
        sys.exit(1)
    print(f"checks: all {checked} answers equal the one-at-a-time server's first-round answers; "
          "token counts and finish reasons consistent")


if __name__ == "__main__":
    main()
