"""The persistent XLA compilation cache: on by default in a per-user folder, off on request,
never a reason to fail, safe to share between processes; and one compiled program per pool."""

import io
import os
import subprocess
import sys

import pytest

from gpt2 import compile_cache

import paths  # tests/paths.py: the folders the tests read

HERE = paths.TESTS
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
    """The shared folder's entries, by TensorFlow's name (their files carry a checksum)."""
    return sorted(match["name"] for match in map(compile_cache.ENTRY.fullmatch, os.listdir(folder)) if match)


def entry_path(folder):
    (file_name,) = [name for name in os.listdir(folder) if compile_cache.ENTRY.fullmatch(name)]
    return folder / file_name


def fields(data):
    """[(start, size)] of the top-level length-delimited fields of a protocol buffer."""
    found, position = [], 0
    while position < len(data):
        key, position = varint(data, position)
        if key & 7 == 2:
            size, position = varint(data, position)
            found.append((position, size))
            position += size
        else:
            assert key & 7 == 0
            _, position = varint(data, position)
    return found


def largest_field(data):
    """(start, size) of the largest top-level length-delimited field: the compiled code lives in there."""
    return max(fields(data), key=lambda field: field[1])


def varint(data, position):
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


@pytest.mark.slow
def test_item1_item2_cache_is_filled_once_reused_and_survives_tampered_and_unreadable_entries(tmp_path):
    root = tmp_path / "cache"
    cache = root / compile_cache.machine_key()  # entries of this kind of machine
    first = run_sampler(root)
    assert first.returncode == 0, first.stderr
    # Calls with 3-4 rows, new lengths, settings and window slides: one pool of 4 slots,
    # one XLA program (a value XLA took for a constant would have made one entry per value).
    assert len(entries(cache)) == 1
    assert not [name for name in os.listdir(cache) if name.startswith(".")]  # private folder removed
    assert os.stat(cache).st_mode & 0o777 == 0o700 and os.stat(root).st_mode & 0o777 == 0o700
    second = run_sampler(root, {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_executable_persistor=1"})
    assert second.returncode == 0, second.stderr
    assert "Loading cached entry" in second.stderr
    assert second.stdout == first.stdout

    # Item 1: the machine code replaced by ud2 (0f 0b), as an attacker would: the checksum no
    # longer matches, so the entry is deleted before TensorFlow can run it, and compiled again.
    path = entry_path(cache)
    data = bytearray(path.read_bytes())
    start, size = largest_field(data)
    quarter = size // 4
    data[start + quarter : start + 3 * quarter] = b"\x0f\x0b" * quarter  # 2 * quarter bytes: the size stays
    path.write_bytes(bytes(data))
    assert compile_cache.is_complete(str(path))  # framing intact: only the checksum catches it
    third = run_sampler(root)
    assert third.returncode == 0, third.stderr
    assert third.stdout == first.stdout
    assert not path.exists() and len(entries(cache)) == 1  # a new, verified entry

    # Item 2: an entry that is bad yet carries a valid checksum (written bad): TensorFlow fails to
    # parse it; the call is retried without the cache, with one line naming the folder.
    path = entry_path(cache)
    name = entries(cache)[0]
    data = bytearray(path.read_bytes())
    # Every field's contents 0xff (an unending varint opens each nested message), the framing intact:
    # a few bytes in one field was not enough where the largest field is plain machine code.
    for start, size in fields(data):
        data[start : start + size] = b"\xff" * size
    path.unlink()
    forged = cache / f"{name}.tmp"
    forged.write_bytes(bytes(data))
    forged.rename(cache / f"{name}.sha256-{compile_cache.checksum(name, str(forged))}")
    fourth = run_sampler(root)
    assert fourth.returncode == 0, fourth.stderr
    assert fourth.stdout == first.stdout
    warnings = [line for line in fourth.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "could not read an entry" in warnings[0] and str(cache) in warnings[0]
    assert "Traceback" not in fourth.stderr
    assert entries(cache) == []  # the entries it read are gone; nothing published while off


def test_item1_entries_are_verified_and_bad_ones_deleted(tmp_path):
    good = tmp_path / "a.pb.tmp"
    good.write_bytes(b"\x0a\x03abc")
    good_name = tmp_path / f"a.pb.sha256-{compile_cache.checksum('a.pb', str(good))}"
    good.rename(good_name)
    # The same bytes and sum under another entry's name: the sum is keyed by the name.
    moved = tmp_path / f"b.pb.sha256-{compile_cache.checksum('a.pb', str(good_name))}"
    moved.write_bytes(b"\x0a\x03abc")
    flipped = tmp_path / f"c.pb.sha256-{compile_cache.checksum('c.pb', str(good_name))}"
    flipped.write_bytes(b"\x0a\x03abd")
    legacy = tmp_path / "d.pb"  # no checksum: not written by this code
    legacy.write_bytes(b"\x0a\x03abc")
    link = tmp_path / f"e.pb.sha256-{compile_cache.checksum('e.pb', str(good_name))}"
    (tmp_path / "elsewhere").write_bytes(b"\x0a\x03abc")
    link.symlink_to(tmp_path / "elsewhere")
    found = compile_cache.verified_entries(str(tmp_path))
    assert found == {"a.pb": str(good_name)}
    assert sorted(os.listdir(tmp_path)) == sorted([good_name.name, "elsewhere"])


ENABLE = "from gpt2 import compile_cache; print(compile_cache.enable())"


def run_enable(folder):
    env = {**{k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}, "GPT2_CACHE_DIR": str(folder)}
    return subprocess.run([sys.executable, "-c", ENABLE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)


def test_item1_folder_is_created_private_and_shared_modes_are_refused(tmp_path):
    root = tmp_path / "made" / "xla"
    folder = root / compile_cache.machine_key()
    result = run_enable(root)
    assert result.stdout.strip() == str(folder) and not result.stderr
    assert os.stat(root).st_mode & 0o777 == 0o700 and os.stat(folder).st_mode & 0o777 == 0o700
    for path in (root, folder):
        for mode in (0o777, 0o770, 0o702):
            os.chmod(path, mode)
            result = run_enable(root)
            assert result.stdout.strip() == "None"
            (line,) = result.stderr.splitlines()  # one line: what is wrong and what to do
            assert line.startswith(f"warning: not using the compilation cache {path}: it is writable by")
            assert f"chmod 700 {path}" in line
        os.chmod(path, 0o700)
    assert run_enable(root).stdout.strip() == str(folder)


def test_item1_entries_of_another_kind_of_machine_are_never_offered(tmp_path, monkeypatch):
    key = compile_cache.machine_key()
    assert key == compile_cache.machine_key() and key.count("-") == 1
    real_open = open

    def other_cpu(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO("vendor_id : GenuineIntel\nmodel name : another\nflags : sse2\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", other_cpu)
    assert compile_cache.machine_key() != key


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a folder away")
def test_item1_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "theirs"
    (folder / compile_cache.machine_key()).mkdir(mode=0o700, parents=True)
    folder.chmod(0o700)
    for path in (folder, folder / compile_cache.machine_key()):
        os.chown(path, 65534, 65534)
        result = run_enable(folder)
        assert result.stdout.strip() == "None"
        assert f"compilation cache {path}: it is owned by uid 65534, not you (uid 0)" in result.stderr
        assert os.listdir(folder / compile_cache.machine_key()) == []  # nothing read, nothing written
        os.chown(path, 0, 0)


def test_item2_recover_turns_the_cache_off_and_deletes_what_was_read(tmp_path, monkeypatch, capsys):
    shared, private = tmp_path / "shared", tmp_path / "shared" / ".process-1-x"
    private.mkdir(parents=True)
    taken = shared / "a.pb.sha256-0"
    taken.write_bytes(b"x")
    (private / "a.pb").write_bytes(b"x")
    monkeypatch.setattr(compile_cache, "_state", {"shared": str(shared), "private": str(private),
                                                  "taken": {"a.pb": str(taken)}, "off": False})
    assert not compile_cache.recover(RuntimeError("out of memory"))
    assert compile_cache.recover(RuntimeError("Failed to parse serialized CpuAotCompilationResult. [Op:x]"))
    assert not taken.exists() and os.listdir(private) == []
    assert compile_cache.publish() == 0  # off for the rest of the process
    assert not compile_cache.recover(RuntimeError("Failed to parse serialized CpuAotCompilationResult."))
    assert f"compilation cache {shared}" in capsys.readouterr().err


def test_importing_gpt2_leaves_the_cache_off_until_a_tool_or_sampler_turns_it_on(tmp_path):
    assert "persistent_cache" not in run_flags({"GPT2_CACHE_DIR": str(tmp_path / "c")}, enable=False)
    assert not (tmp_path / "c").exists()


def test_off_and_unwritable_folders_mean_no_cache(tmp_path):
    off = run_flags({"GPT2_CACHE_DIR": "off"})
    assert "persistent_cache" not in off
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert "persistent_cache" not in run_flags({"GPT2_CACHE_DIR": str(blocked / "xla")})
    kept = run_flags({"GPT2_CACHE_DIR": str(tmp_path / "c"), "TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/x"})
    assert kept.count("persistent_cache") == 1 and "=/x" in kept
    on = run_flags({"GPT2_CACHE_DIR": str(tmp_path / "c")})
    shared = tmp_path / "c" / compile_cache.machine_key()
    assert f"--tf_xla_persistent_cache_directory={shared}{os.sep}.process-" in on


def run_flags(env, enable=True):
    base = {k: v for k, v in os.environ.items() if k not in ("TF_XLA_FLAGS", "GPT2_CACHE_DIR")}
    code = "import os, gpt2; from gpt2 import compile_cache; "
    code += "compile_cache.enable(); " if enable else ""
    code += "print(os.environ.get('TF_XLA_FLAGS', ''))"
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
