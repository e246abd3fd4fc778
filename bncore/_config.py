"""Build and runtime facts: what was compiled, what this machine will use."""
import os
import platform

import numpy as np

from bncore import _openmp
from bncore._version import __version__


def config():
    """The facts show_config() prints, as a dict."""
    from bncore import _outputs, _stats
    return {
        "version": __version__,
        "openmp": _openmp.openmp_enabled(),
        "max_threads": _openmp.max_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "simd": _stats.simd_level(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "output_cache_bytes": _outputs.cache_limit(),
    }


def show_config():
    """Print bncore's version, OpenMP on/off, default thread count and SIMD level.

    Examples
    --------
    >>> import bncore
    >>> bncore.show_config()  # doctest: +SKIP
    bncore 0.1.0
      openmp:      on
      ...
    """
    c = config()
    print(f"bncore {c['version']}")
    print(f"  openmp:      {'on' if c['openmp'] else 'off (serial build)'}")
    print(f"  max threads: {c['max_threads']} (OMP_NUM_THREADS={c['OMP_NUM_THREADS']})")
    print(f"  simd:        {c['simd']}")
    print(f"  numpy:       {c['numpy']}, python {c['python']}, {c['machine']}, "
          f"{c['cpu_count']} cpus")
    print(f"  output cache: up to {c['output_cache_bytes'] / 2**20:.0f} MiB of freed outputs "
          "of 32 MiB or more kept for reuse (BNCORE_OUTPUT_CACHE_MB; "
          "bncore.release_memory())")
