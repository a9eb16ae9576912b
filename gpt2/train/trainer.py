"""Fine-tuning loop: `finetune(model, dataset, output, ...)`, or `Trainer(...).run()`.

One optimizer step = `accumulate` micro-batches of `batch_size` windows, as one compiled
tf.function under a tf.distribute strategy (by default the default strategy: one device). Each
replica sums the gradients of its rows of every micro-batch; the sums are reduced across
replicas, clipped by global norm and applied by AdamW. Losses are scaled so that the step equals
one step on the whole batch of accumulate * batch_size windows.

The run is a deterministic function of its seed, data and settings: ops are deterministic, the
data order is a function of (seed, position) and the dropout RNG state is saved with the
optimizer, so a run that is stopped and resumed ends with the weights of an uninterrupted one.

Shapes: a = accumulate, b = batch_size, r = rows per replica (b / replicas), s = seq_len.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from gpt2.checkpoint import open_weights, save_checkpoint
from gpt2.train import data as data_lib
from gpt2.train import lora as lora_lib
from gpt2.train.logs import SummaryLog
from gpt2.train.optim import SCHEDULES, WarmupSchedule, make_optimizer
from gpt2.train.state import CACHE_DIR, TrainingError, TrainState, check_output

if TYPE_CHECKING:
    from encoder import Encoder
    from gpt2.model import GPT2


@dataclasses.dataclass
class TrainConfig:
    """Settings of a run (the command line's options of the same names)."""

    steps: int = 1000
    batch_size: int = 1
    seq_len: int | None = None  # None: the model's n_ctx
    accumulate: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    save_every: int = 1000  # 0: only at the end (and on Ctrl-C)
    sample_every: int = 0  # 0: no samples
    sample_prompt: str = ""  # "": unconditional (from <|endoftext|>)
    sample_length: int = 100
    val_fraction: float = 0.0
    val_every: int = 100
    val_batches: int = 8
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # None: lora_rank
    recompute: bool = False
    jit_compile: bool = False
    logdir: str | None = None
    progress: bool = True

    def check(self):
        """Raises ValueError naming the first bad setting."""
        for name in ("steps", "batch_size", "accumulate", "val_batches", "sample_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "sample_every", "val_every", "lora_rank", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.weight_decay < math.inf or not 0 <= self.clip_norm < math.inf:
            raise ValueError("weight_decay and clip_norm must be finite numbers >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")


@dataclasses.dataclass
class TrainResult:
    """What a run did: the last step, its loss, every step's loss, the last validation loss, the
    step of the last save (None: none) and whether Ctrl-C stopped it."""

    step: int
    loss: float | None
    losses: list
    val_loss: float | None
    saved_step: int | None
    interrupted: bool


def finetune(model: GPT2, dataset, output: str | os.PathLike | None = None, *, val_dataset=None,
             encoder: Encoder | None = None, source_dir: str | os.PathLike | None = None,
             strategy: tf.distribute.Strategy | None = None, resume: bool = False, overwrite: bool = False,
             **settings) -> TrainResult:
    """Fine-tunes `model` (a gpt2.GPT2, created under `strategy.scope()` if given) in place on `dataset`.

    dataset, val_dataset: text/token file paths, folders or globs (see gpt2.train.data), a 1-D
    integer array of token ids, or a TokenData. output: a model folder to write, `train_state/`
    beside it (None: no saves). source_dir: the folder the model was loaded from (its encoder
    files are copied; LoRA restores base weights from it after a save). settings: TrainConfig's
    fields. Ctrl-C stops after the current step and saves; NaN loss raises TrainingError. Turns
    on TensorFlow's op determinism for the rest of the process (exact resume needs it).
    """
    trainer = Trainer(model, dataset, output, config=TrainConfig(**settings), val_dataset=val_dataset,
                      encoder=encoder, source_dir=source_dir, strategy=strategy,
                      resume=resume, overwrite=overwrite)
    return trainer.run()


class Trainer:
    """A fine-tuning run (see `finetune`); `run()` trains, `evaluate()` gives the validation loss."""

    def __init__(self, model, dataset, output=None, config=None, *, val_dataset=None, encoder=None,
                 source_dir=None, strategy=None, resume=False, overwrite=False):
        self.config = config = config or TrainConfig()
        config.check()
        self.model = model
        self.output = output
        self.source_dir = source_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.resume = resume
        if output is not None:
            check_output(output, resume, overwrite)
        elif resume:
            raise TrainingError("resume needs an output folder")
        tf.config.experimental.enable_op_determinism()  # for the rest of the process: exact resume needs it
        self._check_model()
        self.seq_len = config.seq_len or model.hparams.n_ctx
        if self.seq_len > model.hparams.n_ctx:
            raise ValueError(f"seq_len {self.seq_len} is longer than the model's context ({model.hparams.n_ctx})")
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {replicas} replicas")
        if encoder is None:
            from encoder import encoder_for_model_dir, get_encoder

            encoder = encoder_for_model_dir(source_dir) if source_dir else get_encoder()
        self.encoder = encoder
        self._load_data(dataset, val_dataset)
        self.current_step = 0  # optimizer steps taken (restored by resume)
        self.schedule = WarmupSchedule(config.learning_rate, config.warmup_steps, config.steps, config.lr_schedule)
        with self.strategy.scope():
            model.recompute = config.recompute
            self.variables = (lora_lib.add_adapters(model, config.lora_rank, config.lora_alpha, config.seed)
                              if config.lora_rank else list(model.trainable_variables))
            self.optimizer = make_optimizer(model, self.variables, self.schedule, config.weight_decay)
        self._seed_dropout()
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        self.state = None
        if output is not None:
            trackables = {"optimizer_variables": list(self.optimizer.variables), "data_position": self.position,
                          "dropout_rng": [g.state for g in self._dropout_generators()]}
            if config.lora_rank:
                trackables["lora_adapters"] = list(self.variables)
            self.state = TrainState(output, self.settings(), trackables)
            if resume:
                self._resume()
        self._step_fn = self._batches = self._val_fn = None
        self.saved_step = self.state.last_step() if (self.state and resume) else None
        self.interrupted = False

    # ------------------------------------------------------------------ setup

    def _check_model(self):
        from gpt2.model import GPT2

        if not isinstance(self.model, GPT2):
            raise TypeError(f"finetune expects a gpt2.GPT2 model, got {type(self.model).__name__}")
        self.model.check_trainable("fine-tuning")
        wte = self.model.wte
        if not self.strategy.extended.variable_created_in_scope(wte.value if isinstance(wte, keras.Variable) else wte):
            raise ValueError("create (or load) the model under strategy.scope() of the strategy you train with")
        if lora_lib.adapter_variables(self.model):
            raise ValueError("the model already has LoRA adapters; merge them (gpt2.train.lora.merge) first")

    def _load_data(self, dataset, val_dataset):
        config = self.config
        cache_dir = os.path.join(self.output, CACHE_DIR) if self.output is not None else None
        train = data_lib.as_token_data(dataset, self.encoder, cache_dir, config.progress)
        val = None
        if val_dataset is not None:
            val = data_lib.as_token_data(val_dataset, self.encoder, cache_dir, config.progress)
        elif config.val_fraction:
            train, val = data_lib.split_validation(train, config.val_fraction, self.seq_len)
        for part, name in ((train, "dataset"), (val, "validation set")):
            if part is not None:
                part.check_ids(self.model.hparams.n_vocab, name)
        self.data = train
        self.windows = data_lib.Windows(train, self.seq_len, config.seed, name="dataset")
        self.val_windows = data_lib.Windows(val, self.seq_len, name="validation set") if val is not None else None

    def _dropout_generators(self):
        return [layer.seed_generator for layer in self.model._flatten_layers()
                if getattr(layer, "seed_generator", None) is not None]

    def _seed_dropout(self):
        """Dropout masks come from seed generators; their states start from the run's seed."""
        generators = self._dropout_generators()
        seeds = np.random.SeedSequence([self.config.seed, 1]).generate_state(max(len(generators), 1))
        for generator, seed in zip(generators, seeds):
            generator.state.assign(np.array([seed, 0], generator.state.dtype))

    def settings(self):
        """The settings the run's result depends on (a resume must match them)."""
        config, model = self.config, self.model
        dropout = [layer.rate for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
        base = None
        if config.lora_rank and self.source_dir is not None:
            from gpt2.train.state import model_fingerprint

            base = model_fingerprint(self.source_dir)
        same = ("seed", "batch_size", "accumulate", "learning_rate", "warmup_steps", "lr_schedule", "weight_decay",
                "clip_norm", "lora_rank", "lora_alpha", "jit_compile")
        return {**{name: getattr(config, name) for name in same}, "hparams": dataclasses.asdict(model.hparams),
                "dataset": self.data.fingerprint, "seq_len": self.seq_len,
                "steps": config.steps if config.lr_schedule == "cosine" else None,
                "dropout": max(dropout, default=0.0), "dtype_policy": model.dtype_policy.name, "base_model": base}

    def _resume(self):
        step = self.state.restore()
        if not self.config.lora_rank:
            _read_weights(self.model, self.output)
        if int(self.optimizer.iterations.numpy()) != step:
            raise TrainingError(f"--resume: the training state is at optimizer step "
                                f"{int(self.optimizer.iterations.numpy())}, its record says {step}; "
                                f"start over with --overwrite")
        self.current_step = step

    # ------------------------------------------------------------------ compiled steps

    def _build_step(self):
        model, strategy, variables = self.model, self.strategy, self.variables
        config = self.config
        accumulate = config.accumulate
        scale = 1.0 / (accumulate * strategy.num_replicas_in_sync)

        def gradients(tokens):
            """tokens [r, s] -> (scaled loss, scaled gradients) of one micro-batch."""
            with tf.GradientTape() as tape:
                loss = model.next_token_loss(tokens, training=True) * scale
            return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

        def replica_step(batch):
            """batch [r, a, s] -> (loss, gradients) summed over the micro-batches."""
            batch = tf.transpose(batch, [1, 0, 2])
            loss, grads = gradients(batch[0])
            if accumulate > 1:
                def body(i, loss, grads):
                    more_loss, more = gradients(tf.gather(batch, i))
                    return i + 1, loss + more_loss, [g + m for g, m in zip(grads, more)]

                _, loss, grads = tf.while_loop(lambda i, *_: i < accumulate, body, (tf.constant(1), loss, grads))
            return loss, grads

        def train_step(batch):
            loss, grads = strategy.run(replica_step, args=(batch,))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
            grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
            norm = tf.linalg.global_norm(grads)
            if config.clip_norm:
                grads, _ = tf.clip_by_global_norm(grads, config.clip_norm, use_norm=norm)
            self.optimizer.apply(grads, variables)
            return loss, norm

        jit = config.jit_compile and strategy.num_replicas_in_sync == 1
        return tf.function(train_step, jit_compile=jit or None)

    def evaluate(self):
        """Mean next-token loss over the first val_batches * batch_size validation windows."""
        if self.val_windows is None:
            return None
        if self._val_fn is None:
            self._val_fn = tf.function(lambda tokens: self.model.next_token_loss(tokens, training=False))
        windows = self.val_windows.in_order(self.config.val_batches * self.config.batch_size)
        losses = [float(self._val_fn(windows[i:i + self.config.batch_size]))
                  for i in range(0, len(windows), self.config.batch_size)]
        return float(np.mean(losses))

    # ------------------------------------------------------------------ the loop

    def step(self):
        """One optimizer step on the next batch of the data stream; returns (loss, gradient norm)
        as floats and advances `current_step` (no NaN check, no saving: see `run`)."""
        config = self.config
        if self._step_fn is None:
            self._step_fn = self._build_step()
        if self._batches is None:
            position = self.current_step * config.accumulate * config.batch_size
            self._batches = iter(data_lib.distributed_dataset(
                self.strategy, self.windows, position, config.accumulate, config.batch_size))
        loss, norm = self._step_fn(next(self._batches))
        self.current_step += 1
        return float(loss), float(norm)

    def run(self):
        """Trains from the current step to config.steps; saves every save_every steps, at the end
        and on Ctrl-C. Returns a TrainResult; raises TrainingError on NaN loss."""
        config = self.config
        losses, loss, val_loss = [], None, None
        if self.current_step >= config.steps:
            _say(f"already at step {self.current_step} of {config.steps}: nothing to do")
            return TrainResult(self.current_step, None, losses, None, self.saved_step, False)
        tokens_per_step = config.accumulate * config.batch_size * self.seq_len
        timed_steps, timed_seconds = 0, 0.0  # after the first step, which includes tracing
        log = SummaryLog(config.logdir)
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=self.current_step, unit="step", disable=not config.progress,
                   dynamic_ncols=True)
        try:
            with self._catch_interrupt():
                while self.current_step < config.steps and not self.interrupted:
                    started = time.perf_counter()
                    loss, norm = self.step()
                    seconds = time.perf_counter() - started
                    step = self.current_step
                    if not math.isfinite(loss):
                        raise TrainingError(f"loss is {loss} at step {step}: training stopped; {self._last_save()}")
                    if losses:
                        timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
                    losses.append(loss)
                    average = (tokens_per_step * timed_steps / timed_seconds if timed_steps
                               else tokens_per_step / seconds)
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f}, {average:,.0f} tok/s")
                    log.scalars(step, {"train/loss": loss, "train/learning_rate": float(self.schedule(step - 1)),
                                       "train/grad_norm": norm, "train/tokens_per_second": tokens_per_step / seconds})
                    if self.val_windows is not None and config.val_every and step % config.val_every == 0:
                        val_loss = self._log_validation(step, log)
                    if config.sample_every and step % config.sample_every == 0:
                        self._log_sample(step, log, bar)
                    if config.save_every and step % config.save_every == 0:
                        self._save(step)
            step = self.current_step
            if self.val_windows is not None and (not config.val_every or step % config.val_every):
                val_loss = self._log_validation(step, log)
            self._save(step)
            if self.interrupted:
                _say(f"interrupted at step {step}" + ("; continue with --resume" if self.output else ""))
        finally:
            bar.close()
            log.close()
        return TrainResult(self.current_step, loss, losses, val_loss, self.saved_step, self.interrupted)

    def _log_validation(self, step, log):
        val_loss = self.evaluate()
        _say(f"step {step}: validation loss {val_loss:.4f}")
        log.scalars(step, {"val/loss": val_loss})
        return val_loss

    def sample(self):
        """A sample from the fixed prompt (config.sample_prompt, seeded with config.seed)."""
        from gpt2.sampling.api import generate
        from gpt2.sampling.settings import SamplingSettings

        config = self.config
        prompt_length = max(1, len(self.encoder.encode(config.sample_prompt)))
        length = min(config.sample_length, self.model.hparams.n_ctx - prompt_length)
        settings = SamplingSettings(top_k=40).banning(getattr(self.encoder, "never_drawn", ()))  # GPT2-ML's [PAD]
        return generate(self.model, self.encoder, config.sample_prompt, length=length, settings=settings,
                        seed=config.seed)[0]

    def _log_sample(self, step, log, bar):
        text = self.config.sample_prompt + self.sample()
        bar.write(f"======== SAMPLE at step {step} ========\n{text}\n" + "=" * 40)
        log.text(step, "samples", text)

    def _last_save(self):
        if self.output is None:
            return "no output folder was given"
        if self.saved_step is None:
            return f"nothing was saved to {self.output}"
        return f"the last good save (step {self.saved_step}) is in {self.output}"

    def _save(self, step):
        """Writes the model folder and the training state (once per step)."""
        if self.state is None or self.saved_step == step:
            return
        self.position.assign(step * self.config.accumulate * self.config.batch_size)
        try:
            self.state.save(step, lambda folder: self._write_model(folder, step), is_chief=_is_chief(self.strategy))
        except OSError as error:
            raise TrainingError(f"could not save step {step} to {self.output} "
                                f"({error.strerror or error}); {self._last_save()}") from None
        self.saved_step = step
        _say(f"step {step}: saved to {self.output}")

    def _write_model(self, folder, step=0):
        """Writes the model in its kind's layout (a GPT2-ML's files numbered `step`) with the
        tokenizer files of `source_dir` (see gpt2.save_checkpoint)."""
        restore = self._restore_base if self.source_dir else None
        with lora_lib.merged(self.model, restore) if self.config.lora_rank else contextlib.nullcontext():
            save_checkpoint(self.model, folder, self.source_dir, step=step)

    def _restore_base(self, adapted):
        """Puts back the base weights of LoRA-adapted layers from the source folder (any format)."""
        names = {id(variable): name for name, variable in self.model.checkpoint_variables().items()}
        with open_weights(self.source_dir) as weights:
            for _, layer in adapted:
                layer.w.assign(np.reshape(weights.read(names[id(layer.w)]), layer.w.shape))

    @contextlib.contextmanager
    def _catch_interrupt(self):
        """Ctrl-C (SIGINT) ends the run after the current step, with a save; a second one
        interrupts at once (the last save stays intact)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.interrupted = True
            signal.signal(signal.SIGINT, previous)
            _say("stopping after this step (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _read_weights(model, model_dir):
    """Assigns the weights of the checkpoint in model_dir (the run's own save, in its kind's
    layout) to `model`, tensor by tensor."""
    from gpt2.formats.base import CheckpointError

    try:
        with open_weights(model_dir) as weights:
            if weights.hparams != model.hparams:
                raise TrainingError(f"--resume: {model_dir} holds a model of shape {weights.hparams}, this run's "
                                    f"is {model.hparams}; start over with --overwrite")
            for name, variable in model.checkpoint_variables().items():
                variable.assign(np.reshape(weights.read(name), variable.shape))
    except (CheckpointError, FileNotFoundError) as error:
        raise TrainingError(f"--resume: {str(error).splitlines()[0]}; start over with --overwrite") from None


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                            and "chief" not in resolver.cluster_spec().as_dict())


def _say(message):
    """A status line on stderr, below the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
