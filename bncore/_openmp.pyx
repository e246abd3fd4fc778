# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Threading facts for show_config(), and the roofline helpers used by the bench.

``threaded_copy`` and ``threaded_read`` are the yardsticks of "% of a copy": the least
time any kernel that reads x (and writes y) can take on this machine with these threads.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memcpy

cnp.import_array()


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP."""
    return bool(BNCORE_HAVE_OPENMP)


def max_threads():
    """Threads a kernel uses when n_threads is None (OMP_NUM_THREADS, else all cores)."""
    return omp_get_max_threads()


cdef enum:
    PIECE = 1 << 16   # bytes per parallel piece


def threaded_copy(cnp.ndarray src, cnp.ndarray dst, int n_threads):
    """dst[...] = src for C-contiguous arrays of equal size, on n_threads threads."""
    if not (src.flags.c_contiguous and dst.flags.c_contiguous) or src.nbytes != dst.nbytes:
        raise ValueError("threaded_copy needs C-contiguous arrays of equal size")
    cdef char *s = <char *>cnp.PyArray_DATA(src)
    cdef char *d = <char *>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t nbytes = src.nbytes, npieces = (nbytes + PIECE - 1) // PIECE, i
    with nogil:
        for i in prange(npieces, schedule='static', num_threads=max(n_threads, 1)):
            memcpy(d + i * PIECE, s + i * PIECE, min(<Py_ssize_t>PIECE, nbytes - i * PIECE))
    return dst


def threaded_read(cnp.ndarray src, int n_threads):
    """Read every 8-byte word of a C-contiguous array once; returns their xor (unused)."""
    if not src.flags.c_contiguous:
        raise ValueError("threaded_read needs a C-contiguous array")
    cdef const unsigned long long *w = <const unsigned long long *>cnp.PyArray_DATA(src)
    cdef Py_ssize_t n = src.nbytes // 8, i
    cdef unsigned long long acc = 0
    with nogil:
        for i in prange(n, schedule='static', num_threads=max(n_threads, 1)):
            acc ^= w[i]
    return int(acc)
