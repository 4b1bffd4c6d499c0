"""One compiled inference function per loaded model, traced once for every batch size.

``model.predict`` (Keras 3, TensorFlow backend) traces its ``tf.function`` again for
every new input shape, and a node sees every batch size from 1 to its configured one
(the last batch of a study is partial): each new size logged "triggered tf.function
retracing" and paid for a trace. :class:`Predictor` compiles the model once with the
batch dimension left unknown (a TensorFlow ``input_signature`` of ``None`` batch), so
one trace serves every batch. On other backends (JAX on the GPU machine) it calls
``model.predict_on_batch``, which compiles per shape without warnings.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _ModelCall:
    """The model called in inference mode. A callable object, not a closure: TensorFlow
    keeps its "frequent retracing" statistics per function code, so closures over the
    node's six models would share one count and their six warm-up traces would be
    reported as retracing."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.single = len(model.inputs) == 1

    def __call__(self, *inputs: Any) -> Any:
        return self.model(inputs[0] if self.single else list(inputs), training=False)


class Predictor:
    """``predictor(x)``: the model's outputs for the batch ``x`` as float32 numpy."""

    def __init__(self, model: Any) -> None:
        import keras

        self.model = model
        self.backend = keras.backend.backend()
        self._fn: Any = None
        if self.backend == "tensorflow":
            import tensorflow as tf

            signature = [
                tf.TensorSpec((None, *tuple(i.shape)[1:]), tf.float32) for i in model.inputs
            ]
            self._fn = tf.function(_ModelCall(model), input_signature=signature)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = np.asarray(x, dtype=np.float32)
        if self._fn is None:
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
        out = self._fn(batch)
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)

    @property
    def traces(self) -> int | None:
        """How often the TensorFlow function was traced (``None`` on other backends)."""
        if self._fn is None:
            return None
        return int(self._fn.experimental_get_tracing_count())
