# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP shim: the same .pyx compiles with or without OpenMP (see setup.py)."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNCORE_HAVE_OPENMP 1
    /* an orphaned barrier: binds to the parallel region of the calling thread */
    static inline void bncore_barrier(void) {
    #pragma omp barrier
    }
    #else
    #define BNCORE_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static int omp_get_num_threads(void) { return 1; }
    static inline void bncore_barrier(void) {}
    #endif
    """
    const int BNCORE_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void bncore_barrier() noexcept nogil


cdef inline int work_threads(int n_threads, Py_ssize_t tasks, Py_ssize_t elems,
                             Py_ssize_t serial_elems) noexcept nogil:
    """Threads worth starting: none beyond the tasks, one for tiny inputs.

    Only the speed depends on this: results never do (the work split is shape-only).
    """
    if elems < serial_elems or tasks <= 1:
        return 1
    return <int>min(<Py_ssize_t>n_threads, tasks)
