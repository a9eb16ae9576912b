"""gpt2.score / gpt2.perplexity / python -m gpt2.evaluate on the tiny model (n_ctx 64).

References: the fixture's logits (computed with OpenAI's code) for `score`; its loss for
`perplexity` over one window; and, for several windows, a slow reference in this file that runs
the model on each window naively and picks each token's first prediction by hand.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from encoder import get_encoder
from gpt2 import evaluate
from gpt2.scoring import compiled_scorer, echo_logprobs

import paths  # tests/paths.py: the folders the tests read
from paths import TINY_MODEL

ATOL = 1e-4
N_CTX = 64
EOT = 50256


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def reference_logprobs(name, ids):
    """log p(ids[t] | ids[:t]), t >= 1, from a fixture logits file [1, len(ids), V]."""
    logits = np.load(os.path.join(TINY_MODEL, "reference", name + ".npy"))[0]
    return log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]


def naive_perplexity(model, tokens, stride):
    """(total NLL, tokens scored), the slow way: run the model on each window of n_ctx tokens
    starting every `stride` tokens, and take each token's log-probability from the first
    window that predicts it (from whatever context precedes it in that window)."""
    tokens = list(tokens)
    scored = {}
    for start in range(0, len(tokens), stride):
        window = tokens[start : start + N_CTX]
        logprobs = log_softmax(model(np.array([window]))["logits"].numpy()[0])
        for i in range(len(window)):
            target = start + i + 1
            if target < len(tokens) and target not in scored:
                scored[target] = logprobs[i, tokens[target]]
    assert sorted(scored) == list(range(1, len(tokens)))
    return -sum(scored.values()), len(scored)


@pytest.fixture(scope="module")
def long_tokens(reference):
    """150 tokens: real text ids, then ids spread over the whole vocabulary."""
    inputs = reference["inputs"]
    ids = inputs["len40"][0] + inputs["len7"][0] + inputs["batch2"][0] + inputs["batch2"][1]
    spread = np.random.default_rng(0).integers(0, 50257, 150 - len(ids))
    return np.array(ids + spread.tolist(), np.int32)


# ----------------------------------------------------------------------------- score

def test_score_equals_log_softmax_of_reference_logits(tiny_model, reference):
    len7 = reference["inputs"]["len7"][0]
    incremental = reference["incremental"]["ids"]
    len40 = reference["inputs"]["len40"][0]
    per_position = reference["len40_per_position"]
    len40_expected = np.array(per_position["target_logit"]) - np.array(per_position["logsumexp"][:39])
    got = gpt2.score(tiny_model, [len7, incremental, len40])
    assert [g.dtype for g in got] == [np.float32] * 3
    np.testing.assert_allclose(got[0], reference_logprobs("logits_len7_all", len7), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[1], reference_logprobs("incr_full10_logits", incremental), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[2], len40_expected, rtol=0, atol=ATOL)


def test_ragged_rows_equal_rows_alone(tiny_model, long_tokens):
    lengths = [40, 0, 7, 65, 1, 2, 33, 64, 12]  # 65 = n_ctx + 1: the last token is only predicted
    rows = [long_tokens[i : i + n].tolist() for i, n in enumerate(lengths)]
    together = gpt2.score(tiny_model, rows, batch_size=4)
    assert [len(r) for r in together] == [max(n - 1, 0) for n in lengths]
    for row, scores in zip(rows, together):
        np.testing.assert_allclose(scores, gpt2.score(tiny_model, [row])[0], rtol=0, atol=1e-5)
    rectangular = gpt2.score(tiny_model, np.array([rows[2], rows[2][::-1]]))
    np.testing.assert_allclose(rectangular[0], together[2], rtol=0, atol=1e-5)


def test_top_k_alternatives(tiny_model, reference):
    len7 = reference["inputs"]["len7"][0]
    (scores,) = gpt2.score(tiny_model, [len7], top_k=3)
    expected = log_softmax(np.load(os.path.join(TINY_MODEL, "reference", "logits_len7_all.npy"))[0])[:-1]
    expected_ids = np.argsort(-expected, axis=-1)[:, :3]
    np.testing.assert_array_equal(scores.top_ids, expected_ids)
    np.testing.assert_allclose(scores.top_logprobs, np.take_along_axis(expected, expected_ids, -1), atol=ATOL)
    assert scores.top_ids.dtype == np.int32 and scores.top_logprobs.shape == (6, 3)
    np.testing.assert_allclose(scores.logprobs, gpt2.score(tiny_model, [len7])[0], rtol=0, atol=1e-5)


def test_greedy_tokens_agree_exactly_with_their_top_logprob(tiny_model, reference):
    cases = reference["greedy"]["cases"]
    for top_k in (1, 7):  # 1..5 share one compiled function
        results = gpt2.score(tiny_model, [case["all_ids"] for case in cases], top_k=top_k)
        for case, scores in zip(cases, results):
            greedy = slice(len(case["prompt_ids"]) - 1, None)  # the positions predicting new_ids
            np.testing.assert_array_equal(scores.top_ids[greedy, 0], case["new_ids"])
            np.testing.assert_array_equal(scores.logprobs[greedy], scores.top_logprobs[greedy, 0])
            assert np.all(scores.top_logprobs[:, :-1] >= scores.top_logprobs[:, 1:])


def test_echo_logprobs_puts_null_first(tiny_model, reference):
    len7 = reference["inputs"]["len7"][0]
    scores = gpt2.score(tiny_model, [len7], top_k=2)[0]
    echoed, empty, one = echo_logprobs(tiny_model, [len7, [], [EOT]], top_n=2)
    assert len(echoed.logprobs) == 7 and np.isnan(echoed.logprobs[0]) and np.isnan(echoed.top_logprobs[0]).all()
    assert echoed.top_ids[0].tolist() == [-1, -1]
    np.testing.assert_allclose(echoed.logprobs[1:], scores.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(echoed.top_ids[1:], scores.top_ids)
    assert len(empty.logprobs) == 0 and empty.top_ids.shape == (0, 2)
    assert np.isnan(one.logprobs).tolist() == [True] and one.top_ids.shape == (1, 2)
    (plain,) = echo_logprobs(tiny_model, [len7])
    assert plain.top_ids.shape == (7, 0) and plain.top_logprobs.shape == (7, 0)
    with pytest.raises(ValueError, match="top_n must be an integer between 0 and n_vocab"):
        echo_logprobs(tiny_model, [len7], top_n=-1)


def test_compiled_programs_are_reused_across_lengths(tiny_model, long_tokens):
    """Shapes are bucketed: any mix of lengths and batch sizes reuses a few traces."""
    scorer = compiled_scorer(tiny_model, jit_compile=False)
    rng = np.random.default_rng(1)

    def random_call():
        rows = [long_tokens[: rng.integers(2, 66)] for _ in range(rng.integers(1, 6))]
        gpt2.score(tiny_model, rows, batch_size=2, jit_compile=False)

    for _ in range(12):
        random_call()
    # lengths 32 or 64, rows 1 or 2: at most 4 programs
    assert scorer.traces <= 4
    traced = scorer.traces
    for _ in range(12):
        random_call()
    assert scorer.traces == traced


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        ([list(range(66))], {}, "at most n_ctx \\+ 1 = 65 .*use gpt2.perplexity"),
        ([1, 2, 3], {}, "to score one sequence pass \\[tokens\\]"),
        ([[1, 50257]], {}, "outside the vocabulary \\[0, 50257\\): \\[50257\\]"),
        ([[1.5, 2.0]], {}, "integer token ids"),
        ([[1, 2]], {"top_k": -1}, "top_k must be"),
        ([[1, 2]], {"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_score_errors(tiny_model, tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt2.score(tiny_model, tokens, **kwargs)


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_of_one_window_equals_reference_loss(tiny_model, reference):
    result = gpt2.perplexity(tiny_model, reference["inputs"]["len40"][0], stride=N_CTX)
    assert (result.tokens, result.windows) == (39, 1)
    assert result.mean_nll == pytest.approx(reference["loss_len40"]["value"], abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(reference["loss_len40"]["value"]), rel=1e-5)


@pytest.mark.parametrize("stride, batch_size", [(64, 4), (32, None), (16, 4), (24, 4), (5, 4)])
def test_perplexity_equals_naive_windows(tiny_model, long_tokens, stride, batch_size):
    expected_nll, expected_tokens = naive_perplexity(tiny_model, long_tokens, stride)
    windows = []
    result = gpt2.perplexity(tiny_model, long_tokens, stride=stride, batch_size=batch_size,
                             progress=windows.append)
    assert result.tokens == expected_tokens == 149
    assert result.total_nll == pytest.approx(expected_nll, rel=1e-6)
    assert sum(windows) == result.windows == 1 + math.ceil((150 - 1 - N_CTX) / stride)


def test_perplexity_default_stride_is_half_the_context(tiny_model, long_tokens):
    expected_nll, _ = naive_perplexity(tiny_model, long_tokens, N_CTX // 2)
    assert gpt2.perplexity(tiny_model, long_tokens).total_nll == pytest.approx(expected_nll, rel=1e-6)


def test_perplexity_reads_a_stream_as_it_goes(tiny_model, long_tokens):
    tokens = np.tile(long_tokens, 7)[:1000]
    consumed, consumed_at_first_batch = [0], []

    def chunks():
        for i in range(0, len(tokens), 16):
            consumed[0] += 16
            yield tokens[i : i + 16]

    def progress(windows):
        consumed_at_first_batch.append(consumed[0])

    whole = gpt2.perplexity(tiny_model, tokens, stride=64, batch_size=4)
    streamed = gpt2.perplexity(tiny_model, chunks(), stride=64, batch_size=4, progress=progress)
    assert consumed_at_first_batch[0] < 400
    assert (streamed.tokens, streamed.windows) == (whole.tokens, whole.windows) == (999, 16)
    assert streamed.total_nll == pytest.approx(whole.total_nll, rel=1e-9)
    scalars = gpt2.perplexity(tiny_model, iter(tokens.tolist()), stride=64, batch_size=4)
    assert scalars.total_nll == pytest.approx(whole.total_nll, rel=1e-9)


def test_perplexity_of_too_few_tokens_is_empty(tiny_model):
    for tokens in ([], [EOT]):
        result = gpt2.perplexity(tiny_model, tokens)
        assert (result.tokens, result.windows, result.total_nll) == (0, 0, 0.0)
        assert math.isnan(result.mean_nll)


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        ([1, 2, 3], {"stride": 0}, "stride must be a positive integer"),
        ([1, 2, 3], {"stride": 65}, "stride must be at most the model's context \\(64\\)"),
        (np.zeros([2, 3], np.int32), {}, "one sequence \\(1-D\\)"),
        ([[1, 2], [3, -1]], {}, "outside the vocabulary"),
    ],
)
def test_perplexity_errors(tiny_model, tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt2.perplexity(tiny_model, tokens, **kwargs)


# ----------------------------------------------------------------------------- evaluate CLI

TEXTS = [
    "The tiny model has never read a book, so every word of this text surprises it a great deal.\n" * 3,
    "Zürich, 東京 and naïve café: bytes per byte counts UTF-8 bytes, not characters. " * 4,
]


@pytest.fixture
def run_cli(tiny_model, monkeypatch, capsys):
    """Runs `python -m gpt2.evaluate` in-process with the shared tiny model; returns
    (exit code, stdout, stderr)."""
    monkeypatch.setattr(evaluate, "_load_model", lambda model_dir, load_model: tiny_model)

    def run(*argv):
        code = evaluate.main(["--model", TINY_MODEL, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_evaluate_json_equals_independent_reference(tiny_model, run_cli, tmp_path):
    paths = [write(tmp_path, f"text{i}.txt", text) for i, text in enumerate(TEXTS)]
    enc = get_encoder()
    total_nll, tokens = 0.0, 0
    for text in TEXTS:
        ids = [EOT] + enc.encode(text)
        nll, count = naive_perplexity(tiny_model, ids, 32)
        assert count == len(ids) - 1 > N_CTX
        total_nll, tokens = total_nll + nll, tokens + count
    size = sum(len(text.encode("utf-8")) for text in TEXTS)
    code, out, _ = run_cli("--json", "--batch-size", "4", *paths)
    assert code == 0
    result = json.loads(out.splitlines()[-1])
    assert sorted(result) == ["bits_per_byte", "nll", "perplexity", "tokens"]
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(total_nll / tokens, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / size, rel=1e-6)


def test_evaluate_prints_a_table(tiny_model, run_cli, tmp_path):
    paths = [write(tmp_path, f"text{i}.txt", text) for i, text in enumerate(TEXTS)]
    code, out, _ = run_cli("--stride", "64", "--batch-size", "4", *paths)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["file", "tokens", "nll/token", "perplexity", "bits/byte"]
    assert [line.split()[0] for line in lines[1:]] == [*paths, "total"]
    ids = [EOT] + get_encoder().encode(TEXTS[0])
    nll, count = naive_perplexity(tiny_model, ids, 64)
    assert lines[1].split()[1:3] == [str(count), f"{nll / count:.4f}"]


@pytest.mark.parametrize(
    "content, argv, message",
    [
        (None, [], "missing.txt: file not found"),
        (b"abc\xff", [], "not UTF-8 text \\(invalid start byte at byte 3\\)"),
        (b"caf\xc3", [], "not UTF-8 text .* at the end of the file"),
        (b"", [], "the file is empty, nothing to score"),
        ("text", ["--stride", "65"], "--stride 65 is more than the model's context of 64 tokens"),
    ],
)
def test_evaluate_errors(run_cli, tmp_path, content, argv, message):
    path = str(tmp_path / "missing.txt") if content is None else write(tmp_path, "in.txt", content)
    code, out, err = run_cli(*argv, path)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and __import__("re").search(message, err)


def test_evaluate_unknown_model(tmp_path, capsys):
    path = write(tmp_path, "in.txt", "text")
    assert evaluate.main(["--model", "7B", "--models-dir", str(tmp_path), path]) == 1
    assert capsys.readouterr().err.startswith("error: model '7B' not found")


def test_evaluate_help_does_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from gpt2.evaluate import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['--help']) == 0\n"
        "assert '--stride' in out.getvalue() and 'default' in out.getvalue()\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    root = paths.ROOT
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_item14_evaluate_reads_other_encodings_and_a_byte_order_mark(run_cli, tmp_path):
    text = "Z\u00fcrich caf\u00e9, na\u00efve. " * 5
    utf8 = write(tmp_path, "utf8.txt", text)
    latin = write(tmp_path, "latin.txt", text.encode("latin-1"))
    bom = write(tmp_path, "bom.txt", b"\xef\xbb\xbf" + text.encode("utf-8"))
    code, out, err = run_cli("--json", latin)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.strip() == (f"error: {latin}: not UTF-8 text (invalid start byte at byte 1); give the file's "
                           "encoding with --encoding (e.g. --encoding latin-1)")
    results = [run_cli("--json", *args) for args in ([utf8], ["--encoding", "latin-1", latin], [bom])]
    assert [code for code, _, _ in results] == [0, 0, 0]
    figures = [json.loads(out) for _, out, _ in results]
    assert figures[0] == figures[1] == figures[2]  # same text, same tokens, same UTF-8 byte count


# ----------------------------------------------------------------------------- issue 24 item 21


def naive_hf_perplexity(model, tokens, stride):
    """(nll_sum, n_tokens) of Hugging Face's documented recipe ("Perplexity of fixed-length
    models"), transcribed line for line with NumPy in place of torch: labels masked with -100, the
    loss a mean over the shifted valid labels, weighted by num_valid_tokens - batch_size."""
    encodings = np.array([list(tokens)])
    max_length, seq_len = N_CTX, encodings.shape[1]
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.copy()
        target_ids[:, :-trg_len] = -100
        logits = model(input_ids)["logits"].numpy().astype(np.float64)
        shift_logits, shift_labels = logits[:, :-1], target_ids[:, 1:]  # what the model's loss does
        valid = shift_labels != -100
        logprobs = log_softmax(shift_logits)
        picked = np.take_along_axis(logprobs, np.where(valid, shift_labels, 0)[..., None], -1)[..., 0]
        neg_log_likelihood = -picked[valid].mean()
        num_valid_tokens = int((target_ids != -100).sum())
        batch_size = target_ids.shape[0]
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("stride, batch_size", [(64, 4), (32, None), (16, 4), (24, 4), (5, 4)])
def test_item21_hf_windows_equal_hugging_faces_recipe(tiny_model, long_tokens, stride, batch_size):
    expected_nll, expected_tokens = naive_hf_perplexity(tiny_model, long_tokens, stride)
    windows = []
    result = gpt2.perplexity(tiny_model, long_tokens, stride=stride, batch_size=batch_size,
                             progress=windows.append, windows="hf")
    assert result.tokens == expected_tokens
    assert result.total_nll == pytest.approx(expected_nll, rel=1e-6)
    assert sum(windows) == result.windows == gpt2.scoring.window_count(150, N_CTX, stride, "hf")
    assert result.windows == len(range(0, 150 - N_CTX + stride, stride))  # the recipe's loop, to its break
    # The two conventions differ (other contexts, other weights), and the default is rolling.
    rolling_nll, rolling_tokens = naive_perplexity(tiny_model, long_tokens, stride)
    assert gpt2.perplexity(tiny_model, long_tokens, stride=stride).total_nll == pytest.approx(rolling_nll, rel=1e-6)
    assert rolling_tokens == 149 and result.mean_nll != pytest.approx(rolling_nll / rolling_tokens, rel=1e-9)


def test_item21_hf_windows_read_a_stream_and_short_inputs(tiny_model, long_tokens):
    tokens = np.tile(long_tokens, 3)[:400]
    whole = gpt2.perplexity(tiny_model, tokens, stride=64, batch_size=4, windows="hf")
    streamed = gpt2.perplexity(tiny_model, (tokens[i:i + 16] for i in range(0, 400, 16)), stride=64,
                               batch_size=4, windows="hf")
    assert (streamed.tokens, streamed.windows) == (whole.tokens, whole.windows) == (400 - 7, 7)  # 63 per window
    assert streamed.total_nll == pytest.approx(whole.total_nll, rel=1e-9)
    assert gpt2.perplexity(tiny_model, [EOT], windows="hf").windows == 0
    nll, count = naive_hf_perplexity(tiny_model, long_tokens[:10], 32)
    short = gpt2.perplexity(tiny_model, long_tokens[:10], windows="hf")
    assert (short.tokens, short.total_nll) == (count, pytest.approx(nll, rel=1e-6)) and count == 9
    with pytest.raises(ValueError, match="windows must be one of 'rolling', 'hf', got 'lm'"):
        gpt2.perplexity(tiny_model, long_tokens, windows="lm")


def test_item21_evaluate_windows_option(run_cli, tiny_model, tmp_path, capsys):
    path = write(tmp_path, "in.txt", TEXTS[0])
    ids = [EOT] + get_encoder().encode(TEXTS[0])
    code, out, err = run_cli("--json", "--windows", "hf", "--stride", "16", path)
    assert code == 0, err
    nll, count = naive_hf_perplexity(tiny_model, ids, 16)
    figures = json.loads(out)
    assert figures["tokens"] == count and figures["nll"] == pytest.approx(nll / count, rel=1e-6)
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "lm-evaluation-harness's rolling" in help_text and "Hugging Face's documented recipe" in help_text
