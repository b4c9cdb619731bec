"""gradwatch: gradient monitoring, explosion alerts and automatic clipping for Keras.

`import gradwatch.tags` (used by the TensorBoard plugin) does not import
TensorFlow; the public classes are imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["GradientMonitor", "Explosion", "Culprit", "BatchNotKeptError", "find_culprits", "ClippingSweep", "AutoThreshold", "Vanishing", "VanishingConfig",
           "UnsupportedVersionError", "UnsupportedBackendError", "__version__"]


def __getattr__(name):
    if name == "GradientMonitor":
        from gradwatch.monitor import GradientMonitor

        return GradientMonitor
    if name == "Explosion":
        from gradwatch.alerts import Explosion

        return Explosion
    if name in ("Culprit", "BatchNotKeptError"):
        from gradwatch.culprits import ranking

        return getattr(ranking, name)
    if name == "find_culprits":
        from gradwatch.culprits.find import find_culprits

        return find_culprits
    if name == "ClippingSweep":
        from gradwatch.sweep.sweep import ClippingSweep

        return ClippingSweep
    if name == "AutoThreshold":
        from gradwatch.clipping import AutoThreshold

        return AutoThreshold
    if name == "Vanishing":
        from gradwatch.vanishing_watch import Vanishing

        return Vanishing
    if name == "VanishingConfig":
        from gradwatch.vanishing import VanishingConfig

        return VanishingConfig
    if name == "UnsupportedVersionError":
        from gradwatch.versions import UnsupportedVersionError

        return UnsupportedVersionError
    if name == "UnsupportedBackendError":
        from gradwatch.versions import UnsupportedBackendError

        return UnsupportedBackendError
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
