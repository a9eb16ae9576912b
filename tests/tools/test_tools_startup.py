"""What the command-line tools print while they start (issue 24, item 18), run as subprocesses on
the tiny model the way a user runs them: without TF_CPP_MIN_LOG_LEVEL (the tools set their own).

TensorFlow prints oneDNN/CUDA lines on import whatever its log level; the tools keep them off the
screen (gpt2.runtime.quiet_tensorflow), check their paths before importing it, and say what takes
long (compiling, loading from the compilation cache, resuming).
"""

import os
import stat
import subprocess
import sys

import pytest

from gpt2 import compile_cache

import paths  # tests/paths.py: the folders the tests read

TESTS = paths.TESTS
ROOT = os.path.dirname(TESTS)
TINY = os.path.join(TESTS, "data", "tiny-model")


def tool(*args, env=None, timeout=300):
    """Runs `python ARGS` in the project folder as a user would: no TF_CPP_MIN_LOG_LEVEL, and no
    TF_XLA_FLAGS (this process's compilation cache sets it to its own private folder)."""
    env = {k: v for k, v in (env or os.environ).items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def no_tensorflow(tmp_path):
    """An environment where importing tensorflow (or keras) ends the process with a message:
    a tool that imports it before checking its paths says so instead of 'not found'."""
    for name in ("tensorflow", "keras"):
        package = tmp_path / "fake" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"raise SystemExit('{name} was imported')\n", encoding="utf-8")
    return dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))


@pytest.mark.parametrize("args", [
    ["generate.py", "--model", "nosuch", "--prompt", "hi"],
    ["train.py", "--model", "nosuch", "--dataset", "README.md", "--output", "{tmp}/run"],
    ["-m", "gpt2.evaluate", "--model", "nosuch", "README.md"],
    ["-m", "gpt2.export", "--model", "nosuch", "--output", "{tmp}/export"],
    ["-m", "gpt2.convert", "--to", "hf", "nosuch", "{tmp}/hf"],
], ids=lambda args: args[0] if args[0] != "-m" else args[1])
def test_item18_a_missing_model_is_reported_before_tensorflow_is_imported(args, tmp_path, no_tensorflow):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args] + ["--models-dir", str(tmp_path)]
    done = tool(*args, env=no_tensorflow)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"error: model 'nosuch' not found (looked in {tmp_path / 'nosuch'})"), done.stderr
    assert done.stderr.count("\n") == 1


def test_item18_train_checks_its_dataset_before_tensorflow_is_imported(tmp_path, no_tensorflow):
    done = tool("train.py", "--model", TINY, "--dataset", str(tmp_path / "missing.txt"), "--output",
                str(tmp_path / "run"), env=no_tensorflow)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"error: {tmp_path / 'missing.txt'}: no such file or folder\n"


def test_item18_convert_prints_no_tensorflow_lines(tmp_path):
    done = tool("-m", "gpt2.convert", "--to", "hf", TINY, str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == f"wrote {tmp_path / 'hf'} (Hugging Face layout, n_layer 2, n_embd 32)\n"


@pytest.mark.slow  # two training runs: ~20-30 s on 2 busy cores
def test_item18_train_says_resuming_prints_no_tensorflow_lines_and_writes_0644(tmp_path):
    """Two steps, then a third with --resume: no TensorFlow lines on stderr, "resuming from step
    2", and every file of the model folder (the `checkpoint` state file too) has the mode a plain
    open() gives under the umask (0644 under the usual 022)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    output = tmp_path / "run"
    common = ["train.py", "--model", TINY, "--dataset", str(corpus), "--output", str(output), "--seq-len", "16",
              "--no-progress", "--val-every", "0"]
    first = tool(*common, "--steps", "2")
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == f"step 2: saved to {output}", first.stderr
    assert lines[1].startswith("step 2, loss ") and lines[1].endswith(f"python generate.py --model {output}")
    second = tool(*common, "--steps", "3", "--resume")
    assert second.returncode == 0, second.stderr
    lines = second.stderr.splitlines()
    assert len(lines) == 3 and lines[0] == f"resuming from step 2 (the last save in {output})", second.stderr
    assert lines[1] == f"step 3: saved to {output}" and lines[2].startswith("step 3, loss ")
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("checkpoint", "hparams.json", "model.ckpt.index", "encoder.json"):
        assert stat.S_IMODE(os.stat(output / name).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("cache, message", [
    ("off", "compiling the sampler...\n"),
    ("empty", "compiling the sampler (saved in the compilation cache for the next run)...\n"),
    ("truncated entry", "compiling the sampler (saved in the compilation cache for the next run)...\n"),
    ("entry", "loading the compiled sampler from the compilation cache (compiling it if it is not there)...\n"),
])
def test_item18_says_loading_the_compiled_sampler_when_the_cache_holds_entries(tmp_path, cache, message):
    """gpt2.cli.say_compiling, which generate.py (and evaluate) print before a compile: a cache
    folder holding a complete entry (any: a heuristic, entries are named by hashes) means the
    program is probably loaded, not compiled. (The compile itself: see test_generate_cli's item 17.)"""
    folder = tmp_path / "cache"
    shared = folder / compile_cache.machine_key()
    shared.mkdir(parents=True, mode=0o700)
    folder.chmod(0o700)
    name = "xla_compile_cache__1__2__XLA_CPU_JIT.pb"
    entry = shared / name
    entry.write_bytes(b"\x0a\x03abc")  # field 1: 3 bytes
    digest = compile_cache.checksum(name, str(entry))
    if cache == "truncated entry":
        entry.write_bytes(b"\x0a\x09abc")  # cut short: its checksum no longer matches
    if cache in ("entry", "truncated entry"):
        entry.rename(shared / f"{name}.sha256-{digest}")
    else:
        entry.unlink()
    env = dict(os.environ, GPT2_CACHE_DIR="off" if cache == "off" else str(folder))
    done = tool("-c", "from gpt2.cli import say_compiling; say_compiling('sampler')", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", message)


def test_item18_evaluate_says_it_is_compiling_the_scorer(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Hello, my name is GPT-2. " * 10, encoding="utf-8")
    env = dict(os.environ, GPT2_CACHE_DIR="off")
    done = tool("-m", "gpt2.evaluate", "--model", TINY, "--json", str(text), env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert lines[0] == "compiling the scorer..."
    bars = [line for line in lines[1:] if line.strip()]
    assert bars[0].startswith("compiling:") and bars[-1].startswith("scoring: 100%"), bars
    assert '"perplexity"' in done.stdout


def test_item20_readme_says_what_to_do_offline_without_random_weights_under_a_released_name():
    """The README's first commands need the network; the section gives the ways on without it,
    and every random checkpoint it suggests goes to a folder of its own name."""
    import re

    from gpt2.hparams import OLD_NAMES, PRESETS

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Install and two commands", 1)[1].split("\n## ", 1)[0]
    for step in ("does not resolve", "--base-url", "$GPT2_BASE_URL", "--model path/to/124M",
                 "python -m gpt2.checkpoint --random 124M models/random-124M", "gibberish"):
        assert step in section, step
    released = set(PRESETS) | set(OLD_NAMES)
    targets = re.findall(r"gpt2\.checkpoint --random \S+ (\S+)", readme)
    assert targets and all(os.path.basename(target.rstrip("/")) not in released for target in targets), targets
