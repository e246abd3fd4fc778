"""Build bncore's Cython extensions.

Two compiler features are probed rather than assumed, so that ``pip install .`` works with
any C compiler:

* OpenMP (``-fopenmp``): without it, or with ``BNCORE_NO_OPENMP=1``, the same sources build
  serial code and a warning says so; ``bncore.show_config()`` reports what was built.
* GCC ``target_clones``: the SIMD kernels in ``bncore/src/`` are compiled twice (x86-64-v3,
  i.e. AVX2+FMA, and the baseline) and picked at load time, so one wheel is fast on modern
  CPUs and still runs on old ones. ``-march=native`` stays opt-in: ``BNCORE_NATIVE=1``.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["_openmp", "_outputs", "_stats", "_batchnorm", "_rownorm"]

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""

CLONES_PROBE = r"""
__attribute__((target_clones("arch=x86-64-v3", "default")))
static double total(const float *x, long n) {
    double s = 0; for (long i = 0; i < n; i++) s += x[i]; return s;
}
int main(void) { float x[4] = {1, 2, 3, 4}; return total(x, 4) == 10.0 ? 0 : 1; }
"""


def _compiler():
    return os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"


def _compiles(source, flags):
    """Whether ``source`` compiles, links and runs with ``flags`` (the build's own compiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        try:
            subprocess.run([_compiler(), src, "-o", exe, *flags], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            subprocess.run([exe], check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def _flags():
    # -ffp-contract=off: no FMA contraction, so the AVX2 and baseline clones round alike
    # and results are bitwise identical across machines, not only across thread counts.
    # Kernels fuse where they say so (BN_FMA4: vfmadd in the AVX2 clone, libm's fma(),
    # which rounds alike, in the baseline).
    compile_args = ["-O3", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off",
                    "-Wno-unused-function", "-Wno-psabi",
                    "-Wno-unreachable-code"]
    link_args = []
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if os.environ.get("BNCORE_NO_OPENMP") == "1":
        warnings.warn("BNCORE_NO_OPENMP=1: building bncore without OpenMP (serial kernels)")
    elif _compiles(OPENMP_PROBE, ["-fopenmp"]):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        warnings.warn("the C compiler does not support OpenMP: building bncore's kernels "
                      "serial. Install a compiler with OpenMP (gcc, or clang with libomp) "
                      "for multi-threaded kernels.")
    if os.environ.get("BNCORE_NATIVE") == "1":
        compile_args.append("-march=native")
        macros.append(("BNCORE_NATIVE", "1"))
    elif (shutil.which(_compiler()) and sys.platform.startswith("linux")
          and _compiles(CLONES_PROBE, ["-O2"])):
        macros.append(("BNCORE_TARGET_CLONES", "1"))
    return compile_args, link_args, macros


def extensions():
    compile_args, link_args, macros = _flags()
    exts = [
        Extension(f"bncore.{name}", [f"bncore/{name}.pyx"],
                  include_dirs=[np.get_include(), "bncore/src"],
                  depends=["bncore/src/bn_kernels.h", "bncore/src/bn_kernels_impl.h",
                           "bncore/src/bn_cl_bwd_impl.h", "bncore/src/bn_half.h"],
                  define_macros=macros, extra_compile_args=compile_args,
                  extra_link_args=link_args)
        for name in MODULES
    ]
    return cythonize(exts, language_level=3,
                     compiler_directives={"boundscheck": False, "wraparound": False,
                                          "cdivision": True, "initializedcheck": False})


setup(ext_modules=extensions())
