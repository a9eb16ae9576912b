"""Converts a GPT-2 folder between OpenAI's checkpoint layout and Hugging Face's.

    python -m gpt2.convert --to hf SRC DST        # config.json, model.safetensors, vocab.json, ...
    python -m gpt2.convert --to openai SRC DST    # hparams.json, checkpoint, model.ckpt.*, encoder.json, ...

SRC is a folder in either layout (or a model name under --models-dir). The tensors are copied
bit for bit (OpenAI -> Hugging Face -> OpenAI gives back the original values; float16/bfloat16
Hugging Face weights become float32). DST is written in a temporary folder beside it and renamed
into place, so it never holds a half-written model.
"""

import argparse
import os
import shutil
import sys
import tempfile

from gpt2.runtime import current_umask

FORMATS = ("hf", "openai")


def convert(src, dst, to, overwrite=False, models_dir="models", skip_optimizer_slots=False):
    """Writes the model of `src` (a folder in either layout, or a name under `models_dir`) to the
    new folder `dst` in layout `to` ("hf" or "openai"), with its BPE files. `dst` must not exist
    or be empty, unless `overwrite`. skip_optimizer_slots: copy the weights of a checkpoint that
    a TF1 training run saved with its optimizer's slots, leaving those out. Returns the HParams written."""
    from encoder import encoder_files_for_model_dir
    from gpt2.checkpoint import open_weights, resolve_model_dir, write_checkpoint

    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}: choose from {', '.join(FORMATS)}")
    src_dir = resolve_model_dir(src, models_dir)
    _check_destination(src_dir, dst, overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.converting-", dir=parent)
    try:
        with open_weights(src_dir, skip_optimizer_slots) as weights:
            hparams = weights.hparams
            if to == "hf":
                from gpt2.formats.hf import write_hf_weights

                write_hf_weights(hparams, weights.read, staging)
            else:
                write_checkpoint(hparams, staging, weights.read, encoder_dir=src_dir)
        names = ("vocab.json", "merges.txt") if to == "hf" else ("encoder.json", "vocab.bpe")
        for source, name in zip(encoder_files_for_model_dir(src_dir), names):
            target = os.path.join(staging, name)
            if not os.path.exists(target):
                shutil.copyfile(source, target)
        _set_default_permissions(staging)
        move_into_place(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return hparams


def _check_destination(src_dir, dst, overwrite):
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if os.path.samefile(src_dir, dst):
        raise ValueError(f"{dst}: is the source folder; write the conversion to another folder")
    if os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst}: folder is not empty; choose a new folder or pass --overwrite")


def _set_default_permissions(folder):
    """The modes a plain mkdir/open would give (mkdtemp and some writers use owner-only modes)."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def move_into_place(staging, dst):
    """Renames the finished folder `staging` to `dst`; an existing `dst` is moved aside first and
    deleted only once the new folder is in place."""
    if not os.path.exists(dst):
        os.rename(staging, dst)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.replaced-",
                             dir=os.path.dirname(os.path.abspath(dst)))
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        os.rename(staging, dst)
    except OSError:
        os.rename(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m gpt2.convert", description="Convert a GPT-2 folder between OpenAI's checkpoint layout and "
                                                   "Hugging Face's (config.json + model.safetensors). The weights are "
                                                   "copied bit for bit.")
    parser.add_argument("--to", required=True, choices=FORMATS,
                        help="layout to write: hf (config.json, model.safetensors, vocab.json, merges.txt, "
                             "generation_config.json) or openai (hparams.json, checkpoint, model.ckpt.*, encoder.json, "
                             "vocab.bpe); required")
    parser.add_argument("src", metavar="SRC", help="model folder in either layout, or a model name under --models-dir")
    parser.add_argument("dst", metavar="DST", help="folder to write; must not exist or be empty")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (default: off: refuse)")
    parser.add_argument("--models-dir", default="models", metavar="DIR",
                        help="where a model name SRC is looked up (default: models)")
    parser.add_argument("--skip-optimizer-slots", action="store_true",
                        help="SRC is a checkpoint a TF1 training run saved with its optimizer's slots (W/Adam, "
                             "W/Adam_1, beta1_power, ...): copy the weights alone (default: off: refuse it)")
    return parser


def main(argv=None):
    from gpt2 import cli
    from gpt2.runtime import quiet_tensorflow

    def body(args):
        quiet_tensorflow()  # before TensorFlow is first imported
        hparams = convert(args.src, args.dst, args.to, overwrite=args.overwrite, models_dir=args.models_dir,
                          skip_optimizer_slots=args.skip_optimizer_slots)
        layout = "Hugging Face" if args.to == "hf" else "OpenAI"
        print(f"wrote {args.dst} ({layout} layout, n_layer {hparams.n_layer}, n_embd {hparams.n_embd})")
        return cli.EXIT_OK

    return cli.main_of(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
