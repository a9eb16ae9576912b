"""Load test of the HTTP server (gpt2.serve): many clients asking for mixed lengths at once.

    python bench/serve_load.py [--clients 32] [--requests 2] [--min-tokens 8] [--max-tokens 256]
                               [--variants "--steps-per-run 1;--steps-per-run 4"]
                               [--baseline-repo ../base --baseline-args "..."]

`--clients` threads each send `--requests` completions one after another (closed loop), every
request with its own prompt and a max_tokens drawn log-uniformly from [min, max] (seeded, so every
server gets the same work), greedy; a quarter of them streamed. Reported per server: wall time,
tokens/s (completion tokens over the timed round), p50/p95 latency of all requests and of the
short ones (max_tokens <= --short-tokens), next to a short request's latency alone on the idle
server (its own decode time).

Servers run one at a time as subprocesses on a random-weight checkpoint (--model-dir, default a
cached one under bench/.cache/): this checkout once per --variants entry (extra server
arguments, ';'-separated; every client is on 127.0.0.1, so it allows 64 connections per address),
and with --baseline-repo also the server of another checkout (e.g. a
worktree of an older commit), started with --baseline-args. Each server gets an untimed priming
round of the same requests first (an older server compiles shapes on demand there), then the
timed round. Every answer is checked: 200, and max_tokens tokens unless it stopped early.
"""

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import threading
import time

import requests

from _common import CACHE_DIR, REPO_ROOT, cached_checkpoint, markdown_table, start_server, stop_server

WORDS = ("river", "engine", "garden", "market", "winter", "signal", "harbor", "letter", "silver", "forest",
         "planet", "window", "doctor", "bridge", "camera", "island")
DEFAULT_BASELINE_ARGS = "--max-batch 8 --max-queue 256 --warmup-lengths 16,64,256 --warmup-all-sizes"
THIS_CHECKOUT_ARGS = ["--max-connections-per-address", "64"]  # every client is on 127.0.0.1


def prompt_of(i):
    return f"Report {i}: the {WORDS[i % len(WORDS)]} near the {WORDS[(i * 7 + 3) % len(WORDS)]} was"


def workload(clients, per_client, low, high, seed):
    """[(client, stream?, prompt, max_tokens)] for every request, in each client's order."""
    rng = random.Random(seed)
    work = []
    for c in range(clients):
        for j in range(per_client):
            i = c * per_client + j
            tokens = int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
            work.append((c, i % 4 == 1, prompt_of(i), tokens))
    return work


def send(url, stream, prompt, max_tokens):
    """One completion: (seconds, completion tokens, finish_reason, text)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    start = time.perf_counter()
    r = requests.post(url + "/v1/completions", json=body, timeout=3600, stream=stream)
    if r.status_code != 200:
        raise RuntimeError(f"answered {r.status_code}: {r.text[:300]}")
    if not stream:
        data = r.json()
        choice = data["choices"][0]
        return time.perf_counter() - start, data["usage"]["completion_tokens"], choice["finish_reason"], choice["text"]
    text, finish, tokens = [], None, 0
    for line in r.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("error"):
            raise RuntimeError(f"stream error: {chunk['error']}")
        text.append(chunk["choices"][0]["text"])
        tokens += 1 if chunk["choices"][0]["text"] else 0
        finish = chunk["choices"][0]["finish_reason"] or finish
    return time.perf_counter() - start, None, finish, "".join(text)


def run_round(url, work):
    """Every client sends its requests in order, all clients at once. Returns (results, wall)."""
    results = [None] * len(work)
    by_client = {}
    for index, (client, *_rest) in enumerate(work):
        by_client.setdefault(client, []).append(index)
    barrier = threading.Barrier(len(by_client) + 1)

    def client_loop(indices):
        barrier.wait()
        for index in indices:
            _, stream, prompt, max_tokens = work[index]
            try:
                results[index] = send(url, stream, prompt, max_tokens)
            except Exception as error:  # noqa: BLE001 - reported below
                results[index] = error

    threads = [threading.Thread(target=client_loop, args=(indices,)) for indices in by_client.values()]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return results, wall


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] if values else float("nan")


def measure(name, repo, model_dir, args, work, short_tokens, logs):
    log_path = os.path.join(logs, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + ".log")
    print(f"{name}: starting ({' '.join(args)}) ...", flush=True)
    proc, url, ready = start_server(repo, model_dir, args, log_path)
    try:
        print(f"  ready after {ready:.0f} s; a short request alone ...", flush=True)
        alone = [send(url, False, prompt_of(10_000 + k), short_tokens)[0] for k in range(3)]
        print("  priming round (untimed) ...", flush=True)
        _, priming = run_round(url, work)
        print(f"  priming round took {priming:.0f} s; timed round ...", flush=True)
        results, wall = run_round(url, work)
    finally:
        stop_server(proc)
    problems = []
    for (_, _, _, max_tokens), (_, count, finish, _) in zip(work, results):
        if count is not None and count != max_tokens and finish != "stop":
            problems.append(f"{count} of {max_tokens} tokens with finish_reason {finish!r}")
    tokens = sum(count if count is not None else max_tokens for (_, _, _, max_tokens), (_, count, _, _)
                 in zip(work, results))
    latencies = [r[0] for r in results]
    short = [r[0] for (_, _, _, m), r in zip(work, results) if m <= short_tokens]
    return dict(name=name, ready=ready, priming=priming, wall=wall, tokens=tokens, p50=statistics.median(latencies),
                p95=percentile(latencies, 0.95), short_p50=statistics.median(short) if short else float("nan"),
                short_p95=percentile(short, 0.95), alone=statistics.median(alone), problems=problems,
                texts=[r[3] for r in results])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--min-tokens", type=int, default=8, help="smallest max_tokens (default 8)")
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens (default 256)")
    parser.add_argument("--short-tokens", type=int, default=32,
                        help="requests of at most this many tokens count as short (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload (default 0)")
    parser.add_argument("--shape", default="124M", help="random checkpoint shape when --model-dir is not given")
    parser.add_argument("--model-dir", help="model folder to serve (default: a cached random checkpoint of --shape)")
    parser.add_argument("--variants", default="",
                        help="';'-separated extra arguments for this checkout's server, one run each "
                             "(default: one run with its defaults)")
    parser.add_argument("--baseline-repo", help="also measure the server of this checkout (e.g. an older commit)")
    parser.add_argument("--baseline-args", default=DEFAULT_BASELINE_ARGS,
                        help=f"arguments for the baseline server (default: {DEFAULT_BASELINE_ARGS!r})")
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or not 1 <= args.min_tokens <= args.max_tokens:
        raise SystemExit("--clients and --requests must be >= 1 and 1 <= --min-tokens <= --max-tokens")

    model_dir = os.path.abspath(args.model_dir) if args.model_dir else cached_checkpoint(args.shape)
    logs = os.path.join(CACHE_DIR, "logs", "serve_load")
    os.makedirs(logs, exist_ok=True)
    work = workload(args.clients, args.requests, args.min_tokens, args.max_tokens, args.seed)
    runs = []
    if args.baseline_repo:
        runs.append(measure("baseline " + os.path.basename(os.path.abspath(args.baseline_repo)),
                            os.path.abspath(args.baseline_repo), model_dir, args.baseline_args.split(), work,
                            args.short_tokens, logs))
    for variant in (args.variants.split(";") if args.variants else [""]):
        runs.append(measure("this checkout " + variant.strip(), REPO_ROOT, model_dir,
                            THIS_CHECKOUT_ARGS + variant.split(), work, args.short_tokens, logs))

    shorts = sum(1 for *_, m in work if m <= args.short_tokens)
    print()
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.min_tokens}..{args.max_tokens} "
          f"(log-uniform, seed {args.seed}; {shorts} short = <= {args.short_tokens} tokens), greedy, "
          f"a quarter streamed; {os.path.basename(model_dir)}")
    print()
    rows = [[r["name"], f"{r['ready']:.0f}", f"{r['priming']:.0f}", f"{r['wall']:.1f}",
             f"{r['tokens'] / r['wall']:.1f}", f"{r['p50']:.1f}", f"{r['p95']:.1f}", f"{r['short_p50']:.1f}",
             f"{r['short_p95']:.1f}", f"{r['alone']:.2f}"]
            for r in runs]
    print(markdown_table(["server", "ready s", "priming round s", "timed round s", "tokens/s", "p50 s", "p95 s",
                          "short p50 s", "short p95 s", "short alone s"], rows))
    if len(runs) > 1:
        base = runs[0]["tokens"] / runs[0]["wall"]
        print()
        for r in runs[1:]:
            print(f"{r['name']}: {r['tokens'] / r['wall'] / base:.2f}x the throughput of {runs[0]['name']}")
        same = sum(a == b for a, b in zip(runs[0]["texts"], runs[-1]["texts"]))
        print(f"answers equal to {runs[0]['name']}'s: {same} of {len(work)} (greedy; random weights have near-ties)")
    failed = [(r["name"], p) for r in runs for p in r["problems"]]
    if failed:
        print(f"\nFAILED: {len(failed)} answers with the wrong length, e.g. {failed[0]}")
        sys.exit(1)
    print("\nchecks: every answer 200, with max_tokens tokens unless it stopped at <|endoftext|>")


if __name__ == "__main__":
    main()
