"""gradwatch: gradient monitoring, explosion alerts and automatic clipping for Keras.

`import gradwatch.tags` (used by the TensorBoard plugin) does not import
TensorFlow; the public classes are imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["GradientMonitor", "Explosion", "ClippingSweep", "__version__"]


def __getattr__(name):
    if name == "GradientMonitor":
        from gradwatch.monitor import GradientMonitor

        return GradientMonitor
    if name == "Explosion":
        from gradwatch.alerts import Explosion

        return Explosion
    if name == "ClippingSweep":
        from gradwatch.sweep.sweep import ClippingSweep

        return ClippingSweep
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
