"""bncore: fast, exact batch normalization and its family for NumPy on the CPU.

Per-channel statistics with Welford/Chan (one pass, two-pass accuracy, exact merges),
batch norm forward and backward in training and eval, and layer, group, instance and
RMS norm: Cython kernels with OpenMP and runtime SIMD dispatch behind a NumPy-style API.
Results are bitwise identical for any number of threads.
"""
from bncore._version import __version__

try:   # a compiled module: is this a built bncore?
    from bncore import _openmp  # noqa: F401
except ImportError as _e:   # pragma: no cover - only in an unbuilt source tree
    import os as _os
    from importlib.machinery import EXTENSION_SUFFIXES as _SUFFIXES
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if not any(_os.path.exists(_os.path.join(_here, "_openmp" + x)) for x in _SUFFIXES):
        raise ImportError(
            f"bncore in {_here} is an unbuilt source tree (its compiled modules are "
            "missing). Python imports it before an installed bncore when run from the "
            "repository's root: run from another directory, or build it in place with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`).") from _e
    raise
from bncore._api import (
    Moments, batch_norm, batch_norm_backward, batch_norm_forward, moments,
)
from bncore._config import show_config
from bncore._outputs import release_memory  # a utility, not an op: outside __all__


def get_include():
    """The directory of bncore's C header ``bn_kernels.h``, for code that embeds the
    kernels: ``include_dirs=[bncore.get_include()]`` for a Cython module that does
    ``cimport bncore._kernels`` or C that includes the header (README: "Embedding the
    kernels"). Like ``numpy.get_include()``; outside ``__all__``, as it is not an op."""
    import os
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")

__all__ = [
    "__version__", "show_config", "moments", "Moments",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
]

try:  # the row-norm family (bncore._family) is re-exported when present
    from bncore import _family
    from bncore._family import *  # noqa: F401,F403
    __all__ += list(_family.__all__)
except ImportError:  # pragma: no cover - only while the family is being built
    pass
