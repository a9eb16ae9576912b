"""Command-line text generation: `python generate.py` (or the `gpt2-generate` console script).

    python generate.py --model 355M --prompt "Hello, my name is" --nsamples 3
    python generate.py --interactive                 # type prompts, watch the text appear
    python generate.py --unconditional --seed 1 --length 200

Every sample is printed under a `==== SAMPLE N ====` header, and a line of 80 `=` follows the
samples of each prompt (the layout of OpenAI's sampling scripts). See `--help` for every option.

Arguments are parsed (and `--help` answered) before TensorFlow is imported, since importing it
takes seconds; see `main`. Bad input ends in a one-line `error: ...` on stderr, never a traceback.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import textwrap
import threading

from gpt2 import cli
from gpt2.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, add_model_arguments, say_compiling
from gpt2.runtime import import_tensorflow, quiet_tensorflow

DEFAULT_LENGTH = 128
DEFAULT_TOP_K = 40
INTERACTIVE_PROMPT = "Model prompt >>> "


def _setting(name, kind):
    """An argparse type for a sampling setting: converted with `kind`, then validated by
    gpt2.sampling.settings (the rules and messages the library and the server use)."""

    def convert(text):
        from gpt2.sampling.settings import SamplingSettings, SettingsError, check_seed, check_window_keep

        try:
            value = kind(text)
            if name == "seed":
                return check_seed(value)
            if name == "window_keep":
                return check_window_keep(value, 2**31)  # the model's own bound is checked once loaded
            SamplingSettings(**{name: value})
        except ValueError as error:
            message = str(error) if isinstance(error, SettingsError) else f"must be a number, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        return value

    convert.__name__ = kind.__name__
    return convert


def _logit_bias(text):
    """TOKEN=BIAS (e.g. 50256=-100) -> (token id, bias), checked by gpt2.sampling.settings."""
    from gpt2.sampling.settings import SamplingSettings, SettingsError

    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        pair = (int(token), float(bias))
        SamplingSettings(logit_bias=[pair])
    except SettingsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS such as 50256=-100, got {text!r}") from None
    return pair


def add_speculative_arguments(group):
    """--draft-model, --prompt-lookup (one or the other) and --draft-tokens, on an argparse group;
    shared with `python -m gpt2.serve`. See `draft_folder` for their check against the model."""
    drafts = group.add_mutually_exclusive_group()
    drafts.add_argument("--draft-model", metavar="NAME_OR_FOLDER",
                        help="a smaller model with the same vocabulary (e.g. 124M for 355M) proposes tokens that "
                             "the model checks several at a time (default: none)")
    drafts.add_argument("--prompt-lookup", action="store_true",
                        help="propose the tokens that followed the last few tokens' earlier occurrence in the text "
                             "(default: off)")
    group.add_argument("--draft-tokens", type=cli.positive_int, default=8, metavar="N",
                       help="most tokens proposed per step; the number adapts to how many are accepted (default: 8)")


def draft_folder(args, hparams):
    """The folder of --draft-model (None without it), checked against the model's hparams before
    anything is loaded: it must exist and share the model's vocabulary."""
    from gpt2.checkpoint import read_hparams, resolve_model_dir

    if not args.draft_model:
        return None
    try:
        folder = resolve_model_dir(args.draft_model, args.models_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--draft-model: {error}") from None
    if read_hparams(folder).n_vocab != hparams.n_vocab:
        raise ValueError(f"--draft-model {args.draft_model} has another vocabulary than the model; use one of "
                         "the same family (e.g. 124M for 355M)")
    return folder


# The sampling settings checked by gpt2.sampling.settings: (name, type, metavar, help); defaults (in the
# help as %(default)) are SamplingSettings' own, except top_k (OpenAI's generate scripts sample with top_k 40).
_SETTINGS = (
    ("temperature", float, "T", "divides the logits before sampling: lower is more predictable, 0 = greedy "
                                "(always the most likely token) (default: %(default)s)"),
    ("top_k", int, "K", "sample only among the K most likely tokens, 0 = no limit (default: %(default)s)"),
    ("top_p", float, "P", "nucleus sampling: sample only among the most likely tokens whose probabilities add up "
                          "to P, 1.0 = off, 0 = only the most likely (default: %(default)s)"),
    ("presence_penalty", float, "X", "OpenAI's presence penalty in [-2, 2]: subtracted once from the logit of "
                                     "every token already generated (default: %(default)g = off)"),
    ("frequency_penalty", float, "X", "OpenAI's frequency penalty in [-2, 2]: subtracted from a token's logit "
                                      "once per time it was generated (default: %(default)g = off)"),
    ("repetition_penalty", float, "X", "CTRL / Hugging Face repetition penalty > 0 over the prompt and the "
                                       "generated tokens: their positive logits are divided by it, negative ones "
                                       "multiplied (default: %(default)g = off; 1.2 is a common choice)"),
)


def build_parser(prog=None):
    """The argument parser; every option's help states its default."""
    parser = cli.Parser(
        prog=prog,
        description=textwrap.fill(
            "Generate text with OpenAI's GPT-2. Each sample is printed under a "
            "'===== SAMPLE N =====' header, and a line of '=' follows the samples of each prompt. "
            "Pick one prompt source: --prompt, --prompt-file, --interactive or --unconditional. "
            "With none of them, an interactive session starts when standard input is a terminal; "
            "otherwise the prompt is read from standard input (e.g. echo 'Hello' | generate.py).",
            width=78,
        ),
        epilog=(
            "examples:\n"
            "  generate.py --prompt 'Hello, my name is' --nsamples 3\n"
            "  generate.py --model 355M --download --interactive\n"
            "  generate.py --model path/to/model_folder --unconditional --seed 1 --length 200\n"
            "Errors print one line 'error: ...' on stderr; exit codes: 0 ok, 1 error, 2 bad usage, 130 interrupted."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--download", action="store_true",
                       help="download the model into --models-dir first if it is not there (default: off: a "
                            "missing model is an error that says how to download it)")
    model.add_argument("--dtype", choices=("float32", "bfloat16", "int8", "float16"), default="float32",
                       help="float32 (OpenAI's numbers); bfloat16: weights in half the memory and faster matmuls on "
                            "CPUs with bfloat16 support, logits within about 1%%; int8: weights in a quarter of the "
                            "memory (per-channel scales, float32 arithmetic); float16: weights in half (float32 "
                            "arithmetic; the fast 16-bit mode on CPUs without bfloat16) (default: %(default)s)")
    model.add_argument("--no-xla", action="store_true",
                       help="run the sampler without XLA: compiles faster (a few seconds), generates slower in "
                            "float32; mostly for debugging (default: XLA in float32, none in bfloat16, where "
                            "oneDNN is faster; see BENCHMARKS.md)")

    source = parser.add_argument_group("prompt source (pick one; default: see above)").add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="the prompt text (default: none)")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 text file, '-' for stdin; "
                                                              "one trailing newline is dropped (default: none)")
    source.add_argument("--interactive", action="store_true",
                        help=f"ask for prompts ('{INTERACTIVE_PROMPT.strip()}') until end of input (Ctrl-D, or "
                             "Ctrl-Z Enter on Windows) or Ctrl-C; Ctrl-C while generating stops that prompt's "
                             "samples (default: off)")
    source.add_argument("--unconditional", action="store_true",
                        help="no prompt: samples start from <|endoftext|> (default: off)")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--length", type=cli.positive_int, default=DEFAULT_LENGTH, metavar="N",
                          help="new tokens per sample, any number: past the model's context (1024 tokens for the "
                               "released models) the window slides, see --window-keep (default: %(default)s)")
    sampling.add_argument("--nsamples", type=cli.positive_int, default=1, metavar="N",
                          help="samples per prompt (default: 1)")
    sampling.add_argument("--batch-size", type=cli.positive_int, default=1, metavar="N",
                          help="samples computed together in one batch; nsamples need not be a multiple of it (the "
                               "last batch is smaller). With a fixed --seed, sample N is the same for every batch "
                               "size (default: 1)")
    from gpt2.sampling.settings import SamplingSettings  # TensorFlow-free

    defaults = {**dataclasses.asdict(SamplingSettings()), "top_k": DEFAULT_TOP_K}
    for name, kind, metavar, help_ in _SETTINGS:
        sampling.add_argument("--" + name.replace("_", "-"), type=_setting(name, kind), default=defaults[name],
                              metavar=metavar, help=help_)
    sampling.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="TOKEN=BIAS",
                          help="add BIAS (in [-100, 100]) to a token id's logit; -100 bans it, 100 forces it; "
                               "repeatable (default: none)")
    sampling.add_argument("--window-keep", type=_setting("window_keep", int), metavar="N",
                          help="past the context, the window the model sees keeps its last N tokens and goes on "
                               "(default: half the context, 512 for the released models)")
    sampling.add_argument("--seed", type=_setting("seed", int), metavar="N",
                          help="random seed (an integer >= 0) for reproducible samples (default: none: different "
                               "samples on every run)")
    sampling.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=None,
                          help="end a sample early when the model writes <|endoftext|> (not printed); with "
                               "--no-stop-at-eot it is printed as text and sampling goes on to --length (default: "
                               "on, except with --unconditional, where documents run on as in OpenAI's samples)")

    add_speculative_arguments(parser.add_argument_group(
        "speculative decoding (one sample per batch, prompt + --length within the context; greedy text "
        "as without it, sampled text from the same distribution)"))

    parser.add_argument_group("output").add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=None,
        help="print each sample token by token as it is generated; needs one sample per batch (--batch-size 1 or "
             "--nsamples 1) (default: on with --interactive when the batch holds one sample, else off: each sample "
             "is printed once its batch is done)")
    return parser


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit code. Parsing imports
    nothing heavy, so `--help` and usage errors do not wait for TensorFlow."""
    return cli.main_of(build_parser(prog=None if argv is None else "generate.py"), argv, _checked_run)


def _checked_run(args):
    if args.stream and min(args.batch_size, args.nsamples) > 1:
        raise cli.UsageError("--stream prints one sample at a time: use it with --batch-size 1")
    if (args.draft_model or args.prompt_lookup) and min(args.batch_size, args.nsamples) > 1:
        raise cli.UsageError("speculative decoding makes one sample at a time: use it with --batch-size 1")
    if sys.stdout is None:  # e.g. started with `>&-`: fail before loading anything
        return cli.fail("standard output is closed; redirect it to a file (or /dev/null)", EXIT_ERROR)
    _tolerate_unencodable_text()
    stdout = sys.stdout
    sys.stdout = _CheckedOutput(stdout)
    try:
        return _run(args)
    except _Abandoned:
        _exit_now(cli.fail("interrupted", EXIT_INTERRUPTED))
    except BrokenPipeError:  # e.g. `generate.py ... | head`: stop quietly
        _silence_stdout()
        return EXIT_ERROR
    except _OutputError as error:  # e.g. the disk holding a redirected stdout is full
        _silence_stdout()
        return cli.fail(error, EXIT_ERROR)
    finally:
        sys.stdout = stdout


def _run(args):
    mode, prompt_text = _prompt_source(args)
    quiet_tensorflow()  # before anything imports it
    from encoder import encoder_for_model_dir
    from gpt2.checkpoint import load_model, read_hparams, resolve_model_dir
    from gpt2.hparams import OLD_NAMES, PRESETS
    from gpt2.sampling import settings as settings_lib

    # The model folder, its settings and the prompt are checked before TensorFlow is imported
    # (seconds), so a mistyped name is answered at once.
    model_dir = _find_model(args, resolve_model_dir, OLD_NAMES, PRESETS)
    hparams = read_hparams(model_dir)
    draft_dir = draft_folder(args, hparams)
    enc = encoder_for_model_dir(model_dir)
    stop_at_eot = args.stop_at_eot if args.stop_at_eot is not None else mode != "unconditional"
    stream = mode == "interactive" and min(args.batch_size, args.nsamples) == 1 if args.stream is None else args.stream
    sampler = _Sampler(args, enc, hparams, settings_lib, enc.eot_token if stop_at_eot else None, stream)
    if mode == "interactive":
        sampler.load(model_dir, load_model, draft_dir)
        return _interactive(sampler)
    prompt_ids = sampler.check_prompt([enc.eot_token] if mode == "unconditional" else enc.encode(prompt_text))
    # After the checks: loading takes a while. The sampler compiles before the weights are read.
    sampler.abandon_compiles = True  # Ctrl-C ends the run: a compile need not be waited for
    sampler.load(model_dir, load_model, draft_dir)
    sampler.print_samples(prompt_ids, prompt_number=0)
    return EXIT_OK


def _load_model(model_dir, load_model, **options):
    """Loads the model; a seam for tests, which reuse one loaded model across many runs."""
    return load_model(model_dir, **options)


class _Abandoned(KeyboardInterrupt):
    """Ctrl-C while a worker thread was inside TensorFlow (compiling, reading weights): the
    process must end at once, see _exit_now."""


def _in_thread(function, *args):
    """Starts function(*args) in a daemon thread; returns a Future of its result. (Not a
    ThreadPoolExecutor: the interpreter waits for those at exit, and a compile can take minutes.)"""
    future = concurrent.futures.Future()

    def work():
        try:
            future.set_result(function(*args))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(error)

    threading.Thread(target=work, name="gpt2-generate-worker", daemon=True).start()
    return future


def _wait_for(future):
    """The future's result. TensorFlow's compiles and weight reads are long calls into C++ that
    Ctrl-C cannot stop, so they run in a worker thread (_in_thread) and the main thread waits here,
    where Ctrl-C arrives at once: it abandons the worker by raising _Abandoned."""
    try:
        # Short waits: Ctrl-C arrives on Windows too. Waiting with wait(), not result(timeout=): a
        # TimeoutError the worker raises (a socket's, say) would read as "not done yet" forever.
        while not concurrent.futures.wait([future], timeout=0.2).done:
            pass
        return future.result()
    except KeyboardInterrupt:
        raise _Abandoned from None


def _exit_now(code):
    """Ends the process with `code` without the interpreter's shutdown, which would wait for
    the abandoned worker thread or abort inside TensorFlow's C++ while that thread still runs
    ("terminate called ...", exit 134). atexit functions are skipped: the compilation cache's
    new entries are not published (the interrupted compile made none), and its private folder is
    removed by the next run."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(code)


def _find_model(args, resolve_model_dir, old_names, presets):
    """The model folder of --model; downloads a released model first with --download, and
    finishes a download that was interrupted (a folder of a released name missing files)."""
    from gpt2.download import download_model, missing_files

    name = old_names.get(args.model, args.model)
    try:
        model_dir = resolve_model_dir(args.model, args.models_dir)
    except FileNotFoundError as error:
        if name not in presets:
            raise
        if not args.download:
            raise FileNotFoundError(f"{error}, or add --download") from None
    else:
        downloaded = name in presets and model_dir == os.path.join(args.models_dir, name)
        missing = missing_files(model_dir) if downloaded else ""
        if not missing:
            return model_dir
        if not args.download:
            raise FileNotFoundError(f"{model_dir} is an unfinished download ({missing}); finish it with --download or "
                                    f"python download_model.py {name} --models-dir {args.models_dir}")
    print(f"downloading {name} into {os.path.join(args.models_dir, name)}", file=sys.stderr, flush=True)
    return download_model(name, args.models_dir)


def _prompt_source(args):
    """(mode, prompt text): mode is "prompt" (with its text), "interactive" or "unconditional"."""
    if args.prompt is not None:
        if not args.prompt:
            raise ValueError("--prompt is empty; use --unconditional to sample without a prompt")
        return "prompt", _clean(args.prompt)
    if args.prompt_file is not None:
        return "prompt", _read_prompt_file(args.prompt_file)
    if args.interactive:
        if sys.stdin is None or getattr(sys.stdin, "closed", False):  # e.g. started with <&- or by a service
            raise ValueError("--interactive reads prompts from standard input, which is closed; "
                             "give --prompt, --prompt-file or --unconditional instead")
        return "interactive", None
    if args.unconditional:
        return "unconditional", None
    if _isatty(sys.stdin):
        return "interactive", None
    if sys.stdin is None:
        raise ValueError("no prompt: give --prompt, --prompt-file, --interactive or --unconditional")
    text = _clean(sys.stdin.read()).removesuffix("\n")
    if not text:
        raise ValueError("no prompt: standard input was empty; give --prompt, --prompt-file, --interactive or "
                         "--unconditional")
    return "prompt", text


def _read_prompt_file(path):
    if path == "-":
        text = _clean(sys.stdin.read()) if sys.stdin is not None else ""
        path = "standard input"
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte order mark
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: prompt file not found") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: prompt file is not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise OSError(f"{path}: cannot read the prompt file ({error.strerror or error})") from None
    text = text.removesuffix("\n")
    if not text:
        raise ValueError(f"{path}: the prompt is empty; use --unconditional to sample without a prompt")
    return text


def _interactive(sampler):
    """Asks for prompts until end of input or Ctrl-C; problems with one prompt do not end it."""
    out = sys.stdout
    echo = not _isatty(sys.stdin)  # piped input is not echoed by a terminal: echo it ourselves
    prompt_number = 0
    while True:
        try:
            text = input(INTERACTIVE_PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            out.flush()
            return EXIT_OK
        if echo:
            out.write(text + "\n")
        text = _clean(text)
        if not text:
            print("empty prompt; type some text (end of input, Ctrl-D, quits)", file=sys.stderr, flush=True)
            continue
        try:
            prompt_ids = sampler.check_prompt(sampler.enc.encode(text))
            sampler.print_samples(prompt_ids, prompt_number)
        except ValueError as error:
            out.flush()
            cli.fail(error, EXIT_ERROR)
            continue
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("interrupted: the samples of this prompt were stopped", file=sys.stderr, flush=True)
        prompt_number += 1


class _Sampler:
    """Samples and prints the --nsamples samples of a prompt, in batches of --batch-size."""

    def __init__(self, args, enc, hparams, settings_lib, stop_token, stream):
        self.args = args
        self.enc = enc
        self.hparams = hparams
        self.model = None
        self._lib = settings_lib
        self.settings = settings_lib.SamplingSettings(
            **{name: getattr(args, name) for name, *_ in _SETTINGS}, logit_bias=args.logit_bias,
        ).banning(getattr(enc, "never_drawn", ())).check_vocab(hparams.n_vocab)
        self.window_keep = settings_lib.check_window_keep(args.window_keep, hparams.n_ctx, "--window-keep")
        self.stop_token = stop_token
        self.stream = stream
        self.jit_compile = False if args.no_xla else None  # None: the model's default
        # Ctrl-C during a compile abandons it (ending the run), rather than waiting for it to end
        # (an interactive session goes on after Ctrl-C, so it waits: see _interactive).
        self.abandon_compiles = False
        self.draft = None  # speculative decoding (--draft-model, --prompt-lookup), made by load

    def load(self, model_dir, load_model, draft_dir=None):
        """Loads the model with the sampler made ready beside it (see load_options), in a worker
        thread that Ctrl-C abandons (see _wait_for). TensorFlow is imported first, here: its import
        catches file descriptor 2 for a moment (gpt2.cli), which must not hide the message of a
        Ctrl-C."""
        import_tensorflow()
        self._tracing = None
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)  # the reading thread gets the GIL back at once between ops

        def load_and_trace():
            model = _load_model(model_dir, load_model, dtype=self.args.dtype, before_weights=self._compile_sampler)
            if self._tracing is not None:
                self._tracing.result()  # raises what tracing raised
            return model

        try:
            self.model = _wait_for(_in_thread(load_and_trace))
            if draft_dir:
                from gpt2.sampling.speculative import DraftModel

                draft = _wait_for(_in_thread(lambda: _load_model(draft_dir, load_model, dtype=self.args.dtype)))
                self.draft = DraftModel(draft, tokens=self.args.draft_tokens)
        finally:
            sys.setswitchinterval(interval)
        if self.args.prompt_lookup:
            from gpt2.sampling.speculative import PromptLookup

            self.draft = PromptLookup(tokens=self.args.draft_tokens)

    def _compile_sampler(self, model):
        """Run by load_model before the weights are read: compiles the sampler when the run will need it, else
        traces the uncompiled sampler (short runs, see gpt2.sampling.api) in a thread while they are read."""
        from gpt2.sampling import api, direct

        rows = min(self.args.batch_size, self.args.nsamples)
        speculative = self.args.draft_model or self.args.prompt_lookup  # uncompiled: nothing to compile
        if not speculative and api.will_compile(model, rows, 1, self.args.length, self.jit_compile,
                                                tokens=self.args.length * self.args.nsamples):
            say_compiling("sampler")
            api.prepare(model, rows, self.jit_compile)
        else:  # trace the uncompiled sampler while the weights are read
            self._tracing = _in_thread(direct.prepare, model)

    def check_prompt(self, prompt_ids):
        """The prompt's ids; ValueError if it is longer than the model's context."""
        return self._lib.check_prompt(prompt_ids, self.hparams.n_vocab, self.hparams.n_ctx, field="the prompt")

    def print_samples(self, prompt_ids, prompt_number):
        from gpt2.sampling import api

        args, out = self.args, sys.stdout
        # One seed per sample: with --seed, sample i of prompt n gets the same seed whatever the batch size, and each
        # prompt of an interactive session gets new ones (without --seed, fresh entropy).
        seeds = self._lib.row_seeds(args.seed, (prompt_number + 1) * args.nsamples)[prompt_number * args.nsamples:]
        per_batch = min(args.batch_size, args.nsamples)
        for first in range(0, args.nsamples, per_batch):
            count = min(per_batch, args.nsamples - first)
            options = dict(settings=self.settings, window_keep=self.window_keep, seeds=seeds[first:first + count],
                           stop_token=self.stop_token, jit_compile=self.jit_compile, draft=self.draft)
            if self.draft is None and api.will_compile(self.model, count, len(prompt_ids), args.length,
                                                       self.jit_compile):
                say_compiling("sampler")
                if self.abandon_compiles:
                    _wait_for(_in_thread(api.prepare, self.model, count, self.jit_compile))
            if self.stream and count == 1:
                _print_header(out, first + 1)
                self._stream_one(api.stream_rows(self.model, [prompt_ids], args.length, **options), out)
                continue
            rows = api.sample_rows(self.model, [prompt_ids] * count, args.length, **options)
            for number, row in enumerate(rows, start=first + 1):
                if self.stop_token is not None and len(row) and row[-1] == self.stop_token:
                    row = row[:-1]
                _print_header(out, number)
                out.write(self.enc.decode(row) + "\n")
                out.flush()
        out.write("=" * 80 + "\n")
        out.flush()

    def _stream_one(self, steps, out):
        """Writes one row's text as its tokens arrive (complete characters only)."""
        decoder = self.enc.stream_decoder()
        try:
            for tokens in steps:
                token = int(tokens[0])
                if token == self.stop_token:
                    break
                text = decoder.push(token)
                if text:
                    out.write(text)
                    out.flush()
        finally:
            steps.close()
            out.write(decoder.flush() + "\n")
            out.flush()


def _print_header(out, number):
    out.write("=" * 40 + f" SAMPLE {number} " + "=" * 40 + "\n")


def _clean(text):
    """Text read from argv or stdin as valid Unicode: bytes that the locale could not decode
    (kept as surrogates) are decoded as UTF-8, anything else invalid becomes U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _isatty(stream):
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _tolerate_unencodable_text():
    """Generated text can hold any character; on a stdout that cannot encode it (an ASCII locale,
    an old Windows code page) print '?' instead of crashing. Undecodable stdin bytes are kept as
    surrogates (see _clean) instead of raising."""
    for stream, errors in ((sys.stdout, "replace"), (sys.stdin, "surrogateescape")):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                reconfigure(errors=errors)


class _OutputError(OSError):
    """Writing the generated text failed (not a pipe closed by its reader)."""


class _CheckedOutput:
    """sys.stdout whose write errors (disk full, a closed descriptor) say they are about the output."""

    def __init__(self, stream):
        self._stream = stream

    def _checked(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise _OutputError(f"cannot write the output: {error.strerror or error}") from None

    def write(self, text):
        return self._checked(self._stream.write, text)

    def flush(self):
        return self._checked(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout():
    """After a broken pipe, point stdout at the null device so the exit-time flush stays quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
