"""Fine-tuning (gpt2/train, train.py) on the tiny fixture model: memorisation, OpenAI-format
saves, exact resume, gradient accumulation, LoRA, recompute, tf.distribute, Keras fit, Ctrl-C
and every bad input's one-line error."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from encoder import get_encoder
from gpt2.formats.base import model_variables, variable_shapes
from gpt2.train import data as data_lib
from gpt2.train import lora
from gpt2.train.cli import main
from gpt2.train.state import TrainingError
from gpt2.train.trainer import TrainConfig, Trainer, finetune

import paths  # tests/paths.py: the folders the tests read
from paths import TINY_MODEL

ROOT = paths.ROOT
SENTENCE = "A cat sat on the mat today. "  # 8 tokens: no fixed phase against 15-token strides
OPENAI_FILES = {"checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001",
                "encoder.json", "vocab.bpe"}


@pytest.fixture(scope="module")
def enc():
    return get_encoder()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "fox.txt"
    path.write_text(SENTENCE * 70, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random model with a 512-token vocabulary: steps cost little (the tiny fixture's 50257-token
    output layer dominates its steps), for the tests that compare whole runs."""
    path = str(tmp_path_factory.mktemp("small") / "small-model")
    gpt2.write_random_checkpoint(gpt2.HParams(n_vocab=512, n_ctx=32, n_embd=32, n_head=4, n_layer=2), path, seed=1)
    return path


def random_tokens(n=3000, seed=0):
    return np.random.default_rng(seed).integers(0, 512, n)


def weights(model):
    return {name: variable.numpy().copy() for name, variable in model_variables(model).items()}


def max_difference(a, b):
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def train_cli(capsys, *args):
    code = main(["--model", TINY_MODEL, "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *fragments):
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def memorised(corpus, tmp_path_factory):
    """One CLI run on the repetitive corpus, shared by the tests that inspect its output."""
    output = str(tmp_path_factory.mktemp("run") / "fox-model")
    logdir = str(tmp_path_factory.mktemp("logs"))
    args = ["--model", TINY_MODEL, "--dataset", corpus, "--output", output, "--steps", "24",
            "--batch-size", "4", "--seq-len", "16", "--learning-rate", "1e-2", "--save-every", "12",
            "--val-fraction", "0.1", "--val-every", "12", "--sample-every", "24", "--sample-length", "6",
            "--sample-prompt", "A cat sat", "--logdir", logdir, "--no-progress"]
    code = main(args)
    return code, output, logdir


def test_loss_falls_far_and_the_output_is_an_openai_model_folder(memorised, enc, capsys):
    code, output, logdir = memorised
    assert code == 0
    model = gpt2.load_model(output)
    tokens = np.array([enc.encode(SENTENCE * 3)[8:24]])  # a 16-token window, like the training ones
    assert float(model.loss(tokens)) < 0.5  # from about 13.5: the text is memorised
    # Exactly OpenAI's files, variables and shapes (no optimizer slots, nothing else).
    assert OPENAI_FILES <= set(os.listdir(output))
    assert set(os.listdir(output)) - OPENAI_FILES == {"train_state", "token_cache"}
    found = dict(tf.train.list_variables(os.path.join(output, "model.ckpt")))
    assert found == {name: shape for name, shape in variable_shapes(model.hparams).items()}
    for name in ("encoder.json", "vocab.bpe"):
        with open(os.path.join(output, name), "rb") as a, open(os.path.join(TINY_MODEL, name), "rb") as b:
            assert a.read() == b.read()
    # generate.py reads it and continues the memorised sentence.
    from gpt2.generate_cli import main as generate_main

    assert generate_main(["--model", output, "--prompt", "A cat sat", "--top-k", "1", "--length", "8"]) == 0
    assert "\n on the mat today. A cat sat\n" in capsys.readouterr().out


def test_logs_hold_the_scalars_and_the_sample(memorised):
    _, _, logdir = memorised
    from tensorflow.core.util import event_pb2

    tags, texts = set(), []
    for name in os.listdir(logdir):
        for record in tf.data.TFRecordDataset(os.path.join(logdir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                tags.add(value.tag)
                if value.tag == "samples":
                    texts.append(tf.make_ndarray(value.tensor).item().decode())
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "val/loss", "samples"} <= tags
    assert texts and texts[0].startswith("A cat sat")


def test_resume_equals_the_uninterrupted_run(tmp_path, small):
    """Stopped at step 20 and resumed to 40 = 40 steps in one go (dropout on: its RNG state is
    part of the saved state; accumulation, warm-up and data order too)."""
    settings = dict(batch_size=2, accumulate=2, seq_len=16, learning_rate=1e-3, warmup_steps=5,
                    weight_decay=0.1, seed=3, progress=False, save_every=0)
    tokens = random_tokens()

    def model():
        return gpt2.load_model(small, dropout=0.1)

    whole = model()
    finetune(whole, tokens, str(tmp_path / "whole"), steps=40, **settings)
    output = str(tmp_path / "parts")
    first = model()
    assert finetune(first, tokens, output, steps=20, **settings).saved_step == 20
    resumed = model()
    result = finetune(resumed, tokens, output, steps=40, resume=True, **settings)
    assert result.step == 40 and len(result.losses) == 20
    assert max_difference(weights(whole), weights(resumed)) <= 1e-6
    assert max_difference(weights(whole), weights(gpt2.load_model(output))) <= 1e-6
    # The state is checked against the settings: another batch size is refused in one line.
    with pytest.raises(TrainingError, match=r"other settings \(batch_size 2 there, 4 now\)"):
        finetune(model(), tokens, output, steps=50, resume=True, **{**settings, "batch_size": 4})


def test_accumulation_equals_the_larger_batch(small):
    tokens = random_tokens()
    results = []
    for batch_size, accumulate in ((4, 1), (1, 4)):
        model = gpt2.load_model(small)
        result = finetune(model, tokens, steps=3, batch_size=batch_size, accumulate=accumulate, seq_len=16,
                          learning_rate=1e-3, progress=False)
        results.append((result.losses, weights(model)))
    for losses, final in results[1:]:
        np.testing.assert_allclose(losses, results[0][0], rtol=1e-5)
        assert max_difference(final, results[0][1]) <= 1e-5


# ---------------------------------------------------------------------------- memory options


def test_lora_merge_equals_the_adapted_model(tmp_path, reference):
    tokens = np.array(reference["inputs"]["len7"])
    model = gpt2.load_model(TINY_MODEL)
    before = weights(model)
    variables = lora.add_adapters(model, rank=2, alpha=4)
    assert len(variables) == 2 * 4 * model.hparams.n_layer
    np.testing.assert_allclose(model(tokens)["logits"], gpt2.load_model(TINY_MODEL)(tokens)["logits"], atol=1e-6)
    for variable in variables:  # b starts at zero; give every adapter an effect
        variable.assign(np.random.default_rng(len(variable.path)).normal(0, 0.3, variable.shape))
    adapted = model(tokens)["logits"].numpy()
    assert np.abs(adapted - reference_logits(tokens)).max() > 1e-2
    with lora.merged(model):
        np.testing.assert_allclose(model(tokens)["logits"], adapted, atol=1e-4)
    assert max_difference(weights(model), before) == 0  # the base weights are back exactly
    lora.merge(model)
    np.testing.assert_allclose(model(tokens)["logits"], adapted, atol=1e-4)
    assert not lora.adapter_variables(model)


def reference_logits(tokens):
    return gpt2.load_model(TINY_MODEL)(tokens)["logits"].numpy()


def test_lora_training_saves_a_plain_merged_checkpoint(tmp_path, small):
    tokens = random_tokens(20)[None]
    model = gpt2.load_model(small)
    source = weights(model)
    output = str(tmp_path / "lora")
    result = finetune(model, random_tokens(), output, source_dir=small, steps=4, batch_size=2, seq_len=16,
                      learning_rate=1e-2, lora_rank=2, progress=False)
    assert result.saved_step == 4
    assert max_difference(weights(model), source) == 0  # only the adapters trained
    adapted = model(tokens)["logits"].numpy()
    saved = gpt2.load_model(output)
    np.testing.assert_allclose(saved(tokens)["logits"], adapted, atol=1e-4)
    changed = {name for name, value in weights(saved).items() if np.abs(value - source[name]).max() > 0}
    assert changed == {f"model/h{i}/{path}/w" for i in range(2) for path in lora.TARGETS}


def test_recompute_gives_the_same_gradients_with_dropout(reference):
    tokens = np.array(reference["inputs"]["batch2"])
    model = gpt2.load_model(TINY_MODEL, dropout=0.2)
    generators = [layer.seed_generator for layer in model._flatten_layers()
                  if getattr(layer, "seed_generator", None) is not None]
    start = [g.state.numpy() for g in generators]

    def gradients(recompute):
        for generator, state in zip(generators, start):
            generator.state.assign(state)
        model.recompute = recompute

        @tf.function
        def run(tokens):
            with tf.GradientTape() as tape:
                loss = model.loss(tokens, training=True)
            return loss, tape.gradient(loss, model.trainable_variables)

        return run(tokens)

    loss, grads = gradients(False)
    loss_recomputed, grads_recomputed = gradients(True)
    assert float(loss) == pytest.approx(float(loss_recomputed), abs=1e-5)
    for a, b in zip(grads, grads_recomputed):  # the same dropout masks, recomputed
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), atol=1e-5)


def test_bfloat16_compute_trains_with_float32_weights(small):
    import inspect

    if "dtype" not in inspect.signature(gpt2.load_model).parameters:
        pytest.skip("gpt2.load_model has no dtype policies yet")
    model = gpt2.load_model(small, dtype="mixed_bfloat16")
    result = finetune(model, random_tokens(), steps=3, batch_size=2, seq_len=16, learning_rate=1e-3, progress=False)
    assert all(np.isfinite(result.losses))
    assert all(v.dtype == "float32" for v in model_variables(model).values())


# ---------------------------------------------------------------------------- Keras and scale-out


def test_keras_fit_trains_with_the_next_token_loss(small):
    import keras

    model = gpt2.load_model(small)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    tokens = np.tile(np.arange(7), 100)  # a repeating pattern: easy to learn
    dataset = data_lib.windows_dataset(tokens, seq_len=16, batch_size=4)
    history = model.fit(dataset, steps_per_epoch=4, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert len(losses) == 3 and losses[0] > 4 and losses[2] < losses[1] < losses[0]
    windows = np.stack([w.numpy() for w in dataset.take(2)])  # [2 batches, 4, 16]
    assert model.evaluate(tf.data.Dataset.from_tensor_slices(windows), verbose=0) == pytest.approx(
        np.mean([float(model.loss(w)) for w in windows]), rel=1e-5)


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpus_equals_one_device(small):
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import numpy as np, gpt2
        from gpt2.formats.base import model_variables
        tokens = np.random.default_rng(0).integers(0, 512, 3000)
        runs = []
        for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
            with strategy.scope():
                model = gpt2.load_model({small!r})
            result = gpt2.finetune(model, tokens, steps=3, batch_size=4, accumulate=2, seq_len=16,
                                   learning_rate=1e-4, strategy=strategy, progress=False)
            runs.append(({{k: v.numpy() for k, v in model_variables(model).items()}}, result.losses,
                         strategy.num_replicas_in_sync))
        (a, loss_a, n_a), (b, loss_b, n_b) = runs
        print(json.dumps({{"replicas": [n_a, n_b], "losses": [loss_a, loss_b],
                          "diff": max(float(np.abs(a[k] - b[k]).max()) for k in a)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == [1, 2]
    np.testing.assert_allclose(report["losses"][1], report["losses"][0], rtol=1e-5)
    assert report["diff"] <= 1e-5


# ---------------------------------------------------------------------------- stopping and saving


@pytest.mark.slow
def test_ctrl_c_saves_a_loadable_model(corpus, tmp_path):
    output = str(tmp_path / "interrupted")
    process = subprocess.Popen(
        [sys.executable, "train.py", "--model", TINY_MODEL, "--dataset", corpus, "--output", output,
         "--steps", "100000", "--batch-size", "2", "--seq-len", "16", "--save-every", "0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    seen = ""
    while "loss" not in seen:  # the progress bar shows a loss once steps are running
        chunk = process.stderr.read(1)
        assert chunk, f"train.py ended early: {seen[-2000:]}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=120)
    assert process.returncode == 130, (seen + rest)[-2000:]
    latest = json.load(open(os.path.join(output, "train_state", "latest.json")))
    assert latest["step"] >= 1 and "interrupted at step" in rest and "--resume" in rest
    gpt2.load_model(output)


def test_nan_loss_stops_and_keeps_the_last_good_save(tmp_path, small):
    output = str(tmp_path / "nan")
    model = gpt2.load_model(small)
    trainer = Trainer(model, random_tokens(), output, TrainConfig(steps=6, batch_size=2, seq_len=16,
                                                                  save_every=2, progress=False))
    step = trainer._build_step()
    calls = []

    def failing_step(batch):
        calls.append(1)
        loss, norm = step(batch)
        return (loss * np.nan if len(calls) == 3 else loss), norm

    trainer._step_fn = failing_step
    saved = None
    with pytest.raises(TrainingError, match=rf"loss is nan at step 3: training stopped; the last good save "
                                            rf"\(step 2\) is in {output}"):
        try:
            trainer.run()
        finally:
            saved = open(os.path.join(output, "model.ckpt.data-00000-of-00001"), "rb").read()
    assert json.load(open(os.path.join(output, "train_state", "latest.json")))["step"] == 2
    assert saved is not None and gpt2.load_model(output) is not None


def test_a_failed_save_keeps_the_previous_one(tmp_path, monkeypatch, small):
    output = str(tmp_path / "full-disk")
    trainer = Trainer(gpt2.load_model(small), random_tokens(), output,
                      TrainConfig(steps=4, batch_size=2, seq_len=16, save_every=2, progress=False))
    real_save = tf.raw_ops.SaveV2
    saves = []

    def save_once(**kwargs):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(**kwargs)

    monkeypatch.setattr(tf.raw_ops, "SaveV2", save_once)
    files = {}
    with pytest.raises(TrainingError, match=r"could not save step 4 to .*No space left on device.*"
                                            r"the last good save \(step 2\)"):
        try:
            trainer.run()
        finally:
            files = {n: open(os.path.join(output, n), "rb").read() for n in OPENAI_FILES}
    monkeypatch.undo()
    step2 = gpt2.load_model(output)
    assert json.load(open(os.path.join(output, "train_state", "latest.json")))["step"] == 2
    assert {n: open(os.path.join(output, n), "rb").read() for n in OPENAI_FILES} == files
    assert not [n for n in os.listdir(output) if n.startswith(".")]  # no staging leftovers
    # The previous save is still a consistent pair of model and state: resuming from it works.
    resumed = finetune(step2, random_tokens(), output, steps=3, batch_size=2, seq_len=16, save_every=2,
                       resume=True, progress=False)
    assert resumed.step == 3


# ---------------------------------------------------------------------------- bad input


def test_bad_datasets_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"GIF89a\x00\x01\x02 binary")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    broken_npz = tmp_path / "broken.npz"
    broken_npz.write_bytes(b"PK\x03\x04 not a zip")
    out_of_range = tmp_path / "ids.npy"
    np.save(out_of_range, np.array([1, 2, 60000]))
    cases = [
        (empty, "the dataset is empty"),
        (short, "the dataset has 5 tokens, fewer than one window of --seq-len 16"),
        (binary, "binary file"),
        (latin1, "not UTF-8 text"),
        (broken_npz, "cannot read token ids"),
        (out_of_range, "token ids must be in 0..50256"),
        (tmp_path / "missing.txt", "no such file or folder"),
        (str(tmp_path / "*.md"), "no files match"),
    ]
    for number, (path, message) in enumerate(cases):
        code, _, err = train_cli(capsys, "--dataset", str(path), "--seq-len", "16",
                                 "--output", str(tmp_path / f"out{number}"))
        assert code == 1, err
        assert_one_line_error(err, message)


def test_bad_outputs_and_resumes_give_one_line_errors(tmp_path, capsys, corpus):
    holds_model = tmp_path / "other-model"
    shutil.copytree(TINY_MODEL, holds_model)
    code, _, err = train_cli(capsys, "--dataset", corpus, "--output", str(holds_model))
    assert code == 1
    assert_one_line_error(err, "already holds a model; pass --overwrite")
    code, _, err = train_cli(capsys, "--dataset", corpus, "--output", str(tmp_path / "new"), "--resume")
    assert code == 1
    assert_one_line_error(err, "holds no training state")
    code, _, err = train_cli(capsys, "--dataset", corpus, "--lora-alpha", "2")
    assert code == 2
    assert_one_line_error(err, "--lora-alpha needs --lora-rank")
    code, _, err = train_cli(capsys, "--dataset", corpus, "--val-fraction", "1.5")
    assert code == 2
    assert_one_line_error(err, "--val-fraction")


def test_help_answers_without_tensorflow():
    code = ("import sys; from gpt2.train.cli import main; "
            "code = main(['--help']); assert 'tensorflow' not in sys.modules; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for option in ("--accumulate", "--lora-rank", "--recompute", "--compute-dtype", "--strategy",
                   "--save-every", "--sample-every", "--logdir", "--resume", "--val-fraction"):
        assert option in result.stdout
    text = " ".join(result.stdout.split())
    assert "(default: constant)" in text and "global norm, 0 = off (default: 1.0)" in text


# ---------------------------------------------------------------------------- data and schedule


def test_datasets_join_documents_and_load_token_files(tmp_path, enc):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document.")
    (folder / "sub" / "b.txt").write_text("Second one.<|endoftext|>Third.")
    (folder / ".hidden.txt").write_text("never read")
    chunks = [np.array(enc.encode("Hello there"), np.int64), np.array(enc.encode(" again"), np.int64)]
    np.savez_compressed(tmp_path / "simple.npz", *chunks)  # gpt-2-simple's encode_dataset layout
    np.save(tmp_path / "ids.npy", np.array([1, 2, 3], np.int32))
    eot = [enc.eot_token]
    expected = (enc.encode("First document.") + eot + enc.encode("Second one.") + eot + enc.encode("Third.")
                + eot + enc.encode("Hello there") + enc.encode(" again") + eot + [1, 2, 3])
    specs = [str(folder), str(tmp_path / "*.npz"), str(tmp_path / "ids.npy")]
    data = data_lib.load_tokens(specs, enc)
    assert data.tokens.tolist() == expected
    cache = tmp_path / "cache"
    cached = data_lib.load_tokens(specs, enc, cache_dir=str(cache))
    assert isinstance(cached.tokens, np.memmap) and cached.tokens.tolist() == expected
    assert cached.fingerprint == data.fingerprint and len(os.listdir(cache)) == 1
    # A re-run reads the cache: the encoder is not used again.
    original = enc.encode_iter
    enc.encode_iter = None
    try:
        assert data_lib.load_tokens(specs, enc, cache_dir=str(cache)).tokens.tolist() == expected
    finally:
        enc.encode_iter = original


def test_window_order_is_a_function_of_seed_and_position():
    data = data_lib.TokenData(np.arange(100))
    windows = data_lib.Windows(data, seq_len=10, seed=5)
    stream = windows.batch(0, 60)
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 10)) for w in stream)
    offsets, position = [], 0
    for epoch in range(4):  # each epoch: as many windows as fit, 9 tokens apart from its offset
        offset, order = windows._epoch(epoch)
        count = len(order)
        assert offset + 9 * (count - 1) + 10 <= 100 < offset + 9 * count + 10
        assert sorted(windows.starts(position, count).tolist()) == list(range(offset, offset + 9 * count, 9))
        offsets.append(offset)
        position += count
    assert len(set(offsets)) > 1  # the window boundaries move between epochs
    again = data_lib.Windows(data, seq_len=10, seed=5)
    assert np.array_equal(again.batch(37, 9), stream[37:46])  # any position, any order of calls
    assert not np.array_equal(data_lib.Windows(data, 10, seed=6).batch(0, 11), stream[:11])


def test_learning_rate_schedule_and_weight_decay_exclusions():
    from gpt2.train.optim import WarmupSchedule, make_optimizer

    constant = WarmupSchedule(1e-3, warmup_steps=4, total_steps=20)
    assert [round(float(constant(i)), 8) for i in (0, 1, 3, 10)] == [2.5e-4, 5e-4, 1e-3, 1e-3]
    cosine = WarmupSchedule(1e-3, warmup_steps=0, total_steps=10, kind="cosine")
    assert float(cosine(0)) == pytest.approx(1e-3) and float(cosine(5)) == pytest.approx(5e-4)
    assert float(cosine(10)) == pytest.approx(0, abs=1e-9)
    model = gpt2.load_model(TINY_MODEL)
    optimizer = make_optimizer(model, model.trainable_variables, 1e-3, weight_decay=0.1)
    decayed = {name for name, v in model_variables(model).items() if optimizer._use_weight_decay(v)}
    assert decayed == {"model/wte", "model/wpe"} | {
        f"model/h{i}/{path}/w" for i in range(2) for path in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")}


# --- issue 24 item 16: a tampered train_state/latest.json ------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, small):
    """An output folder after 2 steps, saved at step 2."""
    output = str(tmp_path_factory.mktemp("saved-run") / "run")
    finetune(gpt2.load_model(small), random_tokens(), output, steps=2, batch_size=2, seq_len=16, save_every=2,
             progress=False)
    return output


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.pop("model_sha256"), 'expected a JSON object with exactly the keys "step", "state"'),
    (lambda r: r.update(step="2"), "\"step\" must be an integer >= 0, got '2'"),
    (lambda r: r.update(step=True), '"step" must be an integer >= 0, got True'),
    (lambda r: r.update(state="../../other/train_state/state-2"),
     "\"state\" must be \"state-2\", the state files of that step in "),
    (lambda r: r.update(state="/tmp/state-2"), "got '/tmp/state-2'"),
    (lambda r: r.update(state="state-3"), "got 'state-3'"),
    (lambda r: r.update(state=["state-2"]), "got ['state-2']"),
    (lambda r: r.update(model_sha256=None), '"model_sha256" must be 64 hex digits, got None'),
])
def test_item16_tampered_latest_json_is_refused(tmp_path, saved_run, edit, problem):
    from gpt2.train.state import TrainState

    output = str(tmp_path / "run")
    shutil.copytree(saved_run, output)
    # Another run's state, which a path in latest.json must not reach.
    shutil.copytree(os.path.join(output, "train_state"), tmp_path / "other" / "train_state")
    path = os.path.join(output, "train_state", "latest.json")
    with open(path) as f:
        record = json.load(f)
    assert record["state"] == "state-2"
    edit(record)
    with open(path, "w") as f:
        json.dump(record, f)
    with open(os.path.join(output, "train_state", "settings.json")) as f:
        settings = json.load(f)
    state = TrainState(output, settings, {})
    for call in (state.last_step, state.restore):
        with pytest.raises(TrainingError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"--resume: {path} is not a valid training state record (") and "\n" not in message
        assert problem in message and message.endswith("it was edited or damaged; start over with --overwrite")
