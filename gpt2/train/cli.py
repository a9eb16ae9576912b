"""Command-line fine-tuning: `python train.py` (or the `gpt2-train` console script).

    python train.py --model 124M --dataset corpus.txt --steps 1000 --output models/my-run
    python generate.py --model models/my-run --prompt "..."

Arguments are parsed (and `--help` answered) before TensorFlow is imported. Bad input ends in a
one-line `error: ...` on stderr; Ctrl-C saves and exits with 130 (continue with --resume).
"""

import argparse
import dataclasses
import math
import os
import sys
import textwrap

from gpt2 import cli
from gpt2.cli import EXIT_INTERRUPTED, EXIT_OK, add_model_arguments, non_negative_int, number, positive_int
from gpt2.runtime import import_tensorflow

DEFAULTS = dict(
    model="124M", models_dir="models", run_name="run1", steps=1000, batch_size=1, accumulate=1,
    learning_rate=1e-4, warmup_steps=0, lr_schedule="constant", weight_decay=0.01, clip_norm=1.0,
    dropout=0.0, seed=0, save_every=1000, sample_every=0, sample_length=100, val_every=100,
    val_batches=8, lora_rank=0, compute_dtype="float32", strategy="none",
)
STRATEGIES = ("none", "mirrored", "multi-worker")

_positive_float = number(float, lambda v: 0 < v < math.inf, "a positive number")
_non_negative_float = number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
_fraction = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_dropout = number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_seq_len = number(int, lambda v: v >= 2, "an integer >= 2")


def build_parser(prog=None):
    """The argument parser; every option's help states its default."""
    d = DEFAULTS
    parser = cli.Parser(
        prog=prog,
        description=textwrap.fill(
            "Fine-tune GPT-2 on your text. The result is a model folder in OpenAI's layout "
            "(generate from it with: generate.py --model OUTPUT), with the training state in "
            "OUTPUT/train_state/ for --resume. Ctrl-C stops after the current step and saves.",
            width=78,
        ),
        epilog=(
            "examples:\n"
            "  train.py --dataset corpus.txt --steps 1000 --output models/my-run\n"
            "  train.py --dataset 'texts/**/*.txt' --val-fraction 0.05 --sample-every 100\n"
            "  train.py --model 1558M --dataset data.npz --lora-rank 8 --recompute --seq-len 512\n"
            "  train.py --dataset corpus.txt --steps 2000 --output models/my-run --resume\n"
            "Errors print one line 'error: ...' on stderr; exit codes: 0 ok, 1 error, 2 bad usage, "
            "130 interrupted (saved)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("model and output")
    add_model_arguments(group, role="the model to start from")
    group.add_argument("--output", metavar="DIR",
                       help="the model folder to write (default: --models-dir/--run-name)")
    group.add_argument("--run-name", default=d["run_name"], metavar="NAME",
                       help=f"names the default --output (default: {d['run_name']})")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a model or training state already in --output (default: off: refuse)")
    group.add_argument("--resume", action="store_true",
                       help="continue from --output's last save, with the same settings and data "
                            "(default: off)")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", nargs="+", required=True, metavar="PATH",
                       help="UTF-8 text files, folders of them (searched recursively), glob patterns "
                            "(quote them), or .npy/.npz token files (gpt-2-simple's encode_dataset "
                            "output too); documents are joined with <|endoftext|>, and a literal "
                            "<|endoftext|> in the text is that token. Encoded tokens are cached in "
                            "OUTPUT/token_cache (required)")
    val = group.add_mutually_exclusive_group()
    val.add_argument("--val-dataset", nargs="+", metavar="PATH",
                     help="held-out data, same forms as --dataset (default: none)")
    val.add_argument("--val-fraction", type=_fraction, metavar="F",
                     help="hold out the last fraction F of the dataset's tokens (default: none)")
    group.add_argument("--val-every", type=non_negative_int, default=d["val_every"], metavar="N",
                       help=f"validation loss every N steps and at the end, 0 = only at the end "
                            f"(default: {d['val_every']})")
    group.add_argument("--val-batches", type=positive_int, default=d["val_batches"], metavar="N",
                       help=f"validation batches (of --batch-size windows) to average (default: {d['val_batches']})")
    group.add_argument("--seq-len", type=_seq_len, metavar="N",
                       help="tokens per training window (default: the model's context, n_ctx: 1024)")

    group = parser.add_argument_group("optimization")
    group.add_argument("--steps", type=positive_int, default=d["steps"], metavar="N",
                       help=f"optimizer steps to reach (a resumed run counts on) (default: {d['steps']})")
    group.add_argument("--batch-size", type=positive_int, default=d["batch_size"], metavar="N",
                       help="windows per micro-batch, over all devices (default: "
                            f"{d['batch_size']})")
    group.add_argument("--accumulate", type=positive_int, default=d["accumulate"], metavar="N",
                       help="micro-batches per optimizer step (gradient accumulation: equal to an "
                            f"N times larger batch) (default: {d['accumulate']})")
    group.add_argument("--learning-rate", type=_positive_float, default=d["learning_rate"], metavar="LR",
                       help=f"peak learning rate (default: {d['learning_rate']})")
    group.add_argument("--warmup-steps", type=non_negative_int, default=d["warmup_steps"], metavar="N",
                       help=f"linear warm-up steps (default: {d['warmup_steps']})")
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d["lr_schedule"],
                       help="after warm-up: constant, or cosine decay to 0 at --steps (default: "
                            f"{d['lr_schedule']})")
    group.add_argument("--weight-decay", type=_non_negative_float, default=d["weight_decay"], metavar="W",
                       help="AdamW weight decay; none on biases and LayerNorm parameters (default: "
                            f"{d['weight_decay']})")
    group.add_argument("--clip-norm", type=_non_negative_float, default=d["clip_norm"], metavar="C",
                       help=f"clip gradients to this global norm, 0 = off (default: {d['clip_norm']})")
    group.add_argument("--dropout", type=_dropout, default=d["dropout"], metavar="P",
                       help=f"dropout rate (OpenAI's release: 0) (default: {d['dropout']})")
    group.add_argument("--seed", type=non_negative_int, default=d["seed"], metavar="N",
                       help="seed of the data order, dropout and LoRA initialisation: the run is "
                            f"a deterministic function of seed, data and settings (default: {d['seed']})")
    group.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=False,
                       help="compile the training step with XLA (single device only; its first "
                            "step takes longer to compile) (default: off)")

    group = parser.add_argument_group("memory")
    group.add_argument("--recompute", action="store_true",
                       help="gradient checkpointing: recompute each block's activations in the "
                            "backward pass (less memory, about a third more compute) (default: off)")
    group.add_argument("--lora-rank", type=non_negative_int, default=d["lora_rank"], metavar="R",
                       help="train only rank-R adapters on c_attn, c_proj and c_fc; they are merged "
                            "into the weights saved, 0 = train every weight (default: 0)")
    group.add_argument("--lora-alpha", type=_positive_float, metavar="A",
                       help="LoRA scale numerator: adapters are scaled by A / R (default: R)")
    group.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=d["compute_dtype"],
                       help="bfloat16: mixed precision: bfloat16 matmuls, float32 weights, LayerNorm "
                            "and softmax (default: float32)")

    group = parser.add_argument_group("saving, samples and logs")
    group.add_argument("--save-every", type=non_negative_int, default=d["save_every"], metavar="N",
                       help="save every N steps, 0 = only at the end; a save also happens at the end "
                            f"and on Ctrl-C (default: {d['save_every']})")
    group.add_argument("--sample-every", type=non_negative_int, default=d["sample_every"], metavar="N",
                       help="print a sample from --sample-prompt every N steps, 0 = never (default: 0)")
    group.add_argument("--sample-prompt", default="", metavar="TEXT",
                       help="prompt of the samples (default: none: they start at <|endoftext|>)")
    group.add_argument("--sample-length", type=positive_int, default=d["sample_length"], metavar="N",
                       help=f"tokens per sample (default: {d['sample_length']})")
    group.add_argument("--logdir", metavar="DIR",
                       help="write TensorBoard logs here: train/val loss, learning rate, gradient norm, "
                            "tokens/s, samples (default: none)")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bar (default: a tqdm bar on stderr)")

    group = parser.add_argument_group("devices")
    group.add_argument("--strategy", choices=STRATEGIES, default=d["strategy"],
                       help="none: one device; mirrored: tf.distribute.MirroredStrategy over every "
                            "local GPU; multi-worker: MultiWorkerMirroredStrategy configured by "
                            "$TF_CONFIG (default: none)")
    return parser


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit code."""
    return cli.main_of(build_parser(prog=None if argv is None else "train.py"), argv, _checked_run,
                       lambda args: f"interrupted; the last save in {_output(args)} is intact", _user_errors)


def _output(args):
    return args.output or os.path.join(args.models_dir, args.run_name)


def _checked_run(args):
    if args.lora_alpha is not None and not args.lora_rank:
        raise cli.UsageError("--lora-alpha needs --lora-rank")
    return _run(args, _output(args))


def _user_errors():
    from gpt2.formats.base import CheckpointError
    from gpt2.train.data import DatasetError
    from gpt2.train.state import TrainingError

    return CheckpointError, DatasetError, TrainingError, FileNotFoundError, ValueError, OSError


def _run(args, output):
    from gpt2.checkpoint import resolve_model_dir
    from gpt2.train.data import expand_paths
    from gpt2.train.state import TrainingError, check_output

    # Paths first: a mistyped name is answered before TensorFlow is imported (seconds).
    check_output(output, args.resume, args.overwrite)
    source_dir = resolve_model_dir(args.model, args.models_dir)
    if args.lora_rank and os.path.realpath(source_dir) == os.path.realpath(output):
        raise TrainingError("with --lora-rank, --output must differ from --model (its weights are the base)")
    for dataset in (args.dataset, args.val_dataset or []):
        expand_paths(dataset)
    if args.resume:
        _say_resuming(output)
    import_tensorflow()  # quietly, before anything else imports it
    from gpt2.checkpoint import load_model
    from gpt2.train.trainer import TrainConfig, finetune

    strategy = _strategy(args.strategy)
    with strategy.scope():
        model = load_model(source_dir, dtype="mixed_bfloat16" if args.compute_dtype == "bfloat16" else "float32",
                           dropout=args.dropout)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    settings = {name: value for name, value in vars(args).items() if name in fields}  # the options of those names
    settings.update(val_fraction=args.val_fraction or 0.0, progress=not args.no_progress)
    result = finetune(model, args.dataset, output, val_dataset=args.val_dataset, source_dir=source_dir,
                      strategy=strategy, resume=args.resume, overwrite=args.overwrite, **settings)
    loss = f", loss {result.loss:.4f}" if result.loss is not None else ""
    print(f"step {result.step}{loss}; the model is in {output}: python generate.py --model {output}",
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _say_resuming(output):
    """--resume: says the step of the last save (the trainer checks the record in full)."""
    from gpt2.train.state import LATEST_FILE, STATE_DIR, read_json

    record = read_json(os.path.join(output, STATE_DIR, LATEST_FILE))
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, int) and not isinstance(step, bool):
        print(f"resuming from step {step} (the last save in {output})", file=sys.stderr, flush=True)


def _strategy(name):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("--strategy multi-worker needs $TF_CONFIG (the cluster and this worker's task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


if __name__ == "__main__":
    sys.exit(main())
