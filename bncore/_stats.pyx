# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Per-channel moments (Welford/Chan) over canonical views, and the Moments merge.

The Python layer (bncore._api) turns any array and axis into one of two canonical views
and calls these with element strides; here nothing is validated again.
"""
cimport numpy as cnp
from cython cimport floating

from bncore._kernels cimport bn_chan_merge_vec, bn_simd_level, planes_stats, rows_stats

cnp.import_array()


cdef inline double *f64_ptr(cnp.ndarray a):
    return <double *>cnp.PyArray_DATA(a)


cdef int _planes(const floating *x, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                 Py_ssize_t so, Py_ssize_t sc, double *mean, double *m2, int nt) noexcept nogil:
    return planes_stats(x, outer, nch, inner, so, sc, mean, m2, nt)


cdef int _rows(const floating *x, Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t ld,
               double *mean, double *m2, int nt) noexcept nogil:
    return rows_stats(x, nrows, nch, ld, mean, m2, nt)


def channel_moments(cnp.ndarray x, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                    Py_ssize_t so, Py_ssize_t sc, cnp.ndarray mean, cnp.ndarray m2,
                    int n_threads):
    """Per-channel mean and M2 (float64 (nch,) outputs) of a canonical view of ``x``.

    planes view: inner values contiguous (element strides so, sc); rows view: inner == 1
    and channels contiguous (row stride so). ``x`` is float32 or float64, native order.
    """
    cdef int rc
    cdef double *pm = f64_ptr(mean)
    cdef double *pm2 = f64_ptr(m2)
    cdef void *px = cnp.PyArray_DATA(x)
    cdef bint is_f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint rows = inner == 1 and sc == 1
    with nogil:
        if rows and is_f32:
            rc = _rows(<const float *>px, outer, nch, so, pm, pm2, n_threads)
        elif rows:
            rc = _rows(<const double *>px, outer, nch, so, pm, pm2, n_threads)
        elif is_f32:
            rc = _planes(<const float *>px, outer, nch, inner, so, sc, pm, pm2, n_threads)
        else:
            rc = _planes(<const double *>px, outer, nch, inner, so, sc, pm, pm2, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-thread partial statistics")


def merge_moments(double na, cnp.ndarray mean_a, cnp.ndarray m2_a, double nb,
                  cnp.ndarray mean_b, cnp.ndarray m2_b):
    """Chan-merge state b into state a in place (contiguous float64 arrays of equal size)."""
    bn_chan_merge_vec(na, f64_ptr(mean_a), f64_ptr(m2_a), nb, f64_ptr(mean_b), f64_ptr(m2_b),
                      mean_a.size)


def simd_level():
    """The SIMD code path the kernels take on this CPU."""
    return bn_simd_level().decode()
