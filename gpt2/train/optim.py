"""The optimizer: Keras AdamW with a warm-up + constant/cosine learning rate, no weight decay on
biases and LayerNorm parameters."""

import math

import keras
import tensorflow as tf

SCHEDULES = ("constant", "cosine")


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate of optimizer step i (0-based): rises linearly over `warmup_steps` to `peak`
    (peak * (i + 1) / warmup_steps), then stays there ("constant") or follows a half cosine down
    to 0 at `total_steps` ("cosine")."""

    def __init__(self, peak, warmup_steps=0, total_steps=1, kind="constant"):
        if kind not in SCHEDULES:
            raise ValueError(f"learning-rate schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        self.peak, self.warmup_steps, self.total_steps, self.kind = peak, warmup_steps, total_steps, kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        rate = tf.constant(self.peak, tf.float32)
        if self.warmup_steps:
            rate *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
        return rate

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "kind": self.kind}


def no_decay_variables(model):
    """Biases and LayerNorm gains/biases: OpenAI names ending in /b or /g (GPT2-ML's: /bias,
    /gamma, /beta, as their Adafactor excludes them)."""
    return [v for name, v in model.checkpoint_variables().items()
            if name.endswith(("/b", "/g", "/bias", "/gamma", "/beta"))]


def make_optimizer(model, variables, learning_rate, weight_decay):
    """AdamW over `variables` of `model` (built, so its slots exist; call under the strategy's
    scope). learning_rate: a number or a schedule (e.g. WarmupSchedule)."""
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    trained = {id(v) for v in variables}
    optimizer.exclude_from_weight_decay(var_list=[v for v in no_decay_variables(model) if id(v) in trained])
    optimizer.build(variables)
    return optimizer
