"""`python -m gpt2.serve` as a real process: it serves, and SIGTERM shuts it down in order (running
streams finish within the grace period or are cut short with an error event, then exit 0)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import requests

from serve_support import GREEDY, MODEL_DIR, REPO, sse_events

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")


@pytest.fixture(scope="module")
def cli_server():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2.serve", "--model", MODEL_DIR, "--port", "0", "--no-xla", "--max-batch", "2",
         "--shutdown-grace", "1", "--log-level", "info", "--served-model-name", "gpt-3.5-turbo",
         "--chat-history", "truncate"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"serving tiny-model on (http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        pytest.fail("the server did not start: " + line + proc.stderr.read()[-3000:])
    proc.url = match.group(1)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stream(url, max_tokens, out):
    r = requests.post(url + "/v1/completions", json={"model": "tiny-model", "prompt": "Hi", "max_tokens": max_tokens,
                                                     "temperature": 0, "stream": True}, stream=True, timeout=120)
    lines = r.iter_lines()
    out.append(next(lines))  # the first event: the stream is running
    out.extend(lines)


def test_item9_served_model_name_and_chat_history_options(cli_server):
    """Issue 24 item 9, the command line: --served-model-name gpt-3.5-turbo is accepted as the
    model (answers keep the model id) and --chat-history truncate caps chatgpt-web's max_tokens."""
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hi"}],
            "max_tokens": 1000, "temperature": 0.8, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
    r = requests.post(cli_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "tiny-model", r.text
    prompt = r.json()["usage"]["prompt_tokens"]
    assert r.headers["X-Chat-History"] == f"dropped_messages=0, max_tokens={64 - prompt}"
    assert requests.post(cli_server.url + "/v1/chat/completions", json={**body, "model": "gpt-4"},
                         timeout=60).status_code == 404


def test_the_command_serves_and_sigterm_stops_it_in_order(cli_server):
    url = cli_server.url
    health = requests.get(url + "/health", timeout=30).json()
    assert health["max_batch"] == 2 and health["compiled_programs"] == 1  # compiled before it listened
    ref = GREEDY[1]
    r = requests.post(url + "/generate", json={"text": ref["prompt_text"], "length": 20, "top_k": 1}, timeout=60)
    assert r.json() == {"generated_text": ref["new_text"]}
    assert requests.get(url + "/health", timeout=30).json()["compiled_programs"] == 1

    short, long = [], []
    threads = [threading.Thread(target=stream, args=(url, 40, short)),
               threading.Thread(target=stream, args=(url, 2000, long))]
    for t in threads:
        t.start()
    while len(short) < 1 or len(long) < 1:
        threads[0].join(0.05)
    cli_server.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert cli_server.wait(60) == 0
    err = cli_server.stderr.read()
    assert "Traceback" not in err and "shutting down" in err and err.rstrip().endswith("stopped")

    def events(lines):
        return sse_events("\n\n".join(line.decode() for line in lines if line) + "\n\n")

    finished = events(short)
    assert finished[-1]["choices"][0]["finish_reason"] == "length"  # finished within the grace period
    cut = events(long)
    assert cut[-1]["error"]["code"] == "shutting_down"  # 2000 tokens take longer than 1 s: cut short
    assert sum(len(e["choices"][0]["text"]) > 0 for e in cut[:-1] if "choices" in e) > 0
    assert json.dumps(cut[-1])
