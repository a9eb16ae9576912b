"""Reading and writing OpenAI's checkpoint folders, and the errors for broken ones."""

import contextlib
import errno
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf

import gpt2
from gpt2.formats import base
from gpt2.formats.base import CheckpointError
from gpt2.formats.openai import DATA_FILE

from paths import TINY_MODEL


@pytest.fixture
def model_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(TINY_MODEL, target, ignore=shutil.ignore_patterns("reference*", "*.md"))
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def rewrite_variables(model_dir, edit):
    """Re-saves the checkpoint in model_dir after edit(dict name -> array) changed it."""
    reader = tf.train.load_checkpoint(str(model_dir / "model.ckpt"))
    values = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    edit(values)
    for path in model_dir.glob("model.ckpt.*"):
        if not path.name.endswith(".meta"):
            path.unlink()
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=str(model_dir / "model.ckpt"), tensor_names=names,
                      shape_and_slices=[""] * len(names), tensors=[values[n] for n in names])


def test_loaded_weights_equal_checkpoint_tensors(tiny_model):
    reader = tf.train.load_checkpoint(TINY_MODEL)
    variables = base.model_variables(tiny_model)
    assert set(variables) == set(reader.get_variable_to_shape_map())
    for name, variable in variables.items():
        np.testing.assert_array_equal(variable.numpy(), reader.get_tensor(name).reshape(variable.shape))


def test_save_then_load_is_bit_exact(tiny_model, tmp_path):
    gpt2.save_checkpoint(tiny_model, str(tmp_path / "saved"))
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(
        ["checkpoint", "hparams.json", "model.ckpt.index", DATA_FILE, "encoder.json", "vocab.bpe"]
    )
    reloaded = gpt2.load_model(str(tmp_path / "saved"))
    assert reloaded.hparams == tiny_model.hparams
    for a, b in zip(tiny_model.weights, reloaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    original = tf.train.load_checkpoint(TINY_MODEL)
    written = tf.train.load_checkpoint(str(tmp_path / "saved"))
    assert written.get_variable_to_shape_map() == original.get_variable_to_shape_map()
    for name in original.get_variable_to_shape_map():
        np.testing.assert_array_equal(written.get_tensor(name), original.get_tensor(name))


def test_save_overwrites_in_place_and_leaves_no_staging(tiny_model, model_copy):
    gpt2.save_checkpoint(tiny_model, str(model_copy))
    assert not [p for p in os.listdir(model_copy) if p.startswith(".saving-")]
    gpt2.load_model(str(model_copy))


def test_load_by_name_under_models_dir(tmp_path, model_copy):
    os.rename(model_copy, tmp_path / "124M")
    assert gpt2.load_model("124M", models_dir=str(tmp_path)).hparams.n_embd == 32
    assert gpt2.load_model("117M", models_dir=str(tmp_path)).hparams.n_embd == 32


def test_unknown_model_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="python download_model.py 355M"):
        gpt2.load_model("355M", models_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="known models: 124M, 355M, 774M, 1558M"):
        gpt2.load_model("huge", models_dir=str(tmp_path))


def test_missing_variables_are_all_listed(model_copy):
    def drop(values):
        del values["model/h1/mlp/c_fc/b"], values["model/ln_f/g"]
        values["model/extra"] = np.zeros(3, np.float32)

    rewrite_variables(model_copy, drop)
    with pytest.raises(CheckpointError) as error:
        gpt2.load_model(str(model_copy))
    message = str(error.value)
    assert "missing ['model/h1/mlp/c_fc/b', 'model/ln_f/g']" in message
    assert "unexpected ['model/extra']" in message
    assert "\n" not in message


def test_wrong_shape_is_reported(model_copy):
    def reshape(values):
        values["model/h0/attn/c_attn/w"] = values["model/h0/attn/c_attn/w"][0]

    rewrite_variables(model_copy, reshape)
    with pytest.raises(CheckpointError, match=r"model/h0/attn/c_attn/w \[32, 96\] \(expected \[1, 32, 96\]\)"):
        gpt2.load_model(str(model_copy))


def test_truncated_data_file(model_copy):
    data = model_copy / DATA_FILE
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated .*download the model again"):
        gpt2.load_model(str(model_copy))


@pytest.mark.parametrize(
    "missing, message",
    [
        ("hparams.json", "hparams.json: hparams file not found"),
        ("checkpoint", "checkpoint state file not found"),
        ("model.ckpt.index", "model.ckpt.index: checkpoint index not found"),
        (DATA_FILE, "checkpoint data not found"),
    ],
)
def test_missing_file_is_named(model_copy, missing, message):
    (model_copy / missing).unlink()
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        gpt2.load_model(str(model_copy))


def test_malformed_hparams(model_copy):
    (model_copy / "hparams.json").write_text('{"n_vocab": 50257,')
    with pytest.raises(ValueError, match="hparams.json: not valid JSON"):
        gpt2.load_model(str(model_copy))


def test_corrupt_index(model_copy):
    (model_copy / "model.ckpt.index").write_bytes(b"not an index")
    with pytest.raises(CheckpointError, match="model.ckpt.index: unreadable"):
        gpt2.load_model(str(model_copy))


def test_random_124M_checkpoint_loads_and_runs(tmp_path):
    gpt2.checkpoint.main(["--random", "124M", str(tmp_path), "--seed", "0"])
    model = gpt2.load_model(str(tmp_path))
    assert model.hparams == gpt2.PRESETS["124M"]
    assert sum(int(np.prod(w.shape)) for w in model.weights) == 124_439_808
    logits = model(np.array([[50256, 464, 318]]))["logits"]
    assert logits.shape == (1, 3, 50257) and np.isfinite(logits.numpy()).all()


def write_hparams(model_dir, **changes):
    path = model_dir / "hparams.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def test_absurd_hparams_fail_fast_with_a_short_message(model_copy):
    write_hparams(model_copy, n_layer=1_000_000)
    with pytest.raises(ValueError) as info:
        gpt2.load_model(str(model_copy))
    message = str(info.value)
    assert message.endswith("hparams.json: n_layer must be at most 1024, got 1000000") and len(message) < 300


def test_index_missing_many_variables_is_summarized(model_copy):
    write_hparams(model_copy, n_layer=1000)
    with pytest.raises(CheckpointError) as info:
        gpt2.load_model(str(model_copy))
    message = str(info.value)
    assert "missing 11976 variables (model/h10/attn/c_attn/b, model/h10/attn/c_attn/w, " in message
    assert len(message) < 400 and "\n" not in message


def test_weights_larger_than_memory_are_refused_before_allocating(model_copy, monkeypatch):
    monkeypatch.setattr(base, "physical_memory", lambda: 1 << 20)
    with pytest.raises(CheckpointError,
                       match=r"1,635,744 weights need 6 MiB of memory, more than this machine's 1 MiB"):
        gpt2.load_model(str(model_copy))


@pytest.mark.parametrize("folder", ["finetune[v2]", "run*1", "what?"])
def test_folder_names_with_glob_characters_load(tiny_model, tmp_path, folder):
    target = tmp_path / "a[b]" / folder
    gpt2.save_checkpoint(tiny_model, str(target))
    reloaded = gpt2.load_model(str(target))
    for a, b in zip(tiny_model.weights, reloaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_checkpoints_are_read_as_float32(model_copy, reference, dtype):
    rewrite_variables(model_copy, lambda values: values.update(
        {name: tf.cast(value, dtype) for name, value in values.items()}))
    model = gpt2.load_model(str(model_copy))
    reader = tf.train.load_checkpoint(TINY_MODEL)
    for name, variable in base.model_variables(model).items():
        expected = tf.cast(tf.cast(reader.get_tensor(name), dtype), tf.float32).numpy()
        np.testing.assert_array_equal(variable.numpy(), expected.reshape(variable.shape))
    logits = model(np.array([reference["inputs"]["len7"][0]]))["logits"][0, -1].numpy()
    tolerance = 0.05 if dtype == tf.float16 else 0.3  # weights rounded to 11 / 8 significant bits
    np.testing.assert_allclose(logits, reference["last_logits"]["len7"][0], atol=tolerance)


def test_integer_weights_are_a_clear_error(model_copy):
    rewrite_variables(model_copy,
                      lambda values: values.update({"model/ln_f/b": values["model/ln_f/b"].astype(np.int32)}))
    with pytest.raises(CheckpointError, match=r"must be floating point, but model/ln_f/b \(int32\) are not"):
        gpt2.load_model(str(model_copy))


FILE_OPERATIONS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "remove"), (os, "unlink"),
                   (shutil, "rmtree"), (shutil, "copyfile")]


class Injected(BaseException):
    """Stands for a kill or Ctrl-C in the middle of a save."""


@contextlib.contextmanager
def failing_file_operation(at, crash):
    """Counts file-system operations; the `at`-th raises Injected, and with `crash` so does every
    later one (a killed process cleans nothing up). Yields the list of operations seen."""
    seen, originals = [], {(module, name): getattr(module, name) for module, name in FILE_OPERATIONS}

    def wrap(module, name):
        def operation(*args, **kwargs):
            seen.append(name)
            if at is not None and (len(seen) == at or (crash and len(seen) > at)):
                raise Injected(name)
            return originals[module, name](*args, **kwargs)
        return operation

    for module, name in FILE_OPERATIONS:
        setattr(module, name, wrap(module, name))
    try:
        yield seen
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


def changed_model(shift):
    model = gpt2.load_model(TINY_MODEL)
    model.ln_f.b.assign(model.ln_f.b + shift)
    return model


@pytest.mark.parametrize("crash", [False, True], ids=["interrupted", "killed"])
def test_save_leaves_old_or_new_checkpoint_loadable_at_every_step(tmp_path, crash):
    old = tf.train.load_checkpoint(TINY_MODEL).get_tensor("model/ln_f/b")
    new_model = changed_model(1.0)
    target = tmp_path / "clean"
    shutil.copytree(TINY_MODEL, target)
    with failing_file_operation(None, crash) as seen:
        gpt2.save_checkpoint(new_model, str(target))
    assert len(seen) >= 5
    outcomes = set()
    for at in range(1, len(seen) + 1):
        target = tmp_path / f"at{at}"
        shutil.copytree(TINY_MODEL, target)
        with failing_file_operation(at, crash), contextlib.suppress(Injected):
            gpt2.save_checkpoint(new_model, str(target))
        loaded = gpt2.load_model(str(target)).ln_f.b.numpy()
        if np.array_equal(loaded, old):
            outcomes.add("old")
        else:
            np.testing.assert_array_equal(loaded, old + 1.0, err_msg=f"interrupted at operation {at}")
            outcomes.add("new")
        gpt2.save_checkpoint(new_model, str(target))  # a later save tidies up
        assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []
    assert outcomes == {"old", "new"}


def test_disk_full_keeps_the_previous_save_with_a_one_line_error(model_copy, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.raw_ops, "SaveV2", disk_full)
    with pytest.raises(OSError) as info:
        gpt2.save_checkpoint(changed_model(1.0), str(model_copy))
    message = str(info.value)
    assert message.endswith(f"cannot save the checkpoint in {model_copy}: No space left on device; "
                            "the previous checkpoint there is unchanged") and "\n" not in message
    assert info.value.errno == errno.ENOSPC
    old = tf.train.load_checkpoint(TINY_MODEL).get_tensor("model/ln_f/b")
    np.testing.assert_array_equal(gpt2.load_model(str(model_copy)).ln_f.b.numpy(), old)
    assert not [p for p in os.listdir(model_copy) if p.startswith(".")]


def test_saving_another_shape_over_a_model_is_refused(model_copy):
    (model_copy / "hparams.json").write_text(json.dumps(dict(gpt2.PRESETS["124M"].__dict__)))
    with pytest.raises(CheckpointError, match=r"holds a model of another shape \(n_ctx 1024 -> 64, n_embd 768 -> 32"):
        gpt2.save_checkpoint(changed_model(0.0), str(model_copy))


def test_every_written_folder_has_the_bpe_files(tmp_path, model_copy):
    from encoder import get_encoder
    from encoder.encoder import PACKAGE_DIR

    small = gpt2.HParams(n_vocab=50257, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    gpt2.write_random_checkpoint(small, str(tmp_path / "124M"))
    assert get_encoder("124M", models_dir=str(tmp_path)).encode("Hello world") == [15496, 995]
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / "124M" / name).read_bytes() == open(os.path.join(PACKAGE_DIR, name), "rb").read()

    # Saved from a loaded model: the BPE files of the folder it came from.
    (model_copy / "vocab.bpe").write_bytes((model_copy / "vocab.bpe").read_bytes() + b"\n")
    gpt2.save_checkpoint(gpt2.load_model(str(model_copy)), str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "vocab.bpe").read_bytes() == (model_copy / "vocab.bpe").read_bytes()


def test_random_writer_holds_one_tensor_at_a_time(tmp_path):
    hparams = gpt2.HParams(n_vocab=1000, n_ctx=64, n_embd=256, n_head=4, n_layer=8)
    weights = 4 * hparams.parameter_count
    largest = 4 * 256 * 1024
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        gpt2.write_random_checkpoint(hparams, str(tmp_path / "random"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest < weights / 6
    model = gpt2.load_model(str(tmp_path / "random"))
    assert 0.015 < np.std(model.wte.numpy()) < 0.025 and np.all(model.ln_f.g.numpy() == 1)


# --- issue 24 item 14: small errors that were still raw -------------------------------------------


def test_item14_binary_checkpoint_state_file_is_a_one_line_error(model_copy):
    (model_copy / "checkpoint").write_bytes(b"\x80\x93\xff binary")
    with pytest.raises(CheckpointError) as info:
        gpt2.load_model(str(model_copy))
    assert str(info.value) == (
        f"{model_copy / 'checkpoint'}: not a checkpoint state file (binary data, not UTF-8 text at byte 0); "
        'it should hold a line model_checkpoint_path: "model.ckpt"; download the model again'
    )


def test_item14_data_file_that_is_a_folder_is_named_as_one(model_copy):
    (model_copy / DATA_FILE).unlink()
    (model_copy / DATA_FILE).mkdir()
    with pytest.raises(CheckpointError) as info:
        gpt2.checkpoint.check_model_dir(str(model_copy))
    assert str(info.value) == f"{model_copy / DATA_FILE}: is a folder, not a checkpoint file; download the model again"


def test_item14_optimizer_slots_are_named_and_skipped_on_request(model_copy, tmp_path, tiny_model):
    def add_adam(values):  # what a TF1 training run (gpt-2-simple) saves beside the weights
        for name in [n for n in values if n.startswith("model/")]:
            values[name + "/Adam"] = np.zeros_like(values[name])
            values[name + "/Adam_1"] = np.ones_like(values[name])
        values["beta1_power"] = np.float32(0.9)
        values["beta2_power"] = np.float32(0.999)

    rewrite_variables(model_copy, add_adam)
    slots = 2 * len(base.model_variables(tiny_model)) + 2
    with pytest.raises(CheckpointError) as info:
        gpt2.load_model(str(model_copy))
    assert str(info.value) == (
        f"{model_copy / 'model.ckpt'}: holds {slots} optimizer slots of a training run besides the weights "
        f"(e.g. 'model/h0/attn/c_attn/b/Adam'); load it with skip_optimizer_slots=True, or write a copy "
        f"without them: python -m gpt2.convert --to openai --skip-optimizer-slots {model_copy} NEW_FOLDER"
    )
    loaded = gpt2.load_model(str(model_copy), skip_optimizer_slots=True)
    for a, b in zip(tiny_model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    from gpt2.convert import main as convert_main

    assert convert_main(["--to", "openai", "--skip-optimizer-slots", str(model_copy), str(tmp_path / "clean")]) == 0
    clean = tf.train.load_checkpoint(str(tmp_path / "clean" / "model.ckpt"))
    assert set(clean.get_variable_to_shape_map()) == set(base.model_variables(tiny_model))

    # Anything else unexpected is still refused, slots skipped or not.
    rewrite_variables(model_copy, lambda values: values.update(other=np.float32(1)))
    with pytest.raises(CheckpointError, match=r"unexpected \['other'\]"):
        gpt2.checkpoint.check_model_dir(str(model_copy), skip_optimizer_slots=True)
