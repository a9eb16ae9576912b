"""SavedModel export (python -m gpt2.export) and Keras-native saving of gpt2.GPT2.

The tiny fixture is exported once; a fresh Python process that imports only TensorFlow loads
OUT/1 and runs its signatures, and this process compares what it got with the fixture's
reference outputs (computed with OpenAI's code), `gpt2.score`, `gpt2.sample_sequence` and the
reference path (gpt2/reference.py).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2 import export
from gpt2 import reference as reference_path
from gpt2.sampling.settings import row_seeds

import paths  # tests/paths.py: the folders the tests read
from paths import TINY_MODEL

ATOL = 1e-4
EOT = 50256
SEED = 1234
# Per-row sampling settings of the seeded test (one row each: plain, top-k, top-p).
LONG = [80, 70, 5]  # new tokens of the sliding-window test (the tiny model's n_ctx is 64)
SAMPLING = {"temperature": [1.0, 0.7, 1.3], "top_k": [0, 40, 0], "top_p": [1.0, 1.0, 0.9], "length": [20, 12, 16]}

# Runs in a fresh process: loads the export with TensorFlow alone and calls each signature.
CHILD = r"""
import json, sys
import numpy as np
import tensorflow as tf

export_dir, request_path, result_path = sys.argv[1:]
with open(request_path) as f:
    requests = json.load(f)
loaded = tf.saved_model.load(export_dir)
results = {"signatures": sorted(loaded.signatures)}
for name, (signature, inputs) in requests.items():
    dtypes = {key: spec.dtype for key, spec in loaded.signatures[signature].structured_input_signature[1].items()}
    outputs = loaded.signatures[signature](**{key: tf.constant(value, dtypes[key]) for key, value in inputs.items()})
    results[name] = {key: value.numpy().tolist() for key, value in outputs.items()}
results["imported"] = sorted(name for name in ("gpt2", "encoder") if name in sys.modules)
with open(result_path, "w") as f:
    json.dump(results, f)
"""


def padded(rows, fill):
    width = max(len(row) for row in rows)
    return [list(row) + [fill] * (width - len(row)) for row in rows]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """OUT of the tiny model exported with the command line (in this process). One batch size (4,
    as the library's pool for 3 rows) keeps tracing and compiling short."""
    out = str(tmp_path_factory.mktemp("export") / "tiny")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert export.main(["--model", TINY_MODEL, "--output", out, "--batch-sizes", "4"]) == 0
    EXPORT_STDERR.append(err.getvalue())
    return out


EXPORT_STDERR = []  # what the `exported` fixture's run printed on stderr


def test_item18_export_says_each_step_as_it_starts(exported):
    """Export is silent for minutes no more: a numbered line as each step starts, on stderr."""
    steps = [line.split("] ", 1)[1] for line in EXPORT_STDERR[0].splitlines()]
    assert steps == [f"loading {TINY_MODEL}...", "compiling serving_default (the generation loop for batch sizes 4)...",
                     "compiling logits...", "compiling score...", f"writing {os.path.join(exported, '1')}..."]
    assert [line.split(",")[0] for line in EXPORT_STDERR[0].splitlines()] == [f"[{n}/5" for n in range(1, 6)]


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(os.path.join(exported, "1"))


def test_layout_for_tf_serving(exported):
    assert os.listdir(exported) == ["1"]  # no temporary folder left behind
    files = sorted(os.listdir(os.path.join(exported, "1")))
    assert {"saved_model.pb", "variables", "assets"} <= set(files)
    assets = os.path.join(exported, "1", "assets")
    assert sorted(os.listdir(assets)) == ["encoder.json", "vocab.bpe"]
    for name in ("encoder.json", "vocab.bpe"):
        with open(os.path.join(assets, name), "rb") as a, open(os.path.join(TINY_MODEL, name), "rb") as b:
            assert a.read() == b.read()


@pytest.mark.slow
def test_fresh_process_with_tensorflow_only(exported, reference, tiny_model, tmp_path):
    cases = reference["greedy"]["cases"]
    prompts = [case["prompt_ids"] for case in cases]
    assert len({len(p) for p in prompts}) == 3
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    seeds = row_seeds(SEED, batch)
    score_rows = [reference["inputs"]["len40"][0][:30], reference["inputs"]["len7"][0], [EOT], []]
    # The padding may hold any id, even one outside the vocabulary.
    generate = {"tokens": padded(prompts, 99999), "lengths": lengths, "top_k": [0] * batch, "top_p": [1.0] * batch}
    requests = {
        "greedy": ("serving_default", {**generate, "max_new_tokens": [20, 9, 20], "temperature": [0.0] * batch,
                                       "seed": [0] * batch}),
        "seeded": ("serving_default", {**generate, "max_new_tokens": SAMPLING["length"],
                                       "temperature": SAMPLING["temperature"], "top_k": SAMPLING["top_k"],
                                       "top_p": SAMPLING["top_p"], "seed": seeds.tolist()}),
        # Past n_ctx = 64 the window slides, as in the library.
        "long": ("serving_default", {**generate, "max_new_tokens": LONG, "temperature": [0.0] * batch,
                                     "seed": [0] * batch}),
        "logits_len7": ("logits", {"tokens": reference["inputs"]["len7"]}),
        "logits_batch2": ("logits", {"tokens": reference["inputs"]["batch2"]}),
        "score": ("score", {"tokens": padded(score_rows, 99999), "lengths": [len(r) for r in score_rows]}),
    }
    request_path, result_path = tmp_path / "requests.json", tmp_path / "results.json"
    request_path.write_text(json.dumps(requests))
    # As TF Serving: no persistent XLA cache (importing gpt2 here pointed TF_XLA_FLAGS at one).
    env = dict(os.environ, TF_XLA_FLAGS=" ".join(flag for flag in os.environ.get("TF_XLA_FLAGS", "").split()
                                                  if not flag.startswith("--tf_xla_persistent_cache_directory")))
    child = subprocess.run([sys.executable, "-c", CHILD, os.path.join(exported, "1"), str(request_path),
                            str(result_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(result_path.read_text())
    assert results["imported"] == []
    assert results["signatures"] == ["logits", "score", "serving_default"]

    # Greedy: the reference tokens, each row its own length, padded with <|endoftext|>.
    greedy = results["greedy"]
    assert greedy["num_tokens"] == [20, 9, 20]
    for row, case, n in zip(greedy["tokens"], cases, greedy["num_tokens"]):
        assert row[:n] == case["new_ids"][:n]
        assert row[n:] == [EOT] * (20 - n)

    # Logits: OpenAI's, within 1e-4.
    full7 = np.load(os.path.join(TINY_MODEL, "reference", "logits_len7_all.npy"))
    np.testing.assert_allclose(results["logits_len7"]["logits"], full7, atol=ATOL, rtol=0)
    last2 = np.load(os.path.join(TINY_MODEL, "reference", "last_logits_batch2.npy"))
    np.testing.assert_allclose(np.array(results["logits_batch2"]["logits"])[:, -1], last2, atol=ATOL, rtol=0)

    # Score: gpt2.score's values (XLA there, not here: float rounding only), 0 past each length.
    token_logprobs = np.array(results["score"]["token_logprobs"], np.float32)
    assert token_logprobs.shape == (4, 29)
    for row, expected in zip(token_logprobs, gpt2.score(tiny_model, score_rows)):
        np.testing.assert_allclose(row[: len(expected)], expected, atol=1e-5, rtol=0)
        assert not row[len(expected):].any()

    # Seeded sampling: row i with seed row_seeds(SEED, 3)[i] is sample_sequence(seed=SEED)'s row i.
    expected = gpt2.sample_sequence(tiny_model, prompts, SAMPLING["length"], temperature=SAMPLING["temperature"],
                                    top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], seed=SEED)
    seeded = results["seeded"]
    assert seeded["num_tokens"] == SAMPLING["length"]
    for row, prompt, full, n in zip(seeded["tokens"], prompts, expected, SAMPLING["length"]):
        assert row[:n] == full[len(prompt):].tolist()
        assert row[n:] == [EOT] * (max(SAMPLING["length"]) - n)
    assert seeded["tokens"] != greedy["tokens"]

    # Past the context too, the export makes the reference path's greedy tokens (gpt2/reference.py).
    assert results["long"]["num_tokens"] == LONG
    for row, prompt, n in zip(results["long"]["tokens"], prompts, LONG):
        assert row[:n] == reference_path.generate(tiny_model, prompt, n)


def test_generate_without_xla(tiny_model, reference):
    """--no-xla: the same loop as a plain graph (called here without saving). With batch size 2,
    the 3 rows run in two groups (2, then 1 padded to 2)."""
    from gpt2.savedmodel import ServingModule

    module = ServingModule(tiny_model, max_new_tokens=32, jit_compile=False, batch_sizes=[2])
    prompts = [case["prompt_ids"] for case in reference["greedy"]["cases"]]
    batch = len(prompts)
    out = module.generate(tokens=tf.constant(padded(prompts, 0)), lengths=tf.constant([len(p) for p in prompts]),
                          max_new_tokens=tf.constant([20, 3, 20]), temperature=tf.zeros([batch]),
                          top_k=tf.zeros([batch], tf.int32), top_p=tf.ones([batch]), seed=tf.zeros([batch], tf.int32))
    assert out["num_tokens"].numpy().tolist() == [20, 3, 20]
    for row, case, n in zip(out["tokens"].numpy().tolist(), reference["greedy"]["cases"], [20, 3, 20]):
        assert row == case["new_ids"][:n] + [EOT] * (20 - n)


def test_saved_model_cli_lists_the_signatures(exported):
    cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable)) or shutil.which("saved_model_cli")
    assert cli, "saved_model_cli (installed with tensorflow) not found"
    result = subprocess.run([cli, "show", "--dir", os.path.join(exported, "1"), "--all"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("serving_default", "logits", "score"):
        assert f"signature_def['{name}']" in result.stdout
    for name in ("tokens", "lengths", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_tokens",
                 "logits", "token_logprobs"):
        assert f"['{name}'] tensor_info" in result.stdout


def bad_generate(loaded, **changes):
    inputs = {"tokens": [[464, 3139, 0]], "lengths": [2], "max_new_tokens": [3], "temperature": [0.0],
              "top_k": [0], "top_p": [1.0], "seed": [0]}
    inputs.update(changes)
    dtypes = {"temperature": tf.float32, "top_p": tf.float32}
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        loaded.signatures["serving_default"](**{k: tf.constant(v, dtypes.get(k, tf.int32)) for k, v in inputs.items()})
    return str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"lengths": [4]}, "lengths must be between 1 and the prompt width"),
    ({"lengths": [0]}, "lengths must be between 1 and the prompt width"),
    ({"tokens": [[464] * 65], "lengths": [65]}, "prompts must be at most n_ctx = 64 tokens long"),
    ({"tokens": [[464, 50257, 0]]}, "tokens must be token ids in [0, 50257)"),
    ({"max_new_tokens": [0]}, "max_new_tokens must be between 1 and 4096"),
    ({"temperature": [-1.0]}, "temperature must be a finite number >= 0"),
    ({"temperature": [101.0]}, "temperature must be a finite number >= 0 and <= 100"),  # the library's bounds
    ({"top_p": [1.5]}, "top_p must be a number in [0, 1]"),
    ({"top_k": [-1]}, "top_k must be >= 0"),
    ({"seed": [0, 1]}, "must each have one value per row of tokens"),
])
def test_generate_refuses_bad_input(loaded, changes, message):
    assert message in bad_generate(loaded, **changes)


def test_score_ignores_padding_ids(loaded):
    """Past a row's length the padding may hold any id, even one outside the vocabulary."""
    score = loaded.signatures["score"](tokens=tf.constant([[464, 3139, -5]]), lengths=tf.constant([2]))
    assert score["token_logprobs"].shape == (1, 2) and score["token_logprobs"][0, 1] == 0.0


def test_logits_and_score_refuse_bad_input(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="tokens must be at most n_ctx = 64 tokens long"):
        loaded.signatures["logits"](tokens=tf.zeros([1, 65], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tokens must be token ids in \[0, 50257\)"):
        loaded.signatures["logits"](tokens=tf.constant([[1, -1]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="lengths must be between 0 and tokens.shape"):
        loaded.signatures["score"](tokens=tf.zeros([1, 3], tf.int32), lengths=tf.constant([4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="at most n_ctx \\+ 1 = 65"):
        loaded.signatures["score"](tokens=tf.zeros([1, 66], tf.int32), lengths=tf.constant([66]))


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt2.export", *args], capture_output=True, text=True, timeout=120,
                          cwd=paths.ROOT)


def test_cli_refuses_an_existing_version(exported):
    before = sorted(os.listdir(os.path.join(exported, "1")))
    result = run_cli("--model", TINY_MODEL, "--output", exported)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: {os.path.join(exported, '1')}: already exists; pass --overwrite to replace it or choose "
        "another --version")
    assert not [line for line in result.stderr.splitlines() if line.startswith(("Traceback", "error:"))][:-1]
    assert sorted(os.listdir(os.path.join(exported, "1"))) == before


def test_cli_unknown_model_and_help(tmp_path):
    result = run_cli("--model", "nosuch", "--models-dir", str(tmp_path), "--output", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'nosuch' not found")
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "-c", "import sys; from gpt2 import export; export.build_parser()."
                             "print_help(); print('tensorflow' in sys.modules)"], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "False"
    text = " ".join(result.stdout.split())
    assert "(default: 4096)" in text and "(default: 1)" in text


def fake_save(module, path, signatures):
    """Stands in for tf.saved_model.save (the real one is tested above): the layout's files."""
    assert sorted(signatures) == ["logits", "score", "serving_default"]
    os.makedirs(os.path.join(path, "assets"))
    for asset in module.assets:
        shutil.copyfile(asset.asset_path.numpy().decode(), os.path.join(path, "assets", os.path.basename(
            asset.asset_path.numpy().decode())))
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
        f.write("new")


def test_overwrite_replaces_a_version_whole(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "1"))
    with open(os.path.join(out, "1", "saved_model.pb"), "w") as f:
        f.write("old")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        export.export_model(TINY_MODEL, out)

    def failing_save(module, path, signatures):
        os.makedirs(path)
        raise tf.errors.ResourceExhaustedError(None, None, "out of memory")

    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    with pytest.raises(tf.errors.ResourceExhaustedError):
        export.export_model(TINY_MODEL, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["1"] and os.listdir(os.path.join(out, "1")) == ["saved_model.pb"]

    monkeypatch.setattr(tf.saved_model, "save", fake_save)
    path = export.export_model(TINY_MODEL, out, overwrite=True)
    assert path == os.path.join(out, "1") and sorted(os.listdir(out)) == ["1"]
    assert sorted(os.listdir(path)) == ["assets", "saved_model.pb"]
    assert sorted(os.listdir(os.path.join(path, "assets"))) == ["encoder.json", "vocab.bpe"]
    with open(os.path.join(path, "saved_model.pb")) as f:
        assert f.read() == "new"


# ----------------------------------------------------------------------------- Keras conventions

@pytest.fixture(scope="module")
def len7(reference):
    return np.array(reference["inputs"]["len7"], np.int32)


# Keras' own saving code converts variables with np.array(x, copy=False), which NumPy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_save_and_load_model_round_trip(tiny_model, len7, tmp_path):
    path = str(tmp_path / "tiny.keras")
    tiny_model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, gpt2.GPT2) and restored.hparams == tiny_model.hparams
    assert [v.path for v in restored.weights] == [v.path for v in tiny_model.weights]
    np.testing.assert_array_equal(restored(len7)["logits"].numpy(), tiny_model(len7)["logits"].numpy())


def test_model_export_and_tf_saved_model_save(len7, tmp_path):
    model = gpt2.load_model(TINY_MODEL)  # never called before export
    expected = np.load(os.path.join(TINY_MODEL, "reference", "logits_len7_all.npy"))
    model.export(str(tmp_path / "keras_export"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "keras_export"))
    np.testing.assert_allclose(reloaded.serve(len7)["logits"].numpy(), expected, atol=ATOL, rtol=0)
    signature = reloaded.signatures["serving_default"]
    np.testing.assert_allclose(signature(tokens=tf.constant(len7))["logits"].numpy(), expected, atol=ATOL, rtol=0)

    tf.saved_model.save(model, str(tmp_path / "tf_saved"))
    reloaded = tf.saved_model.load(str(tmp_path / "tf_saved"))
    np.testing.assert_allclose(reloaded.serve(len7)["logits"].numpy(), expected, atol=ATOL, rtol=0)
    signature = reloaded.signatures["serving_default"]
    np.testing.assert_allclose(signature(tokens=tf.constant(len7))["logits"].numpy(), expected, atol=ATOL, rtol=0)
