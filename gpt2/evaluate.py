"""Perplexity of text files under GPT-2 (or GPT2-ML): `python -m gpt2.evaluate --model 124M FILE...`.

Each file's text is encoded with the model folder's tokenizer, its end of text (<|endoftext|>;
GPT2-ML's [SEP]) prepended (so its first token is scored too) and
scored with `gpt2.perplexity` in sliding windows, streamed: neither the text nor its tokens are
held whole. Prints, per file and in total, the tokens scored, the mean negative log-likelihood
(nats/token), the perplexity and bits per byte (total NLL / ln 2 / UTF-8 bytes of the text).
With --json, stdout is one JSON object {"tokens", "nll", "perplexity", "bits_per_byte"} (all
files together; nll is the mean in nats/token).

Arguments are parsed (and --help answered) before TensorFlow is imported. Bad input ends in a
one-line `error: ...` on stderr.
"""

import itertools
import json
import math
import sys

from gpt2 import cli
from gpt2.cli import EXIT_OK, add_model_arguments, positive_int, say_compiling
from gpt2.runtime import import_tensorflow, quiet_tensorflow

READ_BLOCK = 1 << 20


def build_parser(prog="python -m gpt2.evaluate"):
    """The argument parser; every option's help states its default."""
    parser = cli.Parser(
        prog=prog, epilog="example: python -m gpt2.evaluate --model 124M --json wiki.test.raw",
        description="Score text files with GPT-2: tokens scored, mean negative log-likelihood (nats per token), "
                    "perplexity and bits per byte, per file and in total. Each file is encoded with <|endoftext|> in "
                    "front, so every token of its text is scored, in sliding windows of the model's context: by "
                    "default lm-evaluation-harness's rolling windows, with --windows hf Hugging Face's documented "
                    "recipe.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="text files to score (UTF-8 unless --encoding)")
    add_model_arguments(parser, role="the model to score with")
    parser.add_argument("--stride", type=positive_int, metavar="S",
                        help="tokens between window starts, at most the model's context; after the first window each "
                             "token is predicted from at least context - S + 1 tokens; S = context gives disjoint "
                             "windows (default: half the context, 512 for the released models)")
    parser.add_argument("--windows", choices=("rolling", "hf"), default="rolling",
                        help="window convention: rolling feeds a context of tokens and scores the context's worth of "
                             "tokens after them, every token but the first exactly once (lm-evaluation-harness's "
                             "rolling windows); hf is Hugging Face's documented recipe, whose windows hold the tokens "
                             "they predict (at most context - 1 per window) and weigh each window's mean by its "
                             "labels less one, to reproduce its published numbers exactly (default: rolling)")
    parser.add_argument("--batch-size", type=positive_int, metavar="B",
                        help="windows per compiled call (default: as many as keep the logits near 512 MiB, 2 for the "
                             "released models)")
    parser.add_argument("--encoding", default="utf-8", metavar="NAME",
                        help="the files' text encoding, any name Python knows (latin-1, cp1252, utf-16, ...); a UTF-8 "
                             "byte order mark at the start is not text (default: utf-8)")
    parser.add_argument("--json", action="store_true",
                        help="print only one JSON object with the keys tokens, nll (mean, nats/token), perplexity and "
                             "bits_per_byte, for all files together (default: a table)")
    return parser


def check_text_file(path, encoding="utf-8"):
    """The UTF-8 byte count of a text file's text (a byte order mark is not text); a one-line
    error if it is missing, unreadable, not `encoding` (naming the byte) or empty. Reads the
    file in blocks."""
    from encoder import read_text_chunks

    size = 0
    try:
        for text in read_text_chunks(path, encoding, READ_BLOCK):
            size += len(text.encode("utf-8", "surrogatepass"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, not a text file") from None
    except OSError as error:
        raise OSError(f"{path}: cannot read ({error.strerror or error})") from None
    if size == 0:
        raise ValueError(f"{path}: the file is empty, nothing to score")
    return size


def main(argv=None):
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit code."""
    return cli.main_of(build_parser(), argv, _run)


def _run(args):
    sizes = [check_text_file(path, args.encoding) for path in args.files]
    quiet_tensorflow()  # before anything imports it
    from tqdm import tqdm

    from encoder import encoder_for_model_dir
    from gpt2.checkpoint import folder_format, load_model, resolve_model_dir

    # The files and the model folder are checked before TensorFlow is imported (seconds), except a
    # GPT2-ML folder's, whose shape is read from its checkpoint's index. Its format says the shape
    # and the folder its tokenizer (GPT2-ML's WordPiece, whose end of text [SEP] is prepended).
    model_dir = resolve_model_dir(args.model, args.models_dir)
    n_ctx = folder_format(model_dir).read_hparams(model_dir).n_ctx
    stride = n_ctx // 2 if args.stride is None else args.stride
    if stride > n_ctx:
        raise ValueError(f"--stride {stride} is more than the model's context of {n_ctx} tokens")
    enc = encoder_for_model_dir(model_dir)

    def tokens_of(path):  # <|endoftext|>, then the text's tokens chunk by chunk
        return itertools.chain([[enc.eot_token]], enc.encode_file(path, encoding=args.encoding))

    # A first, cheap encoding pass counts the windows, so the progress bar has a total.
    counts = [sum(len(chunk) for chunk in tokens_of(path)) for path in args.files]
    import_tensorflow()
    from gpt2.scoring import perplexity, window_count

    model = _load_model(model_dir, load_model)
    rows = []
    say_compiling("scorer")  # the first call compiles it: the bar says "compiling" until then
    with tqdm(total=sum(window_count(n, n_ctx, stride, args.windows) for n in counts), desc="compiling",
              unit="window", file=sys.stderr) as bar:

        def progress(windows):
            if bar.n == 0:
                bar.set_description("scoring", refresh=False)
            bar.update(windows)

        for path, size in zip(args.files, sizes):
            result = perplexity(model, tokens_of(path), stride=stride, batch_size=args.batch_size,
                                progress=progress, windows=args.windows)
            rows.append((path, result.tokens, result.total_nll, size))
    total = ("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows))
    if args.json:
        print(json.dumps(_summary(*total[1:])))
    else:
        _print_table(rows + [total] if len(rows) > 1 else rows)
    return EXIT_OK


def _load_model(model_dir, load_model):
    """Loads the model; a seam for tests, which reuse one loaded model across runs."""
    return load_model(model_dir)


def _summary(tokens, total_nll, size):
    """The figures of `tokens` tokens with summed NLL `total_nll` (nats) over `size` bytes."""
    mean = total_nll / tokens
    return dict(tokens=tokens, nll=mean, perplexity=math.exp(mean), bits_per_byte=total_nll / math.log(2) / size)


def _print_table(rows):
    """rows: (name, tokens, total NLL, bytes) -> an aligned table on stdout."""
    header = ("file", "tokens", "nll/token", "perplexity", "bits/byte")
    lines = [header]
    for name, tokens, total_nll, size in rows:
        figures = _summary(tokens, total_nll, size)
        lines.append((name, str(tokens), f"{figures['nll']:.4f}", f"{figures['perplexity']:.3f}",
                      f"{figures['bits_per_byte']:.4f}"))
    width = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [line[0].ljust(width[0])] + [cell.rjust(w) for cell, w in zip(line[1:], width[1:])]
        print("  ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
