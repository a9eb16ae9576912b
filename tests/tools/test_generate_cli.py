"""generate.py / gpt2.generate_cli end to end on the tiny model, in every prompt mode.

Most runs call main() in-process, sharing one loaded model (and so its compiled sampler) through
the `_load_model` seam; subprocesses are used where the process itself matters (stdout encoding,
what importing the CLI module pulls in).
"""

import errno
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from gpt2 import generate_cli
from gpt2.generate_cli import build_parser, main

import paths  # tests/paths.py: the folders the tests read

TESTS = paths.TESTS
ROOT = os.path.dirname(TESTS)
TINY = os.path.join(TESTS, "data", "tiny-model")
PROMPT = "Model prompt >>> "
END = "=" * 80 + "\n"


def header(n):
    return "=" * 40 + f" SAMPLE {n} " + "=" * 40 + "\n"


@pytest.fixture(scope="module")
def cases():
    with open(os.path.join(TINY, "reference.json"), encoding="utf-8") as f:
        return json.load(f)["greedy"]["cases"]


_tiny_model = []


@pytest.fixture(autouse=True)
def loads(monkeypatch):
    """Every in-process run gets one shared tiny model, so the sampler is compiled only once (all
    model folders used here hold the tiny model). Yields the list of folders runs asked for."""
    asked = []

    def load(model_dir, load_model, **options):
        asked.append(model_dir)
        if not _tiny_model:
            _tiny_model.append(load_model(TINY))
        return _tiny_model[0]

    monkeypatch.setattr(generate_cli, "_load_model", load)
    return asked


@pytest.fixture(scope="module", autouse=True)
def ascii_run(cases):
    """generate.py end to end in a subprocess whose stdout can only encode ASCII, on a prompt whose
    greedy continuation is not ASCII. Started before the first test so that it runs alongside the
    in-process ones; test_non_ascii_output_on_an_ascii_stdout_does_not_crash checks the result."""
    env = dict(os.environ, PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, "generate.py", *greedy("--prompt", cases[0]["prompt_text"])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


class Stdout(io.StringIO):
    """A stdout that records each write, to see text arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def run(capsys, monkeypatch, *args, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def greedy(*args):
    return ("--model", TINY, "--top-k", "1", "--length", "20", *args)


def assert_one_line_error(err, *fragments):
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("index", [0, 1, 2])
def test_prompt_prints_the_reference_greedy_text(capsys, monkeypatch, cases, index):
    case = cases[index]
    code, out, err = run(capsys, monkeypatch, *greedy("--prompt", case["prompt_text"]))
    assert code == 0, err
    assert out == header(1) + case["new_text"] + "\n" + END
    assert header(1) == "======================================== SAMPLE 1 ========================================\n"


def test_prompt_file_and_piped_stdin(capsys, monkeypatch, cases, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(cases[1]["prompt_text"] + "\n", encoding="utf-8")  # the final newline is dropped
    code, out, err = run(capsys, monkeypatch, *greedy("--prompt-file", str(path)))
    assert code == 0, err
    assert out == header(1) + cases[1]["new_text"] + "\n" + END
    # No prompt option and stdin not a terminal: the prompt is read from stdin.
    code, out, err = run(capsys, monkeypatch, *greedy(), stdin=cases[2]["prompt_text"] + "\n")
    assert code == 0, err
    assert out == header(1) + cases[2]["new_text"] + "\n" + END


def test_unconditional_is_reproducible_with_a_seed_and_batches(capsys, monkeypatch):
    args = ("--model", TINY, "--unconditional", "--seed", "7", "--length", "12", "--nsamples", "2")
    code, out, err = run(capsys, monkeypatch, *args, "--batch-size", "2")
    assert code == 0, err
    assert out.count(" SAMPLE ") == 2 and header(1) in out and header(2) in out and out.endswith(END)
    first = out.split(header(2))[0].removeprefix(header(1))
    assert first.strip()
    assert run(capsys, monkeypatch, *args, "--batch-size", "2")[1] == out
    # Sample N depends on the seed, not on how the samples are batched.
    assert run(capsys, monkeypatch, *args, "--batch-size", "1")[1] == out
    assert run(capsys, monkeypatch, *args[:-4], "--seed", "8", "--nsamples", "2")[1] != out


def test_interactive_streams_each_prompt(capsys, monkeypatch, cases):
    stdout = Stdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    too_long = " word" * 80
    lines = [cases[0]["prompt_text"], "", too_long, cases[1]["prompt_text"]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(list(greedy("--interactive")))
    err = capsys.readouterr().err
    assert code == 0, err
    expected = (
        PROMPT + cases[0]["prompt_text"] + "\n" + header(1) + cases[0]["new_text"] + "\n" + END
        + PROMPT + "\n"  # empty prompt: asked again
        + PROMPT + too_long + "\n"  # too long: one error line, then asked again
        + PROMPT + cases[1]["prompt_text"] + "\n" + header(1) + cases[1]["new_text"] + "\n" + END
        + PROMPT + "\n"  # end of input
    )
    assert stdout.getvalue() == expected
    assert "Traceback" not in err
    assert "empty prompt" in err
    assert err.count("error: ") == 1 and "the prompt is 80 tokens, more than the model's context of 64" in err
    # Streamed: the text of a sample arrives in many writes, not in one piece.
    start = stdout.writes.index(header(1))
    pieces = stdout.writes[start + 1: stdout.writes.index(END, start)]
    assert len(pieces) >= 10 and "".join(pieces) == cases[0]["new_text"] + "\n"


def test_streamed_and_batched_samples_agree(capsys, monkeypatch):
    args = ("--model", TINY, "--prompt", "Hello, my name is", "--seed", "3", "--length", "15")
    code, streamed, err = run(capsys, monkeypatch, *args, "--stream")
    assert code == 0, err
    assert streamed == run(capsys, monkeypatch, *args, "--no-stream")[1]


def test_interrupt_at_the_prompt_ends_interactive_mode(capsys, monkeypatch):
    class Interrupting(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupting())
    assert main(["--model", TINY, "--interactive"]) == 0
    assert capsys.readouterr().out == PROMPT + "\n"


def test_missing_model_says_how_to_download(capsys, monkeypatch, tmp_path):
    code, out, err = run(capsys, monkeypatch, "--model", "355M", "--models-dir", str(tmp_path), "--prompt", "hi")
    assert code == 1 and out == ""
    assert_one_line_error(err, "model '355M' not found", "python download_model.py 355M", "--download")
    code, _, err = run(capsys, monkeypatch, "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert code == 1
    assert_one_line_error(err, "not found", "known models")


def test_download_flag_fetches_a_missing_model(capsys, monkeypatch, cases, tmp_path, loads):
    from gpt2 import download

    calls = []

    def fake_download(name, models_dir="models", **kwargs):
        calls.append((name, models_dir))
        target = os.path.join(models_dir, name)
        os.makedirs(target)
        for file in os.listdir(TINY):
            if os.path.isfile(os.path.join(TINY, file)):
                with open(os.path.join(TINY, file), "rb") as src, open(os.path.join(target, file), "wb") as dst:
                    dst.write(src.read())
        return target

    monkeypatch.setattr(download, "download_model", fake_download)
    args = ("--model", "345M", "--models-dir", str(tmp_path), "--download", "--top-k", "1", "--length", "20")
    code, out, err = run(capsys, monkeypatch, *args, "--prompt", cases[0]["prompt_text"])
    assert code == 0, err
    assert calls == [("355M", str(tmp_path))]  # the old name maps to the current one
    assert loads == [os.path.join(str(tmp_path), "355M")]
    assert out == header(1) + cases[0]["new_text"] + "\n" + END

    def failing_download(name, models_dir="models", **kwargs):
        raise download.DownloadError("cannot download http://mirror/124M/checkpoint: cannot connect")

    monkeypatch.setattr(download, "download_model", failing_download)
    code, out, err = run(capsys, monkeypatch, "--models-dir", str(tmp_path / "x"), "--download", "--prompt", "hi")
    assert code == 1
    note, error = err.split("\n", 1)
    assert note.startswith("downloading 124M into ")
    assert_one_line_error(error, "cannot connect")


@pytest.mark.parametrize("args, fragment", [
    (["--top-p", "2"], "--top-p"),
    (["--length", "0"], "--length"),
    (["--length", "ten"], "--length"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--nsamples", "0"], "--nsamples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-3"], "seed must be an integer in [0, 2**64)"),
    (["--top-k", "2.5"], "--top-k"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
    (["--presence-penalty", "9"], "presence_penalty must be a number in [-2, 2]"),
    (["--logit-bias", "5"], "expected TOKEN=BIAS"),
    (["--logit-bias", "5=500"], "logit_bias values must be numbers in [-100, 100]"),
    (["--prompt", "x", "--interactive"], "not allowed with"),
    (["--stream", "--batch-size", "2", "--nsamples", "2"], "--stream"),
    (["--no-such-option"], "unrecognized"),
])
def test_bad_values_are_one_line_usage_errors(capsys, monkeypatch, args, fragment):
    code, out, err = run(capsys, monkeypatch, "--model", TINY, *args)
    assert code == 2 and out == ""
    assert_one_line_error(err, fragment)


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", " word" * 80], ["the prompt is 80 tokens, more than the model's context of 64", "shorten it"]),
    (["--window-keep", "64", "--prompt", "hi"], ["--window-keep must be an integer in [1, 63]"]),
    (["--logit-bias", "50257=1", "--prompt", "hi"], ["logit_bias token ids must be in [0, 50257)"]),
    (["--prompt", ""], ["--prompt is empty"]),
    (["--prompt-file", "no/such/prompt.txt"], ["no/such/prompt.txt: prompt file not found"]),
])
def test_bad_prompts_are_one_line_errors(capsys, monkeypatch, args, fragments):
    code, out, err = run(capsys, monkeypatch, "--model", TINY, *args)
    assert code == 1 and out == ""
    assert_one_line_error(err, *fragments)


def test_bad_input_files_are_one_line_errors(capsys, monkeypatch, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    code, _, err = run(capsys, monkeypatch, "--model", TINY, "--prompt-file", str(tmp_path / "latin1.txt"))
    assert code == 1
    assert_one_line_error(err, "latin1.txt: prompt file is not UTF-8")
    code, _, err = run(capsys, monkeypatch, "--model", TINY, stdin="")
    assert code == 1
    assert_one_line_error(err, "standard input was empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hparams.json").write_text('{"n_vocab": 50257}', encoding="utf-8")
    code, _, err = run(capsys, monkeypatch, "--model", str(broken), "--prompt", "hi")
    assert code == 1
    assert_one_line_error(err, "hparams.json", "missing keys")


def test_help_documents_every_option_with_its_default(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "--help")
    assert code == 0 and err == ""
    for action in build_parser()._actions:
        if "--help" in action.option_strings:
            continue
        for option in action.option_strings:
            assert option in out
        assert "(default: " in action.help, action.option_strings
    assert "SAMPLE N" in out and "stdin" in out


def test_undecodable_input_bytes_become_utf8_text():
    assert generate_cli._clean("caf\udcc3\udca9") == "café"  # UTF-8 read through an ASCII locale
    assert generate_cli._clean("bad \udcff byte") == "bad \ufffd byte"
    assert generate_cli._clean("\ud800 lone") == "? lone"


def test_non_ascii_output_on_an_ascii_stdout_does_not_crash(ascii_run, cases):
    new_text = cases[0]["new_text"]
    assert any(ord(c) > 127 for c in new_text)
    stdout, stderr = ascii_run.communicate(timeout=300)
    assert ascii_run.returncode == 0, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr
    out = stdout.decode("ascii")  # characters ASCII cannot encode are printed as '?'
    assert out == header(1) + new_text.encode("ascii", "replace").decode("ascii") + "\n" + END


def test_parsing_happens_before_tensorflow_is_imported():
    """--help and usage errors need no TensorFlow (once the gpt2 package itself imports it lazily;
    here the package's __init__ is bypassed to check this module on its own)."""
    script = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {ROOT!r})
        package = types.ModuleType("gpt2")
        package.__path__ = [{os.path.join(ROOT, "gpt2")!r}]
        sys.modules["gpt2"] = package
        from gpt2.generate_cli import main
        codes = [main(["--help"]), main(["--top-p", "2"])]
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        print(codes)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[0, 2]")


def test_length_past_the_context_and_penalties_are_the_library_sampler(capsys, monkeypatch, cases):
    import gpt2
    from encoder import get_encoder

    enc = get_encoder()
    prompt = cases[0]["prompt_text"]
    options = ("--temperature", "0", "--length", "100", "--window-keep", "20", "--repetition-penalty", "1.3",
               "--presence-penalty", "0.5", "--logit-bias", "13=1.5", "--no-stop-at-eot")
    code, out, err = run(capsys, monkeypatch, "--model", TINY, "--prompt", prompt, *options)
    assert code == 0, err
    expected = gpt2.sample_sequence(_tiny_model[0], [enc.encode(prompt)], 100, temperature=0, window_keep=20,
                                    repetition_penalty=1.3, presence_penalty=0.5, logit_bias={13: 1.5})
    assert out == header(1) + enc.decode(expected[0, len(enc.encode(prompt)):]) + "\n" + END


def test_ctrl_c_stops_a_long_generation_promptly(tmp_path):
    """SIGINT while a long non-streamed generation runs: exit 130 with one line, not at the end."""
    import time

    def well_into_the_decode(process):
        deadline = time.monotonic() + 120
        line = ""
        while "compiling" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
        time.sleep(3)
        assert process.poll() is None

    code, _, err = _interrupted(
        [sys.executable, "generate.py", "--model", TINY, "--prompt", "Hello", "--length", "1000000", "--no-xla"],
        dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), well_into_the_decode, timeout=30)
    assert code == 130
    assert err.strip().splitlines()[-1] == "error: interrupted"


def test_interrupted_download_is_named_and_resumed_with_download(capsys, monkeypatch, cases, tmp_path, loads):
    from gpt2 import download

    model_dir = tmp_path / "124M"
    model_dir.mkdir()
    (model_dir / "checkpoint").write_bytes(open(os.path.join(TINY, "checkpoint"), "rb").read())
    (model_dir / "encoder.json.part").write_bytes(b"{")
    code, out, err = run(capsys, monkeypatch, "--models-dir", str(tmp_path), "--prompt", "hi")
    assert code == 1 and out == ""
    assert_one_line_error(err, f"{model_dir} is an unfinished download (missing hparams.json, "
                               "model.ckpt.data-00000-of-00001, model.ckpt.index; encoder.json partly downloaded)",
                          "--download", "python download_model.py 124M")

    calls = []

    def fake_download(name, models_dir="models", **kwargs):
        calls.append(name)
        (model_dir / "encoder.json.part").unlink()
        for file in os.listdir(TINY):
            if os.path.isfile(os.path.join(TINY, file)):
                with open(os.path.join(TINY, file), "rb") as src, open(model_dir / file, "wb") as dst:
                    dst.write(src.read())
        return str(model_dir)

    monkeypatch.setattr(download, "download_model", fake_download)
    args = ("--models-dir", str(tmp_path), "--download", "--top-k", "1", "--length", "20")
    code, out, err = run(capsys, monkeypatch, *args, "--prompt", cases[0]["prompt_text"])
    assert code == 0, err
    assert calls == ["124M"] and out == header(1) + cases[0]["new_text"] + "\n" + END
    code, out, err = run(capsys, monkeypatch, *args, "--prompt", cases[0]["prompt_text"])
    assert code == 0 and calls == ["124M"]  # complete now: not downloaded again


class FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_closed_stdout_and_full_disk_are_one_line_errors(capsys, monkeypatch, loads):
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["--model", TINY, "--prompt", "hi", "--length", "3"]) == 1
    assert loads == []  # refused before loading the model
    assert_one_line_error(capsys.readouterr().err, "standard output is closed")

    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert main(["--model", TINY, "--prompt", "hi", "--length", "3"]) == 1
    assert_one_line_error(capsys.readouterr().err, "error: cannot write the output: No space left on device")


@pytest.fixture(scope="module", autouse=True)
def full_disk_run():
    """generate.py end to end in a subprocess whose stdout is /dev/full (every write fails with
    ENOSPC), started before the first test to run alongside the in-process ones."""
    if not os.path.exists("/dev/full"):
        yield None
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with open("/dev/full", "w") as full:
        process = subprocess.Popen([sys.executable, "generate.py", *greedy("--prompt", "hi")], cwd=ROOT, env=env,
                                   stdout=full, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_full_disk_in_a_real_process_prints_one_line(full_disk_run):
    if full_disk_run is None:
        pytest.skip("needs /dev/full")
    _, stderr = full_disk_run.communicate(timeout=300)
    errors = [line for line in stderr.splitlines()
              if not re.match(r"^[IWE]\d{4} |WARNING: All log|compiling the sampler", line)]
    assert full_disk_run.returncode == 1 and errors == ["error: cannot write the output: No space left on device"]


def test_missing_tensorflow_is_one_line(capsys, monkeypatch):
    for name in ("tensorflow", "keras"):
        monkeypatch.setitem(sys.modules, name, None)
    import gpt2.sampling

    stale = [name for name in sys.modules if name.startswith("gpt2.sampling.") and name != "gpt2.sampling.settings"]
    for name in stale:
        monkeypatch.delitem(sys.modules, name)  # imported again, they need TensorFlow
        monkeypatch.delattr(gpt2.sampling, name.rsplit(".", 1)[1], raising=False)
    code, out, err = run(capsys, monkeypatch, "--model", TINY, "--prompt", "hi")
    assert code == 1
    assert_one_line_error(err, "TensorFlow is not installed", "pip install '.[cpu]'")


def test_importing_tensorflow_prints_no_cuda_or_onednn_lines():
    """TensorFlow 2.21 prints oneDNN and CUDA-driver lines on import whatever TF_CPP_MIN_LOG_LEVEL
    says; the tools import it through gpt2.runtime.import_tensorflow, which keeps them off the screen."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("from gpt2.runtime import import_tensorflow; import_tensorflow(); "
            "import tensorflow as tf; print(tf.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip()
    assert done.stderr == ""


@pytest.mark.parametrize("stdin", ["none", "closed"])
def test_item14_interactive_with_stdin_closed_is_a_one_line_error(capsys, monkeypatch, stdin):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", None if stdin == "none" else closed)  # `generate.py --interactive <&-`
    code, out, err = run(capsys, monkeypatch, "--model", TINY, "--interactive")
    assert code == 1 and out == ""
    assert_one_line_error(err, "--interactive reads prompts from standard input, which is closed", "--prompt")


def _interrupted(args, env, ready, timeout=60):
    """Runs `args` from the repository root with SIGINT at its default, as from a terminal (a suite
    started in the background inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored),
    sends SIGINT once ready(process) returns, and returns (exit code, stdout, stderr)."""
    import signal

    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None,
    )
    try:
        ready(process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_item17_ctrl_c_while_loading_exits_at_once():
    """SIGINT while the model loads: a compile or a weight read is one long call into TensorFlow's
    C++ that Ctrl-C cannot stop, so it runs in a worker thread that the main thread abandons: exit
    130 with one line, without waiting for the call. Here the load is a TensorFlow loop that never
    ends (standing for a long compile): the run must end anyway, with no traceback or abort."""

    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from gpt2 import generate_cli

        def endless_load(model_dir, load_model, **options):
            import tensorflow as tf

            loop = tf.function(lambda: tf.while_loop(lambda i: tf.constant(True), lambda i: i + 1, [0]))
            print("loading", file=sys.stderr, flush=True)
            loop()  # never returns

        generate_cli._load_model = endless_load
        sys.exit(generate_cli.main({["--model", TINY, "--prompt", "hi"]!r}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def inside_the_loop(process):
        import time

        assert process.stderr.readline() == "loading\n"
        time.sleep(0.5)  # inside the loop's C++ call

    assert _interrupted([sys.executable, "-c", script], env, inside_the_loop) == (130, "", "error: interrupted\n")


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_item17_ctrl_c_while_compiling_the_sampler_exits_with_one_line(tmp_path):
    """The same with the real compile, from an empty compilation cache: SIGINT once generate.py
    says it is compiling; nothing is printed on stdout (no sample: the run stopped in the load)."""

    # No TF_XLA_FLAGS: this process's compilation cache names its own folder there.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_XLA_FLAGS")}
    env.update(GPT2_CACHE_DIR=str(tmp_path / "cache"), GPT2_DIRECT_TOKENS="0")

    def compiling(process):
        assert process.stderr.readline().startswith("compiling the sampler")

    result = _interrupted([sys.executable, "generate.py", *greedy("--prompt", "hi")], env, compiling)
    assert result == (130, "", "error: interrupted\n")


def test_a_timeout_the_worker_raises_is_its_error_not_a_wait():
    # A TimeoutError from the worker (a socket's, say) once read as "not done yet": the wait looped forever.
    def times_out():
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError, match="read timed out"):
        generate_cli._wait_for(generate_cli._in_thread(times_out))
    assert generate_cli._wait_for(generate_cli._in_thread(lambda: 7)) == 7
