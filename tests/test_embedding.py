"""The kernels embedded in other code, as README "Embedding the kernels" says: a Cython
module that cimports bncore._kernels and a C program that includes bn_kernels.h, both
built here with the documented flags against the installed bncore (bncore.get_include()).

Each build runs in a subprocess in a temporary directory (the compiler is the one that
built bncore: CI has it). The Cython module's per-channel statistics must have the bits
of bncore.moments, since they are the same kernel built the same way.
"""
import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

import bncore

PYX = """
# cython: language_level=3, boundscheck=False, wraparound=False
cimport bncore._kernels as K
import numpy as np

K.bn_init_thresholds()   # this module's own copy of the cache thresholds, from the machine


def channel_moments(const double[:, :, ::1] x, int n_threads):
    '''Per-channel mean and biased variance of an (N, C, L) array: planes_stats.'''
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], l = x.shape[2]
    mean = np.empty(c)
    m2 = np.empty(c)
    cdef double[::1] mv = mean, qv = m2
    cdef int rc
    with nogil:
        rc = K.planes_stats(&x[0, 0, 0], n, c, l, c * l, l, &mv[0], &qv[0], n_threads)
    if rc < 0:
        raise MemoryError()
    return mean, m2 / (n * l)


def affine(const float[::1] x, double mean, double scale, double shift):
    '''(x - mean) * scale + shift: K.affine, float32.'''
    y = np.empty(x.shape[0], np.float32)
    cdef float[::1] yv = y
    with nogil:
        K.affine(&x[0], &yv[0], x.shape[0], mean, scale, shift)
    return y
"""

SETUP = """
import os
from setuptools import Extension, setup
from Cython.Build import cythonize
import bncore

# README "Embedding the kernels": the header's directory, and the flags bncore is built
# with (runtime dispatch to the AVX2 clone; no contraction, so the same bits; OpenMP)
ext = Extension("embed_demo", ["embed_demo.pyx"], include_dirs=[bncore.get_include()],
                define_macros=[("BNCORE_TARGET_CLONES", "1")],
                extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"],
                extra_link_args=["-fopenmp"])
# the directory that holds the bncore package, where Cython finds bncore/_kernels.pxd
# (on sys.path for a regular install; an editable install needs it said)
package_root = os.path.dirname(os.path.dirname(os.path.abspath(bncore.__file__)))
setup(name="embed_demo", script_args=["build_ext", "--inplace", "-q"],
      ext_modules=cythonize([ext], include_path=[package_root], quiet=True))
"""

CHECK = """
import numpy as np, bncore, embed_demo
x = np.random.default_rng(0).normal(3.0e4, 2.0, (8, 5, 300))
for nt in (1, 2):
    m, v = embed_demo.channel_moments(x, nt)
    bm, bv = bncore.moments(x, axis=(0, 2))
    assert m.tobytes() == bm.tobytes() and v.tobytes() == bv.tobytes(), (m - bm, v - bv)
xf = x[0, 0].astype(np.float32)
y = embed_demo.affine(xf, float(bm[0]), 0.5, 1.0)
want = (xf.astype(np.float64) - bm[0]) * 0.5 + 1.0
assert y.dtype == np.float32 and np.allclose(y, want, rtol=0, atol=1e-6), y - want
print("ok")
"""

C_PROGRAM = r"""
#include <stdio.h>
#include "bn_kernels.h"

int main(void)
{
    double x[1000], mean, m2, y[4];
    for (int i = 0; i < 1000; i++)
        x[i] = 1e6 + (i % 7) * 0.25 + i * 1e-3;
    double pivot = bn_pivot(x[0]);
    bn_seg_moments_f64(x, 1, 1000, 0, pivot, &mean, &m2);   /* one segment of 1000 */
    printf("%.17g %.17g\n", mean + pivot, m2 / 1000);
    bn_affine_f64(x, y, 4, mean + pivot, 2.0, 1.0);
    printf("%.17g %.17g %.17g %.17g\n", y[0], y[1], y[2], y[3]);
    return 0;
}
"""


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def test_get_include_names_the_header_directory():
    inc = bncore.get_include()
    assert os.path.isabs(inc)
    assert os.path.isfile(os.path.join(inc, "bn_kernels.h"))
    assert os.path.isfile(os.path.join(inc, "bn_kernels_impl.h"))
    assert "get_include" not in bncore.__all__   # a utility, not an op


def test_a_cython_module_cimporting_the_kernels_gets_bncores_bits(tmp_path):
    (tmp_path / "embed_demo.pyx").write_text(textwrap.dedent(PYX))
    (tmp_path / "setup_embed.py").write_text(textwrap.dedent(SETUP))
    (tmp_path / "check.py").write_text(textwrap.dedent(CHECK))
    r = run([sys.executable, "setup_embed.py"], tmp_path)
    assert "warning:" not in r.stderr, r.stderr   # the header's unused functions: silent
    assert run([sys.executable, "check.py"], tmp_path).stdout.strip() == "ok"


def test_a_c_program_including_the_header(tmp_path):
    (tmp_path / "prog.c").write_text(C_PROGRAM)
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC").split()[0] or "cc"
    r = run([cc, "-O2", "-std=gnu11", "-ffp-contract=off", "-DBNCORE_TARGET_CLONES=1",
             "-Wall", "-Wextra", "-Wno-psabi", "-I", bncore.get_include(), "prog.c",
             "-o", "prog", "-lm"], tmp_path)
    assert "warning" not in r.stderr, r.stderr
    lines = run([str(tmp_path / "prog")], tmp_path).stdout.split("\n")
    x = 1e6 + (np.arange(1000) % 7) * 0.25 + np.arange(1000) * 1e-3
    mean, var = (float(v) for v in lines[0].split())
    assert mean == pytest.approx(x.mean(), rel=1e-15, abs=0)
    assert var == pytest.approx(x.var(), rel=1e-12, abs=0)
    y = np.array([float(v) for v in lines[1].split()])
    np.testing.assert_allclose(y, (x[:4] - mean) * 2.0 + 1.0, rtol=1e-15, atol=1e-12)
