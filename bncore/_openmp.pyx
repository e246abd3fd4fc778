# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Threading facts for show_config(), and the roofline helpers used by the bench.

``threaded_copy`` and ``threaded_read`` are the yardsticks of "% of a copy": the least
time any kernel that reads x (and writes y) can take on this machine with these threads.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memcpy

cnp.import_array()


cdef extern from *:
    """
    /* libgomp keeps its pool of threads across parallel regions, and a child forked
     * after a team of two or more ran inherits that pool without its threads: its next
     * team of two or more waits for them forever (multiprocessing's default "fork" start
     * method on Linux, after bncore ran in the parent). So once a team may have run, a
     * forked child runs every region on one thread (the same bits: the work split is the
     * shape's), and a team of one leaves the pool alone. */
    static int bn_team_may_run = 0;
    static int bn_forked_child = 0;
    /* The most threads a call starts (set at import: THREAD_FLOOR or the processors, the
     * more): more threads than processors never run these kernels faster, and a team of
     * tens of thousands (n_threads=2**31 had meant 65536) ran the process out of thread
     * stacks and crashed it in libgomp ((16, 64, 32, 32) float32 batch norm: SIGSEGV). */
    static int bn_thread_max = 256;
    static void bn_after_fork_child(void) { if (bn_team_may_run) bn_forked_child = 1; }
    #if defined(__unix__) || defined(__APPLE__)
    #include <pthread.h>
    static int bn_watch_fork(void) { return pthread_atfork(NULL, NULL, bn_after_fork_child); }
    #else   /* no fork */
    static int bn_watch_fork(void) { (void)bn_after_fork_child; return 0; }
    #endif
    """
    int bn_team_may_run
    int bn_forked_child
    int bn_thread_max
    int bn_watch_fork() noexcept nogil


cdef enum:
    THREAD_FLOOR = 256   # the cap on any machine (see bn_thread_max)


bn_watch_fork()
bn_thread_max = max(<int>THREAD_FLOOR, omp_get_num_procs())


cdef int thread_cap(int n_threads) noexcept nogil:
    """The threads a call may use for the n_threads asked (all of bncore's entry points
    pass their count through here): one in a child forked after a team of bncore's ran
    in its parent (see bn_after_fork_child), else n_threads up to bn_thread_max (noting
    that a team may run). Only the speed depends on it: the work split is the shape's."""
    global bn_team_may_run
    if bn_forked_child:
        return 1
    if n_threads > bn_thread_max:
        n_threads = bn_thread_max
    if n_threads > 1:
        bn_team_may_run = 1
    return n_threads


def cap_threads(int n_threads):
    """thread_cap for the Python layer."""
    return thread_cap(n_threads)


def thread_max():
    """The most threads a call starts, whatever n_threads asks (see bn_thread_max)."""
    return bn_thread_max


def forked_child():
    """Whether this process is a child forked after bncore's threads ran in its parent
    (bncore then runs on one thread here)."""
    return bool(bn_forked_child)


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP."""
    return bool(BNCORE_HAVE_OPENMP)


def max_threads():
    """Threads a kernel uses when n_threads is None (OMP_NUM_THREADS, else all cores; one
    in a forked child, see thread_cap)."""
    return 1 if bn_forked_child else omp_get_max_threads()


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
