"""Build and runtime facts: what was compiled, what this machine will use."""
import os
import platform

import numpy as np

from bncore import _openmp
from bncore._version import __version__


def config():
    """The facts show_config() prints, as a dict."""
    from bncore import _batchnorm, _outputs, _stats
    return {
        "version": __version__,
        "openmp": _openmp.openmp_enabled(),
        "max_threads": _openmp.max_threads(),
        "forked_child": _openmp.forked_child(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "simd": _stats.simd_level(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "output_cache_bytes": _outputs.cache_limit(),
        "f16c": _outputs._f16c(),
        "float16_kernels": _batchnorm._half_fused(),
        **thresholds(),
    }


def _modules():
    from bncore import _batchnorm, _rownorm, _stats
    return _batchnorm, _rownorm, _stats


def thresholds():
    """The byte thresholds the kernels take from this machine's caches at import: a forward
    or backward whose arrays total ``stream_forward_bytes`` / ``stream_backward_bytes`` or
    more writes its output with streaming stores; an input of ``far_bytes`` or more is
    taken to come from memory (prefetching); ``l2_bytes`` is one core's L2 (short pieces
    beyond the threads' L2s are prefetched); ``l1_bytes`` one core's L1 data cache (which
    layer/RMS norm backward rows stay in it between their two passes). ``l3_bytes`` is the
    last-level cache the C library reports (its L2 where it reports no L3; 0: neither)."""
    from bncore import _stats
    fwd, bwd, far, l2, l1 = _stats._thresholds()
    return {"l3_bytes": _stats._llc_bytes(), "stream_forward_bytes": fwd,
            "stream_backward_bytes": bwd, "far_bytes": far, "l2_bytes": l2, "l1_bytes": l1}


def set_thresholds(stream_forward_bytes, stream_backward_bytes, far_bytes, l2_bytes,
                   l1_bytes=None):
    """Set the thresholds of thresholds() in every kernel module (``l1_bytes=None`` keeps
    the L1's); returns the old ones (a dict for thresholds(), ``set_thresholds(**old)``
    restores them). For tests, which pin them so that each path runs on any machine, and
    for measuring the rule."""
    old = thresholds()
    l1 = old["l1_bytes"] if l1_bytes is None else int(l1_bytes)
    for m in _modules():
        m._set_thresholds(int(stream_forward_bytes), int(stream_backward_bytes),
                          int(far_bytes), int(l2_bytes), l1)
    del old["l3_bytes"]
    return old


def use_avx512(on):
    """Let the kernels that have AVX-512 twins (the layer/RMS norm backward: its rows, row
    pairs, row sums and column tiles; the float batch-norm backward of small channels in
    cache) use them where this CPU has AVX-512 (the default), or
    keep them to the AVX2 clone; returns the old setting (False on a CPU without AVX-512).
    The bits are the same either way; for tests and for measuring the twins."""
    old = False
    for m in _modules():
        old = m._set_avx512(bool(on)) or old
    return old


def use_f16c(on):
    """Let the float16 conversions (float16 input widened to float32, results rounded
    back: bncore._outputs, and the kernels that stage float16 rows) use the CPU's F16C
    instructions where it has them (the default; with AVX2 and FMA too, the kernels that
    read and write float16 themselves: half_level), or the portable code; returns the old
    setting (False on a CPU without F16C). The bits are the same either way (NumPy's); for
    tests and for measuring."""
    from bncore import _outputs
    old = False
    for m in (_outputs,) + _modules():
        old = m._set_f16c(bool(on)) or old
    return old


def half_level(level):
    """Set the float16 code of every module (not a public switch: for tests and for
    measuring): 0 portable conversions and float32 copies, 1 F16C conversions and float32
    copies, 2 also the kernels that read and write float16 themselves; capped at what the
    CPU has (2 needs AVX2, FMA and F16C). Returns the old level. The bits are the same on
    every level."""
    from bncore import _outputs
    old = 0
    for m in (_outputs,) + _modules():
        old = max(old, m._set_half_level(int(level)))
    return old


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
    print(f"  max threads: {c['max_threads']} (OMP_NUM_THREADS={c['OMP_NUM_THREADS']})"
          + ("; one thread in this child, forked after bncore's threads ran in its parent"
             if c["forked_child"] else ""))
    print(f"  simd:        {c['simd']}")
    print(f"  numpy:       {c['numpy']}, python {c['python']}, {c['machine']}, "
          f"{c['cpu_count']} cpus")
    print(f"  output cache: up to {c['output_cache_bytes'] / 2**20:.0f} MiB of freed outputs "
          "of 32 MiB or more kept for reuse (float16 calls' float32 copies from 1 MiB; "
          "BNCORE_OUTPUT_CACHE_MB; bncore.release_memory())")
    print(f"  float16:     computed in float32; conversions "
          f"{'with F16C' if c['f16c'] else 'portable (no F16C)'}"
          f"{'; kernels read and write float16 (AVX2, FMA)' if c['float16_kernels'] else ''}")
    mib = 1 << 20
    print(f"  streaming stores: forwards moving {c['stream_forward_bytes'] / mib:.0f} MiB or "
          f"more, backwards {c['stream_backward_bytes'] / mib:.0f} MiB "
          f"(L3 {c['l3_bytes'] / mib:.0f} MiB)")
    print(f"  caches:      L2 {c['l2_bytes'] >> 10} KiB, L1d {c['l1_bytes'] >> 10} KiB a core")
