"""The persistent XLA compilation cache: on by default in a per-user folder, off on request,
never a reason to fail, safe to share between processes; and one compiled program per pool."""

import os
import subprocess
import sys

import pytest

from gpt2 import compile_cache

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, "data", "tiny-model")

SAMPLE = """
import sys, gpt2
model = gpt2.load_model(sys.argv[1])
prompts = [[1, 2, 3], [4] * 40, [5, 6], [7]]
for n, length, t, k, r in [(3, 5, 0, 0, 1.0), (4, 30, 1.0, 5, 1.2), (3, 70, 0.5, 0, 1.0)]:
    gpt2.sample_sequence(model, prompts[:n], length, temperature=t, top_k=k, repetition_penalty=r)
print(gpt2.sample_sequence(model, [[1, 2, 3]] * 3, 5, temperature=0)[0].tolist())
"""


def run_sampler(cache_dir, extra_env=None):
    env = {**os.environ, "GPT2_CACHE_DIR": str(cache_dir), "TF_CPP_MIN_LOG_LEVEL": "2", **(extra_env or {})}
    env.pop("TF_XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", SAMPLE, TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def entries(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".pb"))


@pytest.mark.slow
def test_cache_is_filled_once_reused_survives_a_cut_entry_and_one_program_serves_every_call(tmp_path):
    cache = tmp_path / "cache"
    first = run_sampler(cache)
    assert first.returncode == 0, first.stderr
    # Calls with 3-4 rows, new lengths, settings and window slides: one pool of 4 slots,
    # one XLA program (a value XLA took for a constant would have made one entry per value).
    assert len(entries(cache)) == 1
    assert not [name for name in os.listdir(cache) if name.startswith(".")]  # private folder removed
    second = run_sampler(cache, {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_executable_persistor=1"})
    assert second.returncode == 0, second.stderr
    assert "Loading cached entry" in second.stderr
    assert second.stdout == first.stdout
    (name,) = entries(cache)
    data = (cache / name).read_bytes()
    (cache / name).write_bytes(data[: len(data) // 2])  # as a process killed mid-write leaves it
    assert not compile_cache.is_complete(str(cache / name))
    third = run_sampler(cache)
    assert third.returncode == 0, third.stderr  # TensorFlow itself fails on a cut entry
    assert third.stdout == first.stdout


def test_off_and_unwritable_folders_mean_no_cache(tmp_path):
    off = run_flags({"GPT2_CACHE_DIR": "off"})
    assert "persistent_cache" not in off
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert "persistent_cache" not in run_flags({"GPT2_CACHE_DIR": str(blocked / "xla")})
    kept = run_flags({"GPT2_CACHE_DIR": str(tmp_path / "c"), "TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/x"})
    assert kept.count("persistent_cache") == 1 and "=/x" in kept
    on = run_flags({"GPT2_CACHE_DIR": str(tmp_path / "c")})
    assert f"--tf_xla_persistent_cache_directory={tmp_path / 'c'}{os.sep}.process-" in on


def run_flags(env):
    base = {k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", "GPT2_CACHE_DIR")}
    code = "import os, gpt2; print(os.environ.get('TF_XLA_FLAGS', ''))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                            text=True, timeout=60, check=True)
    assert "tensorflow" not in result.stderr.lower()
    return result.stdout


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT2_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.configured_dir() == os.path.join(str(tmp_path), "gpt2-tf2", "xla")
    monkeypatch.setenv("GPT2_CACHE_DIR", "none")
    assert compile_cache.configured_dir() is None


def test_protocol_buffer_completeness_check(tmp_path):
    whole = tmp_path / "whole.pb"
    payload = b"\x0a\x03abc\x12\x02xy\x18\x96\x01"  # two length-delimited fields and a varint
    whole.write_bytes(payload)
    assert compile_cache.is_complete(str(whole))
    for cut in (1, 4, len(payload) - 1):
        part = tmp_path / f"cut{cut}.pb"
        part.write_bytes(payload[:cut])
        assert not compile_cache.is_complete(str(part))
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    assert not compile_cache.is_complete(str(empty))
