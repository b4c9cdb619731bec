"""Where gradwatch takes the gradient: the in-graph hooks on a Keras optimizer.

- `keras3`: the hook on a Keras 3 (TensorFlow backend) optimizer;
- `tfkeras`: the same for tf_keras (Keras 2), and the callback shim it needs;
- `optimizers`: which optimizers of a model are watched, and their names.
"""

from gradwatch.capture.keras3 import KerasCapture, momentum_slots
from gradwatch.capture.tfkeras import TfKerasCallbackCompat, TfKerasCapture, capture_class, is_tf_keras_model

__all__ = ["KerasCapture", "TfKerasCapture", "TfKerasCallbackCompat", "capture_class", "is_tf_keras_model",
           "momentum_slots"]
