"""The output folder of a training run: the model in its kind's layout plus `train_state/`.

    OUTPUT/checkpoint, hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001,
           encoder.json, vocab.bpe          a GPT-2: OpenAI's exact layout and variables
    OUTPUT/checkpoint, config.json, model.ckpt-<step>.{index,data-00000-of-00001},
           clue-vocab.txt                   a GPT2-ML: their released layout and variables
    OUTPUT/train_state/settings.json        the settings the run's result depends on
    OUTPUT/train_state/latest.json          the last save: step and model fingerprint
    OUTPUT/train_state/state-<step>.*       tf.train.Checkpoint: optimizer moments and step,
                                            data position, dropout RNG state, LoRA adapters
    OUTPUT/token_cache/                     the encoded dataset (see data.py)

A save writes the model (atomically, gpt2.save_checkpoint), then the state, then latest.json via
os.replace, so latest.json always names a complete pair. It records the sha256 of the model's
index file (which holds a checksum of every tensor; the one the `checkpoint` state file names),
so a resume notices a model folder that changed after the state was written.

TensorFlow is imported only where the state is written or read.
"""

import json
import os
import re
import shutil

from gpt2.formats.base import file_sha256

STATE_DIR = "train_state"
CACHE_DIR = "token_cache"
SETTINGS_FILE = "settings.json"
LATEST_FILE = "latest.json"
MODEL_FILES = ("checkpoint", "hparams.json", "model.ckpt.index", "model.safetensors")
_STEP_INDEX = re.compile(r"model\.ckpt-\d+\.index")


class TrainingError(RuntimeError):
    """Training cannot start or go on: the message says why and what to do."""


def holds_model(folder):
    """True if `folder` holds a model checkpoint: any of OpenAI's model files, Hugging Face's
    model.safetensors, or GPT2-ML's config.json beside a model.ckpt-N.index."""
    if any(os.path.exists(os.path.join(folder, name)) for name in MODEL_FILES):
        return True
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return "config.json" in names and any(_STEP_INDEX.fullmatch(name) for name in names)


def check_output(output, resume, overwrite):
    """Refuses an output folder that would lose someone's work, before anything is loaded: without
    resume, a folder holding a model or a training state needs `overwrite` (which then drops the
    old training state); with resume, it must hold a training state."""
    state_dir = os.path.join(output, STATE_DIR)
    latest = os.path.join(state_dir, LATEST_FILE)
    if resume:
        if not os.path.isfile(latest):
            raise TrainingError(f"--resume: {output} holds no training state ({latest} not found); "
                                "start without --resume")
        return
    has_state = os.path.isdir(state_dir)
    if (holds_model(output) or has_state) and not overwrite:
        what = "a model" if holds_model(output) else "a training state"
        raise TrainingError(f"{output} already holds {what}; pass --overwrite to replace it, --resume "
                            "to continue its training, or choose another --output")
    if has_state:
        shutil.rmtree(state_dir)


def write_json(path, value):
    """Writes JSON through a temporary file and os.replace (never half-written)."""
    staged = path + ".tmp"
    with open(staged, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(staged, path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path}: unreadable ({error}); start without --resume") from None
    except RecursionError:
        raise TrainingError(f"{path}: unreadable (JSON nested too deeply); start without --resume") from None


# latest.json names its state files by this pattern only, inside train_state/: never a path.
_STATE_NAME = re.compile(r"state-(0|[1-9][0-9]{0,17})")


def read_latest(state_dir):
    """The record of the last save, `latest.json`, checked: {"step": int >= 0, "state":
    "state-<step>" (a name inside `state_dir`, never a path), "model_sha256": 64 hex digits}."""
    path = os.path.join(state_dir, LATEST_FILE)
    latest = read_json(path)
    problem = None
    if not isinstance(latest, dict) or set(latest) != {"step", "state", "model_sha256"}:
        problem = 'expected a JSON object with exactly the keys "step", "state" and "model_sha256"'
    elif type(latest["step"]) is not int or latest["step"] < 0:
        problem = f'"step" must be an integer >= 0, got {_short(latest["step"])}'
    elif not isinstance(latest["state"], str) or not _STATE_NAME.fullmatch(latest["state"]) \
            or latest["state"] != f"state-{latest['step']}":
        problem = f'"state" must be "state-{latest["step"]}", the state files of that step in {state_dir}, ' \
                  f"got {_short(latest['state'])}"
    elif not isinstance(latest["model_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", latest["model_sha256"]):
        problem = f'"model_sha256" must be 64 hex digits, got {_short(latest["model_sha256"])}'
    if problem:
        raise TrainingError(f"--resume: {path} is not a valid training state record ({problem}); it was edited "
                            "or damaged; start over with --overwrite")
    return latest


def check_settings(output, settings):
    """--resume: the saved settings must equal `settings` (a JSON-able dict)."""
    path = os.path.join(output, STATE_DIR, SETTINGS_FILE)
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise TrainingError(f"--resume: {path} is not a settings record (a JSON object); it was edited or "
                            "damaged; start over with --overwrite")
    changed = [f"{key} {_short(saved.get(key))} there, {_short(settings.get(key))} now"
               for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if changed:
        raise TrainingError(
            f"--resume: {path} was saved with other settings ({'; '.join(changed)}); resume with the "
            "same settings, or start over with --overwrite"
        )


def _short(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def model_fingerprint(model_dir):
    """sha256 of the model's index file (it holds a checksum of every tensor): the one its
    `checkpoint` state file names (OpenAI's model.ckpt.index, GPT2-ML's model.ckpt-N.index)."""
    from gpt2.formats import gpt2ml, openai

    prefix = (gpt2ml.checkpoint_prefix if gpt2ml.claims(model_dir) else openai._checkpoint_prefix)(model_dir)
    return file_sha256(prefix + ".index")


class TrainState:
    """Saves and restores a run's state (see the module docstring) beside its model folder."""

    def __init__(self, output, settings, trackables):
        """trackables: name -> trackable (optimizer, variables) for tf.train.Checkpoint."""
        import tensorflow as tf

        self.output = output
        self.dir = os.path.join(output, STATE_DIR)
        self.settings = settings
        self.checkpoint = tf.train.Checkpoint(**trackables)

    def last_step(self):
        """The step of the last save (None if there is none)."""
        path = os.path.join(self.dir, LATEST_FILE)
        return read_latest(self.dir)["step"] if os.path.isfile(path) else None

    def restore(self):
        """Restores the state of the last save; returns its step. The model folder must be the
        one that save wrote (its weights are read by the caller)."""
        check_settings(self.output, self.settings)
        latest = read_latest(self.dir)
        try:
            found = model_fingerprint(self.output)
        except (OSError, ValueError):  # CheckpointError: no checkpoint there
            found = None
        if found != latest["model_sha256"]:
            raise TrainingError(
                f"--resume: the model in {self.output} is not the one saved with its training state "
                f"(step {latest['step']}); it changed since, or a save was interrupted; start over "
                "with --overwrite"
            )
        prefix = os.path.join(self.dir, latest["state"])
        try:
            self.checkpoint.read(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            raise TrainingError(f"--resume: {prefix} does not fit this run ({str(error).splitlines()[0]}); "
                                "start over with --overwrite") from None
        except Exception as error:  # tf.errors.OpError: unreadable files
            raise TrainingError(f"--resume: cannot read {prefix} ({str(error).strip().splitlines()[0]}); "
                                "start over with --overwrite") from None
        return latest["step"]

    def save(self, step, write_model, is_chief=True):
        """Writes the model (write_model(folder)), then the state, then latest.json. Non-chief
        workers take part in the (collective) state write into a scratch folder that is deleted."""
        if not is_chief:
            scratch = os.path.join(self.dir, f".worker-scratch-{os.getpid()}")
            os.makedirs(scratch, exist_ok=True)
            try:
                self.checkpoint.write(os.path.join(scratch, "state"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        os.makedirs(self.dir, exist_ok=True)
        write_json(os.path.join(self.dir, SETTINGS_FILE), self.settings)
        write_model(self.output)
        name = f"state-{step}"
        self.checkpoint.write(os.path.join(self.dir, name))
        write_json(os.path.join(self.dir, LATEST_FILE), {
            "step": step, "state": name, "model_sha256": model_fingerprint(self.output),
        })
        for old in os.listdir(self.dir):
            if old.startswith("state-") and not old.startswith(name + "."):
                os.remove(os.path.join(self.dir, old))
