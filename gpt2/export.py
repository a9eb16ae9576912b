"""Exports a GPT-2 model folder as a SavedModel for TF Serving: `python -m gpt2.export`.

    python -m gpt2.export --model 124M --output exports/gpt2              # writes exports/gpt2/1/
    python -m gpt2.export --model path/to/finetuned --output exports/gpt2 --version 2

OUT/<version>/ is laid out as TF Serving expects: saved_model.pb, variables/, and assets/ with
encoder.json and vocab.bpe (the model folder's BPE files, else the bundled GPT-2 ones; a GPT2-ML
folder's WordPiece vocabulary file instead) so that clients can tokenise. A GPT2-ML export pads
its generated tokens with [SEP] and never draws [PAD] (banned in the graph). The signatures
(serving_default = generation, logits, score) are described in `gpt2.savedmodel`. Any folder
`gpt2.load_model` reads works: OpenAI's layout, Hugging Face's or GPT2-ML's, released or fine-tuned.

The export is written in a temporary folder inside OUT (a name TF Serving does not take for a
version) and renamed to OUT/<version> when complete; an existing version is replaced only with
--overwrite. Arguments are parsed (and --help answered) before TensorFlow is imported; bad input
ends in a one-line `error: ...` on stderr.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

from gpt2 import cli
from gpt2.cli import DEFAULT_MODELS_DIR, EXIT_OK, add_model_arguments, non_negative_int, positive_int
from gpt2.runtime import import_tensorflow

DEFAULT_VERSION = 1
DEFAULT_MAX_NEW_TOKENS = 4096
ASSET_NAMES = ("encoder.json", "vocab.bpe")


def _batch_sizes(text):
    """argparse type of --batch-sizes: comma-separated integers >= 1."""
    try:
        return [positive_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be integers >= 1 separated by commas, got {text!r}") from None


def export_model(model, output, version=DEFAULT_VERSION, overwrite=False, models_dir=DEFAULT_MODELS_DIR,
                 jit_compile=True, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, batch_sizes=None, progress=None):
    """Writes the SavedModel of `model` (a model folder, or a name under `models_dir`) to
    `output/<version>` and returns that path.

    An existing non-empty `output/<version>` is an error (FileExistsError) unless `overwrite`.
    jit_compile: compile the decode loop with XLA (faster; TF Serving then needs
    `--xla_cpu_compilation_enabled=true`). max_new_tokens: the most new tokens a request may ask for.
    batch_sizes: the batch sizes the decode loop is built (and compiled) for; a request's rows are
    padded to the smallest that holds them (default: gpt2.savedmodel.default_batch_sizes).
    progress(step, steps, message): called as each step starts (loading, building each signature,
    writing); building the generation signature takes longest (minutes for the larger models).
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be an integer >= 0, got {version!r}")
    target = os.path.join(output, str(version))
    _check_target(output, target, overwrite)
    from gpt2.checkpoint import resolve_model_dir

    model_dir = resolve_model_dir(model, models_dir)

    def say(step, message):  # of 5 steps
        if progress is not None:
            progress(step, 5, message)

    say(1, f"loading {model_dir}")
    import_tensorflow()  # quietly, before anything else imports it
    import tensorflow as tf

    from encoder import encoder_files_for_model_dir, encoder_for_model_dir
    from encoder.wordpiece import wordpiece_vocab_file
    from gpt2.checkpoint import load_model
    from gpt2.convert import move_into_place
    from gpt2.savedmodel import ServingModule

    loaded = load_model(model_dir)
    os.makedirs(output, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.exporting-", dir=output)
    try:
        bpe_dir = os.path.join(staging, "bpe")
        os.mkdir(bpe_dir)
        assets = []
        vocab = wordpiece_vocab_file(model_dir)  # a GPT2-ML folder's tokenizer, else the BPE files
        sources = [vocab] if vocab else encoder_files_for_model_dir(model_dir)
        for source, name in zip(sources, [os.path.basename(vocab)] if vocab else ASSET_NAMES):
            assets.append(os.path.join(bpe_dir, name))
            shutil.copyfile(source, assets[-1])
        enc = encoder_for_model_dir(model_dir)
        module = ServingModule(loaded, max_new_tokens, assets, jit_compile=jit_compile, batch_sizes=batch_sizes,
                               pad_token=enc.eot_token, never_drawn=getattr(enc, "never_drawn", ()))
        # Each signature is traced (its graph built) here, one by one, so that progress can be
        # shown; tf.saved_model.save then reuses the traces.
        sizes = ", ".join(map(str, module.batch_sizes))
        say(2, f"compiling serving_default (the generation loop for batch sizes {sizes})")
        module.generate.get_concrete_function()
        say(3, "compiling logits")
        module.logits.get_concrete_function()
        say(4, "compiling score")
        module.score.get_concrete_function()
        say(5, f"writing {target}")
        saved = os.path.join(staging, "saved")
        tf.saved_model.save(module, saved, signatures=module.signatures())
        move_into_place(saved, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_target(output, target, overwrite):
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output}: exists and is not a folder; choose another --output")
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise FileExistsError(f"{target}: exists and is not a folder; choose another --version")
    if os.listdir(target) and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass --overwrite to replace it or choose another --version")


def folder_bytes(path):
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def build_parser(prog="python -m gpt2.export"):
    """The argument parser; every option's help states its default."""
    parser = cli.Parser(
        prog=prog, epilog="example: python -m gpt2.export --model 124M --output exports/gpt2",
        description="Export a GPT-2 model as a TensorFlow SavedModel for TF Serving: OUT/VERSION/ with saved_model.pb, "
                    "variables/ and assets/ (encoder.json, vocab.bpe). Signatures: serving_default (generation with "
                    "the compiled sampler), logits and score.")
    add_model_arguments(parser, role="the model to export")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="the model's base folder for TF Serving; the export goes to OUT/VERSION (required)")
    parser.add_argument("--version", type=non_negative_int, default=DEFAULT_VERSION, metavar="N",
                        help=f"version number: the subfolder of OUT to write (default: {DEFAULT_VERSION})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT/VERSION (default: off: refuse)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help="the most new tokens one request may ask for; larger max_new_tokens are refused "
                             f"(default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--batch-sizes", type=_batch_sizes, metavar="B,B,...",
                        help="batch sizes the decode loop is built and compiled for: a request's rows are padded to "
                             "the smallest that holds them, and run in groups of the largest when there are more; "
                             "fewer sizes export faster (default: 1,2,4,8, and up to 64 while their key/value cache "
                             "fits in 1 GiB: 1,2,4,8 for 124M)")
    parser.add_argument("--no-xla", dest="xla", action="store_false",
                        help="do not compile the decode loop with XLA: slower, but served without "
                             "--xla_cpu_compilation_enabled (default: compiled with XLA)")
    return parser


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit code."""
    return cli.main_of(build_parser(), argv, _run)


def _run(args):
    start = time.perf_counter()

    def progress(step, steps, message):  # on stderr: stdout has the result line only
        print(f"[{step}/{steps}, {time.perf_counter() - start:.0f} s] {message}...", file=sys.stderr, flush=True)

    target = export_model(args.model, args.output, args.version, args.overwrite, args.models_dir,
                          jit_compile=args.xla, max_new_tokens=args.max_new_tokens, batch_sizes=args.batch_sizes,
                          progress=progress)
    print(f"wrote {target} ({folder_bytes(target) / (1 << 20):.0f} MiB, {time.perf_counter() - start:.0f} s); "
          "signatures: serving_default (generate), logits, score")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
