"""lm-evaluation-harness against the HTTP server: a small local task, both request kinds.

    .venv-bench/bin/python bench/lm_eval_run.py [--model-dir DIR | --url http://127.0.0.1:5000]
                                                    [--num-concurrent 4] [--limit N]

Runs `lm_eval --model local-completions` (lm-eval must be installed in the Python running this
script, e.g. the bench venv: `pip install lm-eval`) on two tasks over bench/data/lm_eval_smoke.jsonl
(32 one-line cloze questions): `gpt2_serve_choice` (multiple choice: loglikelihood requests, i.e.
`echo` + `logprobs` with token-id prompts) and `gpt2_serve_gen` (generate_until with a stop at a
new line, exact match). The tokenizer is the server's own (`tokenizer_backend=remote`: the
/tokenize, /detokenize and /tokenizer_info endpoints), so nothing is fetched from a model hub.

Without --url the server is started here (this checkout, `python -m gpt2.serve`) on --model-dir
(default: a cached random-weight 124M checkpoint under bench/.cache/; random weights score at
chance, which is the point: the run goes through). Task YAML files and lm-eval's output go to
bench/.cache/lm_eval/.
"""

import argparse
import json
import os
import subprocess
import sys

from _common import BENCH_DIR, CACHE_DIR, REPO_ROOT, cached_checkpoint, start_server, stop_server

DATA = os.path.join(BENCH_DIR, "data", "lm_eval_smoke.jsonl")
MODEL_ID = "gpt2-bench"

CHOICE_TASK = """task: gpt2_serve_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GENERATE_TASK = """task: gpt2_serve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer] | trim}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(\\\\S+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def write_tasks(folder):
    os.makedirs(folder, exist_ok=True)
    for name, text in (("gpt2_serve_choice.yaml", CHOICE_TASK), ("gpt2_serve_gen.yaml", GENERATE_TASK)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text.format(data=DATA))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one here)")
    parser.add_argument("--model-dir", help="model to serve (default: a cached random 124M checkpoint)")
    parser.add_argument("--model-id", default=MODEL_ID, help=f"model id the server answers to (default {MODEL_ID})")
    parser.add_argument("--num-concurrent", type=int, default=4, help="concurrent requests from lm-eval (default 4)")
    parser.add_argument("--limit", type=int, help="examples per task (default: all 32)")
    args = parser.parse_args()
    try:
        import lm_eval  # noqa: F401 - only checks that it is installed here
    except ImportError:
        raise SystemExit("lm-eval is not installed in this Python; use the bench venv: pip install lm-eval") from None

    work = os.path.join(CACHE_DIR, "lm_eval")
    tasks = os.path.join(work, "tasks")
    write_tasks(tasks)
    proc = None
    url = args.url
    if url is None:
        model_dir = os.path.abspath(args.model_dir) if args.model_dir else cached_checkpoint("124M")
        print(f"starting the server on {model_dir} ...", flush=True)
        proc, url, _ = start_server(REPO_ROOT, model_dir, [], os.path.join(work, "server.log"), args.model_id)
    model_args = ",".join([f"base_url={url.rstrip('/')}/v1/completions", f"model={args.model_id}",
                           "tokenizer_backend=remote", "tokenized_requests=True",
                           f"num_concurrent={args.num_concurrent}", "max_retries=2", "max_length=1024"])
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "gpt2_serve_choice,gpt2_serve_gen", "--include_path", tasks,
               "--output_path", os.path.join(work, "results")]
    if args.limit:
        command += ["--limit", str(args.limit)]
    print(" ".join(command), flush=True)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        result = subprocess.run(command, env=env, cwd=work)
    finally:
        if proc is not None:
            stop_server(proc)
    if result.returncode:
        raise SystemExit(f"lm_eval failed (exit {result.returncode})")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(os.path.join(work, "results"))
                   for name in names if name.startswith("results") and name.endswith(".json"))
    if found:
        with open(found[-1], encoding="utf-8") as f:
            print(json.dumps(json.load(f)["results"], indent=1))


if __name__ == "__main__":
    main()
