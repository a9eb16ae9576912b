"""TensorBoard logs written with TensorFlow's own summary ops: scalars and text.

The `tensorboard` package is needed only to view them (`tensorboard --logdir DIR`); writing uses
`tf.summary.write` with the metadata TensorBoard's scalar and text plugins read.
"""

import tensorflow as tf
from tensorflow.core.framework import summary_pb2


def _metadata(plugin, data_class):
    metadata = summary_pb2.SummaryMetadata(data_class=data_class)
    metadata.plugin_data.plugin_name = plugin
    return metadata.SerializeToString()


_SCALAR = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
_TEXT = _metadata("text", summary_pb2.DATA_CLASS_TENSOR)


class SummaryLog:
    """An event-file writer for `logdir` (None: every call does nothing)."""

    def __init__(self, logdir):
        self._writer = tf.summary.create_file_writer(logdir) if logdir else None

    def scalars(self, step, values):
        """values: {tag: number}, e.g. {"train/loss": 2.5}."""
        if self._writer is not None:
            with self._writer.as_default():
                for tag, value in values.items():
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=_SCALAR)

    def text(self, step, tag, text):
        if self._writer is not None:
            with self._writer.as_default():
                tf.summary.write(tag, tf.constant(text), step=step, metadata=_TEXT)

    def close(self):
        if self._writer is not None:
            self._writer.close()
